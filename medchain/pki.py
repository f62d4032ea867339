"""A small certificate authority for one MedChain deployment (``cryptography``'s x509).

``medchain cloud init`` creates it; enrolment issues each device a client certificate whose
subject common name is its device id (Mosquitto's ``use_identity_as_username`` turns that
into the MQTT user the ACL names); the broker and the coordinator get theirs the same way.
A party that must keep its key to itself (a ledger validator of a consortium) makes a key and
a signing request where it runs (:func:`certificate_request`) and the CA certifies the
request (:meth:`CertificateAuthority.sign_request`). Revocation is a CRL the CA re-signs on every revocation: one device's
certificate is revoked (or replaced by a new one) without touching any other, and brokers
that load the CRL refuse it at the next connection.

Why a CRL rather than short-lived certificates: an edge box beside the scanners may be cut
off from the cloud for days and must reconnect with the certificate it has, without a
renewal service to reach first; a CRL needs nothing from the device, only a file the broker
reads. Keys are EC P-256 (what every TLS stack and Mosquitto's OpenSSL accept), written
with mode 0600; the CA key never leaves the folder it was created in.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medchain.durable import durable_write
from medchain.errors import KeyFileError
from medchain.identity import read_secret_file

__all__ = ["Identity", "CertificateAuthority", "certificate_request", "common_name", "serial_of"]

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest leaf validity browsers and most TLS stacks still accept
CRL_DAYS = 30  # a CRL's next update; the CA re-signs it on every revocation and on demand


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _name(organization: str, cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def common_name(cert_path: str | Path) -> str:
    """The subject common name of a PEM certificate (the device id, for a device)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def serial_of(cert_path: str | Path) -> int:
    return x509.load_pem_x509_certificate(Path(cert_path).read_bytes()).serial_number


def certificate_request(cn: str, key_path: str | Path) -> bytes:
    """A new EC P-256 key written to ``key_path`` (0600, never overwritten) and a certificate
    signing request (PEM) for it naming ``cn``, for a CA to sign elsewhere."""
    key = ec.generate_private_key(ec.SECP256R1())
    Path(key_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        durable_write(Path(key_path), _pem_key(key), mode=0o600, exclusive=True)
    except FileExistsError:
        raise KeyFileError(f"{key_path}: already exists; refusing to overwrite a key") from None
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    """The CA in ``directory``: ``ca.crt``, ``ca.key`` (0600), ``crl.pem`` and
    ``revoked.json`` (the serial numbers revoked, with when)."""

    def __init__(self, directory: Path, key, cert: x509.Certificate) -> None:
        self.directory, self._key, self.cert = directory, key, cert

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @property
    def organization(self) -> str:
        return self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value

    @classmethod
    def create(cls, directory: str | Path, organization: str) -> CertificateAuthority:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = _name(organization, f"{organization} MedChain CA")
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        try:
            durable_write(directory / "ca.key", _pem_key(key), mode=0o600, exclusive=True)
        except FileExistsError:
            raise KeyFileError(f"{directory / 'ca.key'}: already exists; refusing to overwrite a CA") from None
        durable_write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, key, cert)
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        directory = Path(directory)
        try:
            key = serialization.load_pem_private_key(read_secret_file(directory / "ca.key"), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except FileNotFoundError:
            raise KeyFileError(f"{directory}: no certificate authority here (ca.crt, ca.key)") from None
        except ValueError:
            raise KeyFileError(f"{directory}: ca.key or ca.crt is not a PEM key or certificate") from None
        return cls(directory, key, cert)

    def issue(self, cn: str, out_dir: str | Path, *, client: bool = True, server: bool = False,
              hosts: tuple[str, ...] = (), stem: str | None = None, key_stem: str | None = None,
              days: int = LEAF_DAYS) -> Identity:
        """A new key and certificate for ``cn`` (client and/or server use; ``hosts``: the
        names and addresses a server answers on), written as ``<stem>.crt`` and
        ``<key_stem or stem>.key`` (0600) in ``out_dir``; an existing pair is replaced
        (rotation)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._certificate(cn, key.public_key(), client, server, hosts, days)
        stem = stem or cn
        key_path, cert_path = out_dir / f"{key_stem or stem}.key", out_dir / f"{stem}.crt"
        durable_write(key_path, _pem_key(key), mode=0o600)
        durable_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return Identity(cert_path, key_path)

    def sign_request(self, csr_pem: bytes, *, cn: str | None = None, client: bool = True,
                     server: bool = False, hosts: tuple[str, ...] = (),
                     days: int = LEAF_DAYS) -> bytes:
        """A certificate (PEM) for the key of a certificate signing request that
        :func:`certificate_request` wrote (the key never leaves its owner), naming ``cn`` or
        else the request's own common name."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            asked = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        except (ValueError, IndexError):
            raise KeyFileError("not a PEM certificate signing request with a common name") from None
        if not csr.is_signature_valid:
            raise KeyFileError(f"certificate signing request for {asked!r}: bad signature")
        cn = cn or asked
        cert = self._certificate(cn, csr.public_key(), client, server, hosts, days)
        return cert.public_bytes(serialization.Encoding.PEM)

    def _certificate(self, cn: str, public_key, client: bool, server: bool,
                     hosts: tuple[str, ...], days: int) -> x509.Certificate:
        now = _now()
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + \
                 ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
        builder = (x509.CertificateBuilder().subject_name(_name(self.organization, cn))
                   .issuer_name(self.cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(min(now + datetime.timedelta(days=days), self.cert.not_valid_after_utc))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                                  critical=False))
        if hosts:
            names = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def revoked(self) -> dict[int, float]:
        path = self.directory / "revoked.json"
        if not path.exists():
            return {}
        return {int(s): t for s, t in json.loads(path.read_text()).items()}

    def revoke(self, cert_path: str | Path) -> int:
        """Add a certificate this CA issued to the CRL (re-signed at once); its serial."""
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        if cert.issuer != self.cert.subject:
            raise KeyFileError(f"{cert_path}: not issued by this CA")
        revoked = self.revoked()
        revoked.setdefault(cert.serial_number, _now().timestamp())
        durable_write(self.directory / "revoked.json",
                      json.dumps({str(s): t for s, t in sorted(revoked.items())}, indent=1).encode())
        self.write_crl()
        return cert.serial_number

    def write_crl(self) -> Path:
        now = _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(now + datetime.timedelta(days=CRL_DAYS)))
        for serial, when in sorted(self.revoked().items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(datetime.datetime.fromtimestamp(when, datetime.timezone.utc)).build())
        crl = builder.sign(self._key, hashes.SHA256())
        return durable_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
