"""The genesis file: the one document every validator and client of a chain agrees on.

It fixes the validator set (ids, Ed25519 public keys, addresses; n = 3f + 1), the initial
principals (users and services, each with a role and a public key), which role may submit
which transaction type, the initial access policies, and the consensus parameters. JSON,
so an operator can read and review it; keys are hex. No private key is ever in it. See
``docs/ledger.md`` for an annotated example.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medchain.canonical import canonical_bytes
from medchain.durable import durable_write
from ledger.errors import GenesisError
from medchain.identity import SigningKey
from medchain.pki import CertificateAuthority
from ledger.tls import is_loopback, validator_cn
from ledger.transactions import PURPOSES, TX_TYPES

__all__ = [
    "Genesis",
    "ValidatorInfo",
    "PrincipalInfo",
    "Params",
    "DEFAULT_PERMISSIONS",
    "DEFAULT_POLICIES",
    "make_local_genesis",
    "free_ports",
]

DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    "operator": ["PRINCIPAL_SET", "DEVICE_ENROLLED", "DEVICE_REVOKED", "POLICY_SET",
                 "CONSENT_SET", "ACCESS_REQUESTED"],
    "ingest": ["IMAGE_REGISTERED", "INFERENCE_RECORDED", "ACCESS_REQUESTED"],
    "training": ["MODEL_RELEASED", "ACCESS_REQUESTED"],
    "custodian": ["ACCESS_REQUESTED"],
    "registrar": ["CONSENT_SET"],
    "clinician": ["ACCESS_REQUESTED"],
    "radiologist": ["ACCESS_REQUESTED"],
    "researcher": ["ACCESS_REQUESTED"],
    # the HTTP API's own principal: files access requests on the signer's behalf, nothing else
    "api": ["ACCESS_REQUESTED"],
}
# roles that may file an access request on behalf of another principal (the custodian, the
# API and the operator act for the person asking; the API only with action "request")
DEFAULT_ON_BEHALF = ["operator", "custodian", "api"]
DEFAULT_POLICIES: dict[str, dict[str, list[str]]] = {
    "default": {"diagnosis": ["clinician", "radiologist"], "research": ["researcher"],
                "training": ["training"], "sharing": []},
}


@dataclass(frozen=True)
class ValidatorInfo:
    id: int
    public_key: str  # hex
    host: str
    port: int
    tls_cert: str = ""  # PEM, issued by the genesis's tls_ca; "" on a genesis without TLS


@dataclass(frozen=True)
class PrincipalInfo:
    name: str
    role: str
    public_key: str  # hex


@dataclass(frozen=True)
class Params:
    """Consensus parameters (times in milliseconds; the replica core sees them as numbers,
    never reads a clock)."""

    checkpoint_interval: int = 16   # K: a checkpoint every K sequence numbers
    window: int = 64                # L: sequence numbers in flight above the stable checkpoint
    max_batch: int = 512            # requests per batch (pre-prepare)
    pipeline: int = 4               # batches proposed and not yet executed
    # a batch that is not full is proposed at once only while fewer than this many are in
    # flight; otherwise its requests wait to fill it or for one in flight to execute (light
    # load: no added latency; moderate load: fewer, larger blocks for the same work)
    partial_in_flight: int = 1
    view_change_ms: int = 1000      # base view-change timeout; doubles per failed view
    max_view_change_ms: int = 8000  # back-off cap
    status_ms: int = 250            # status gossip period
    max_skew_ms: int = 30_000       # a proposal's time must be this close to a backup's clock
    request_max_age_ms: int = 600_000  # a request's own time must be this close to block time

    def __post_init__(self):
        if self.checkpoint_interval < 1 or self.window < 2 * self.checkpoint_interval:
            raise GenesisError("params: need checkpoint_interval >= 1 and window >= 2K")
        if self.max_batch < 1 or self.pipeline < 1 or self.partial_in_flight < 1:
            raise GenesisError("params: max_batch, pipeline and partial_in_flight must be >= 1")


@dataclass(frozen=True)
class Genesis:
    chain_id: str
    genesis_time_ms: int
    validators: tuple[ValidatorInfo, ...]
    principals: tuple[PrincipalInfo, ...]
    permissions: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_PERMISSIONS))
    on_behalf: list[str] = field(default_factory=lambda: list(DEFAULT_ON_BEHALF))
    policies: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: dict(DEFAULT_POLICIES))
    params: Params = field(default_factory=Params)
    version: int = 1
    tls_ca: str = ""  # PEM of the consortium CA: every link runs mutual TLS under it

    def __post_init__(self):
        if self.tls_ca and not all(v.tls_cert for v in self.validators):
            raise GenesisError("a genesis with a CA needs every validator's certificate")
        n = len(self.validators)
        if n < 4 or (n - 1) % 3:
            raise GenesisError(f"need n = 3f + 1 >= 4 validators, found {n}")
        if [v.id for v in self.validators] != list(range(n)):
            raise GenesisError("validator ids must be 0..n-1 in order")
        keys = [v.public_key for v in self.validators] + [p.public_key for p in self.principals]
        for k in keys:
            try:
                if len(bytes.fromhex(k)) != 32:
                    raise ValueError
            except (ValueError, TypeError):
                raise GenesisError("every public key must be 32 bytes of hex") from None
        if len(set(keys)) != len(keys):
            raise GenesisError("a public key appears twice")
        names = [p.name for p in self.principals]
        if len(set(names)) != len(names):
            raise GenesisError("a principal name appears twice")
        for role, types in self.permissions.items():
            unknown = set(types) - set(TX_TYPES)
            if unknown:
                raise GenesisError(f"role {role!r}: unknown transaction types {sorted(unknown)}")
        for name, policy in self.policies.items():
            if set(policy) - set(PURPOSES):
                raise GenesisError(f"policy {name!r}: purposes must be among {PURPOSES}")

    @property
    def f(self) -> int:
        return (len(self.validators) - 1) // 3

    @property
    def n(self) -> int:
        return len(self.validators)

    def validator_keys(self) -> list[bytes]:
        return [bytes.fromhex(v.public_key) for v in self.validators]

    @property
    def tls(self) -> bool:
        """Whether every link of this chain runs mutual TLS."""
        return bool(self.tls_ca)

    def check_links(self) -> None:
        """Refuse plaintext links off loopback: a genesis whose validators are reached over
        a network must record a CA (validators and clients call this before connecting)."""
        away = [v.id for v in self.validators if not is_loopback(v.host)]
        if away and not self.tls:
            raise GenesisError(f"validators {away} are off loopback: their links need TLS "
                               "and this genesis records no CA (tls_ca)")

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.tls_ca:  # a genesis without TLS keeps the form (and hash) it always had
            del out["tls_ca"]
            for v in out["validators"]:
                del v["tls_cert"]
        out["f"] = self.f  # informative; recomputed from the validator list on load
        return out

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(canonical_bytes(self.to_json())).digest()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return durable_write(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def from_json(cls, data: dict) -> Genesis:
        try:
            if data.get("version") != 1:
                raise GenesisError(f"unsupported genesis version {data.get('version')!r}")
            declared_f = data.get("f")
            genesis = cls(
                chain_id=str(data["chain_id"]),
                genesis_time_ms=int(data["genesis_time_ms"]),
                validators=tuple(ValidatorInfo(**v) for v in data["validators"]),
                principals=tuple(PrincipalInfo(**p) for p in data["principals"]),
                permissions={r: list(t) for r, t in data["permissions"].items()},
                on_behalf=list(data.get("on_behalf", DEFAULT_ON_BEHALF)),
                policies={k: {p: list(r) for p, r in v.items()}
                          for k, v in data["policies"].items()},
                params=Params(**data.get("params", {})),
                tls_ca=str(data.get("tls_ca", "")),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, GenesisError):
                raise
            raise GenesisError(f"malformed genesis: {type(exc).__name__}: {exc}") from None
        if declared_f is not None and declared_f != genesis.f:
            raise GenesisError(f"genesis says f={declared_f} but lists {genesis.n} validators")
        return genesis

    @classmethod
    def load(cls, path: str | os.PathLike) -> Genesis:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise GenesisError(f"{path}: genesis file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GenesisError(f"{path}: not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise GenesisError(f"{path}: expected a JSON object")
        return cls.from_json(data)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS says are free right now (bound together so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_local_genesis(workdir: str | os.PathLike, n: int = 4, *,
                       principals: dict[str, str] | None = None, host: str = "127.0.0.1",
                       ports: list[int] | None = None, params: Params | None = None,
                       genesis_time_ms: int = 0, tls: bool = False) -> Genesis:
    """The all-in-one *local* genesis, for the demo and tests: create every key (mode 0600)
    and a genesis for ``n`` validators in ``workdir``. Whoever holds that folder can sign as
    every validator: a real deployment assembles its genesis from public parts instead
    (:mod:`ledger.consortium`).

    ``principals`` maps name to role; by default an operator, the cloud ingest service, the
    training service, the custodian and the HTTP API (``api``). Keys land in ``workdir/keys/``; the genesis in
    ``workdir/genesis.json``. With ``tls`` a CA in ``workdir/ca`` issues every validator and
    principal a certificate (``keys/<name>.crt`` and ``keys/<name>.tls.key``) and every
    link runs mutual TLS, on loopback too."""
    if n < 4 or (n - 1) % 3:
        raise GenesisError(f"need n = 3f + 1 >= 4 validators, asked for {n}")
    if not tls and not is_loopback(host):
        raise GenesisError(f"validators on {host} are off loopback: their links need TLS "
                           "(--tls)")
    workdir = Path(workdir)
    keys = workdir / "keys"
    principals = principals or {"operator": "operator", "ingest": "ingest",
                                "training": "training", "custodian": "custodian", "api": "api"}
    ports = ports or free_ports(n, host)
    ca = CertificateAuthority.create(workdir / "ca", "MedChain local ledger") if tls else None
    validators = []
    for i in range(n):
        key = SigningKey.generate()
        key.save(keys / f"validator-{i}.key")
        cert = ""
        if ca is not None:
            cert = ca.issue(validator_cn(i), keys, server=True, hosts=(host,),
                            stem=f"validator-{i}", key_stem=f"validator-{i}.tls").cert.read_text()
        validators.append(ValidatorInfo(i, key.public.hex(), host, ports[i], cert))
    infos = []
    for name, role in principals.items():
        key = SigningKey.generate()
        key.save(keys / f"{name}.key")
        if ca is not None:
            ca.issue(name, keys, stem=name, key_stem=f"{name}.tls")
        infos.append(PrincipalInfo(name, role, key.public.hex()))
    genesis = Genesis(
        chain_id=f"medchain-local-{secrets.token_hex(4)}",
        genesis_time_ms=genesis_time_ms,
        validators=tuple(validators),
        principals=tuple(infos),
        params=params or Params(),
        tls_ca=ca.cert_path.read_text() if ca is not None else "",
    )
    genesis.save(workdir / "genesis.json")
    return genesis
