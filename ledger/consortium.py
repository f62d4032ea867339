"""A consortium genesis: assembled from public parts, so no one ever holds every key.

Each party generates its keys where they will be used (:func:`keygen`): a validator's
operator on the validator's host, a principal (a service or a person) on its own machine.
The private keys (Ed25519 for signing, EC P-256 for TLS, mode 0600) stay there; what is
handed over is a *descriptor*, a small JSON file with the public key, the validator's
address and a certificate signing request. Whoever assembles the genesis
(:func:`assemble`) reads only descriptors and public keys, has the consortium CA sign the
requests (validator certificates go into the genesis, principal certificates are handed
back), and every party then checks the genesis hash before it runs anything.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from ledger.errors import GenesisError
from ledger.genesis import Genesis, Params, PrincipalInfo, ValidatorInfo
from ledger.tls import validator_cn
from medchain.durable import durable_write
from medchain.identity import SigningKey
from medchain.pki import CertificateAuthority, certificate_request

__all__ = ["Descriptor", "keygen", "assemble", "Assembled"]


@dataclass(frozen=True)
class Descriptor:
    """What one party hands over: nothing secret. ``address`` ("host:port") marks a
    validator; without it the descriptor is a principal's, with its ``role``."""

    name: str
    public_key: str  # Ed25519, hex
    csr: str         # PEM certificate signing request for its TLS key
    address: str = ""
    role: str = ""

    @property
    def is_validator(self) -> bool:
        return bool(self.address)

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise GenesisError(f"descriptor {self.name}: address {self.address!r} is not "
                               "HOST:PORT")
        return host.strip("[]"), int(port)

    def save(self, path: str | os.PathLike) -> Path:
        return durable_write(Path(path), (json.dumps(asdict(self), indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Descriptor:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: str(data[k]) for k in ("name", "public_key", "csr")},
                       address=str(data.get("address", "")), role=str(data.get("role", "")))
        except FileNotFoundError:
            raise GenesisError(f"{path}: descriptor not found") from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GenesisError(f"{path}: not a key descriptor (name, public_key, csr)") from None


def keygen(out: str | os.PathLike, name: str, address: str = "", role: str = "") -> Descriptor:
    """Generate ``name``'s keys in ``out`` (``<name>.key`` and ``<name>.tls.key``, 0600,
    never overwritten) and write its public descriptor ``<name>.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / f"{name}.key").exists():
        raise GenesisError(f"{out / (name + '.key')}: already exists; not overwriting a key")
    key = SigningKey.generate()
    key.save(out / f"{name}.key")
    csr = certificate_request(name, out / f"{name}.tls.key").decode()
    descriptor = Descriptor(name, key.public.hex(), csr, address, "" if address else role or name)
    if address:
        descriptor.host_port()
    descriptor.save(out / f"{name}.json")
    return descriptor


@dataclass(frozen=True)
class Assembled:
    genesis: Genesis
    principal_certs: dict[str, str]  # principal name -> PEM certificate to hand back


def assemble(descriptors: list[Descriptor], principals: dict[str, tuple[str, str]],
             ca: CertificateAuthority | None, *, genesis_time_ms: int = 0,
             chain_id: str | None = None, params: Params | None = None) -> Assembled:
    """The genesis for validators in descriptor order (ids 0..n-1) and principals from
    descriptors and ``principals`` (name -> (role, Ed25519 public key hex)). With ``ca``
    the CA signs every descriptor's request and the genesis records its certificate."""
    validators, infos, certs = [], [], {}
    for d in descriptors:
        if d.is_validator:
            host, port = d.host_port()
            cert = ca.sign_request(d.csr.encode(), cn=validator_cn(len(validators)),
                                   server=True, hosts=(host,)).decode() if ca else ""
            validators.append(ValidatorInfo(len(validators), d.public_key, host, port, cert))
        else:
            infos.append(PrincipalInfo(d.name, d.role or d.name, d.public_key))
            if ca is not None:
                certs[d.name] = ca.sign_request(d.csr.encode(), cn=d.name).decode()
    infos += [PrincipalInfo(name, role, key) for name, (role, key) in principals.items()]
    genesis = Genesis(
        chain_id=chain_id or f"medchain-{secrets.token_hex(4)}",
        genesis_time_ms=genesis_time_ms,
        validators=tuple(validators),
        principals=tuple(infos),
        params=params or Params(),
        tls_ca=ca.cert_path.read_text() if ca is not None else "",
    )
    genesis.check_links()
    return Assembled(genesis, certs)
