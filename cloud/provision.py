"""Setting up a deployment and handing each device its startup kit, in the spirit of NVIDIA
FLARE's provisioning: no certificate is made by hand.

``init_deployment`` creates the coordinator's keys, the custodian's folder apart
(``custodian/``: its private key, or the key wrapped by a PKCS#11 token, and its
``custodian.toml``; the coordinator keeps only ``keys/custodian.pub``), the deployment's certificate authority
(:mod:`medchain.pki`), the broker's server certificate, the coordinator's client certificate
(its MQTT user), the broker files (:mod:`cloud.brokerconf`) and a ``cloud.toml`` whose broker
is TLS with client certificates — embedded or Mosquitto, the same rules. ``issue_kit`` enrols
a device (ledger, then registry) and writes its kit: the enrolment file (public keys only),
the CA certificate, the device's client certificate (subject = device id) and key, and its
profile with the device id and the broker's address filled in; the ACL is re-written so the
device's topics exist. ``revoke_device`` revokes it everywhere (ledger, registry, CRL, ACL)
and ``rotate_certificate`` replaces one device's certificate without touching any other.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cloud.broker import BrokerSecurity
from cloud.brokerconf import write_broker_files
from cloud.config import CloudConfig
from medchain.errors import ConfigError
from cloud.enrolment import enroll, revoke, write_enrollment
from cloud.fleet import FleetRegistry
from cloud.keybackend import Pkcs11Settings, provision_pkcs11
from ledger.client import LedgerClient
from medchain.durable import durable_write
from medchain.identity import RecipientKey, SigningKey, VerifyKey
from medchain.pki import CertificateAuthority, Identity

__all__ = ["Kit", "init_deployment", "broker_security", "rewrite_acl", "issue_kit", "revoke_device",
           "rotate_certificate", "profile_for_device"]

BROKER_PORT = 8883  # MQTT over TLS (what the edge profiles name)


@dataclass(frozen=True)
class Kit:
    """What a device is given: its folder, and the files in it."""

    directory: Path
    enrollment: Path
    profile: Path
    ca: Path
    tls: Identity


def init_deployment(root: str | Path, *, genesis: Path, ingest_key: Path, operator_key: Path | None,
                    training_key: Path | None, organization: str = "MedChain", broker_host: str = "127.0.0.1",
                    broker_port: int = BROKER_PORT, embedded: bool = False, database_url: str | None = None,
                    coordinator: str = "cloud-coordinator", custodian_ledger_key: Path | None = None,
                    pkcs11: Pkcs11Settings | None = None) -> tuple[Path, list[str]]:
    """Create what a new deployment needs under ``root`` (nothing is overwritten); returns the
    ``cloud.toml`` path and what was made. The custodian's part lands in ``root/custodian``
    (move it to the custodian's host or user); ``pkcs11``: its key in that token instead of
    a file. ``custodian_ledger_key``: the ``custodian`` principal's ledger key (default: the
    one beside ``ingest_key``)."""
    root = Path(root)
    keys = root / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    made = _init_custodian(root, keys, genesis=genesis, pkcs11=pkcs11,
                           ledger_key=custodian_ledger_key or Path(ingest_key).parent / "custodian.key")
    if not (keys / "model.key").exists():
        SigningKey.generate().save(keys / "model.key")
        made.append("keys/model.key")
    if not (keys / "meta.key").exists():
        RecipientKey.generate().save(keys / "meta.key")
        made.append("keys/meta.key")
    if not (root / "pki" / "ca.key").exists():
        ca = CertificateAuthority.create(root / "pki", organization)
        hosts = tuple(dict.fromkeys((broker_host, "127.0.0.1", "localhost")))
        ca.issue("broker", root / "pki", client=False, server=True, hosts=hosts, stem="broker")
        ca.issue(coordinator, keys, stem="coordinator-tls")
        made += ["pki/ (certificate authority, broker certificate)", "keys/coordinator-tls.crt"]
    config = root / "cloud.toml"
    if not config.exists():
        durable_write(config, _CLOUD_TOML.format(
            host=broker_host, port=broker_port, embedded="true" if embedded else "false", genesis=genesis,
            ingest_key=ingest_key, operator_key="" if operator_key else "# ", operator_path=operator_key or "",
            training_key="" if training_key else "# ", training_path=training_key or "",
            database=database_url or f"sqlite:///{(root / 'cloud.sqlite').resolve()}",
            coordinator=coordinator).encode())
        made.append("cloud.toml")
    return config, made


def _init_custodian(root: Path, keys: Path, *, genesis: Path, ledger_key: Path,
                    pkcs11: Pkcs11Settings | None) -> list[str]:
    """The custodian's folder (key, or the token's wrapped key; custodian.toml) and the
    coordinator's copy of its public key."""
    made: list[str] = []
    public_path, folder = keys / "custodian.pub", root / "custodian"
    if public_path.exists():
        return made
    if (keys / "custodian.key").exists():  # the layout before the custodian moved apart
        raise ConfigError(f"{keys / 'custodian.key'}: the custodian's private key is in the coordinator's "
                          f"keys; move it to {folder / 'keys' / 'custodian.key'} (the custodian's own), "
                          "then run init again to write the public key and custodian.toml")
    (folder / "keys").mkdir(parents=True, exist_ok=True)
    moved = folder / "keys" / "custodian.key"
    if pkcs11 is not None:
        public = provision_pkcs11(pkcs11)
        key_text = (f'[custodian.pkcs11]\nmodule = "{pkcs11.module}"\ntoken = "{pkcs11.token}"\n'
                    f'pin_file = "{pkcs11.pin_file}"\nwrapped = "{pkcs11.wrapped}"\n'
                    f'key_label = "{pkcs11.key_label}"\n')
        made.append(f"the custodian key in PKCS#11 token {pkcs11.token!r}")
    else:
        if moved.exists():
            public = RecipientKey.load(moved).public
        else:
            key = RecipientKey.generate()
            key.save(moved)
            public = key.public
            made.append("custodian/keys/custodian.key")
        key_text = ""
    public.save(public_path)
    made.append("keys/custodian.pub")
    durable_write(folder / "custodian.toml", _CUSTODIAN_TOML.format(
        key="# " if pkcs11 else "", genesis=genesis, ledger_key=ledger_key, store=(root / "objects").resolve(),
        pkcs11=key_text).encode())
    made.append("custodian/custodian.toml")
    return made


_CUSTODIAN_TOML = """\
# MedChain custodian: the only holder of the custodian key. Run it apart from the coordinator
# (its own user or host): `medchain cloud custodian --config custodian.toml`.

[custodian]
socket = "custodian.sock"          # the training service connects here (mode 0660)
serve = ["training"]               # principals whose signed requests are served
{key}key = "keys/custodian.key"      # X25519 key file (or [custodian.pkcs11]: a token)

[ledger]
genesis = "{genesis}"
key = "{ledger_key}"     # principal 'custodian': files access requests on behalf
principal = "custodian"

[store]
url = "{store}"
{pkcs11}"""


_CLOUD_TOML = """\
# MedChain cloud coordinator. Paths are relative to the state directory (--state-dir,
# default: the directory this file is in). Key files only: no key is ever written here.

[broker]
host = "{host}"
port = {port}
embedded = {embedded}          # true: the in-process broker (one machine); false: Mosquitto (mosquitto/mosquitto.conf)
# shared_group = "ingest"      # with a broker that has shared subscriptions: several workers split the load
workers = 1

[broker.tls]                   # mutual TLS: the coordinator is a client with a certificate of its own
ca = "pki/ca.crt"
cert = "keys/coordinator-tls.crt"
key = "keys/coordinator-tls.key"

[pki]
dir = "pki"                    # the deployment's CA (ca.key, mode 0600): issues every certificate
broker_dir = "mosquitto"       # generated mosquitto.conf and ACL, re-written on every enrolment
coordinator = "{coordinator}"

[ledger]
genesis = "{genesis}"
ingest_key = "{ingest_key}"       # principal 'ingest': registers images and signs acks
{operator_key}operator_key = "{operator_path}"   # principal 'operator': enrols and revokes devices
{training_key}training_key = "{training_path}"   # principal 'training': reads consented images, releases models
# api_key = "keys/api.key"       # principal 'api' (role api): `cloud api` files access requests with it
policy = "default"

[store]
url = "objects"                # a directory, file:///path, or s3://bucket/prefix

[database]
url = "{database}"

[keys]
custodian = "keys/custodian.pub"   # X25519 PUBLIC key: devices wrap data keys for it
model = "keys/model.key"           # Ed25519: signs model releases
meta = "keys/meta.key"             # X25519: devices seal envelope metadata for ingest

[custodian]
socket = "custodian/custodian.sock"   # the custodian process (the only holder of its private key)
"""


# the device profiles the edge ships with (firmware_configs/ beside the packages)
PROFILES = Path(__file__).resolve().parent.parent / "firmware_configs"


def _profile_text(name: str) -> str:
    path = PROFILES / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise ConfigError(f"no device profile {name!r}; known: {known}")
    return path.read_text()


def _ca(config: CloudConfig) -> CertificateAuthority:
    return CertificateAuthority.load(config.pki_dir)


def broker_security(config: CloudConfig) -> BrokerSecurity:
    """The files the embedded broker (or Mosquitto, through its conf) enforces."""
    pki = config.pki_dir
    return BrokerSecurity(ca=pki / "ca.crt", cert=pki / "broker.crt", key=pki / "broker.key",
                          crl=pki / "crl.pem", acl=config.broker_dir / "acl")


def rewrite_acl(config: CloudConfig, fleet: FleetRegistry, *, as_root: bool | None = None) -> Path:
    """The broker files from the registry's devices that are not revoked (send Mosquitto
    SIGHUP to apply; the embedded broker re-reads the ACL by itself)."""
    import os

    sec = broker_security(config)
    devices = [d.device_id for d in fleet.list() if not d.revoked]
    files = write_broker_files(config.broker_dir, host=config.endpoint.host, port=config.endpoint.port,
                               ca=sec.ca, cert=sec.cert, key=sec.key, crl=sec.crl, devices=devices,
                               coordinator=config.coordinator_name,
                               as_root=os.geteuid() == 0 if as_root is None else as_root)
    return files.acl


def profile_for_device(template: str, *, device_id: str, site: str, group: str, host: str, port: int) -> str:
    """A bundled profile's text with this device's identity and broker address filled in
    (every other setting, comments included, as the template has them)."""
    values = {"device": {"id": device_id, "site": site, "group": group},
              "mqtt": {"host": host, "port": port}}
    out, section = [], None
    for line in template.splitlines():
        header = re.match(r"^\[([^\]]+)\]", line)
        if header:
            section = header.group(1)
        key = re.match(r"^(\w+)\s*=", line)
        if key and section in values and key.group(1) in values[section]:
            value = values[section][key.group(1)]
            comment = line[line.index("#"):] if "#" in line else ""
            rendered = f'"{value}"' if isinstance(value, str) else str(value)
            line = f"{key.group(1)} = {rendered}" + (f"  {comment}" if comment else "")
        out.append(line)
    return "\n".join(out) + "\n"


def issue_kit(config: CloudConfig, fleet: FleetRegistry, *, device_id: str, public_key: VerifyKey, site: str,
              group: str, profile: str, out: str | Path, ledger: LedgerClient | None = None) -> Kit:
    """Enrol ``device_id`` and write its kit into ``out`` (``enrollment.json``,
    ``profile.toml``, ``keys/ca.pem``, ``keys/device.crt``, ``keys/device-tls.key``)."""
    out = Path(out)
    enrollment = enroll(config, fleet, device_id=device_id, public_key=public_key, site=site, group=group,
                        profile=profile, ledger=ledger)
    keys = out / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    enrollment_path = write_enrollment(enrollment, out / "enrollment.json")
    ca = _ca(config)
    shutil.copyfile(ca.cert_path, keys / "ca.pem")
    tls = ca.issue(device_id, keys, stem="device", key_stem="device-tls")
    text = profile_for_device(_profile_text(profile), device_id=device_id, site=site, group=group,
                              host=config.endpoint.host, port=config.endpoint.port)
    profile_path = durable_write(out / "profile.toml", text.encode())
    _record_issued(config, device_id, tls)
    rewrite_acl(config, fleet)
    return Kit(out, enrollment_path, profile_path, keys / "ca.pem", tls)


def revoke_device(config: CloudConfig, fleet: FleetRegistry, device_id: str, reason: str,
                  ledger: LedgerClient | None = None) -> None:
    """Ledger, registry, CRL and ACL: its envelopes are refused and it cannot connect."""
    revoke(config, fleet, device_id, reason, ledger=ledger)
    issued = config.pki_dir / "issued" / f"{device_id}.crt"
    if issued.exists():
        _ca(config).revoke(issued)
    rewrite_acl(config, fleet)


def rotate_certificate(config: CloudConfig, device_id: str, out: str | Path) -> Identity:
    """A new client certificate for one device in its kit's ``keys/``; the old one revoked."""
    keys = Path(out) / "keys"
    ca = _ca(config)
    issued = config.pki_dir / "issued" / f"{device_id}.crt"
    if issued.exists():
        ca.revoke(issued)
    tls = ca.issue(device_id, keys, stem="device", key_stem="device-tls")
    _record_issued(config, device_id, tls)
    return tls


def _record_issued(config: CloudConfig, device_id: str, tls: Identity) -> None:
    """Keep a copy of each device's current certificate, to revoke it by device id."""
    issued = config.pki_dir / "issued"
    issued.mkdir(exist_ok=True)
    durable_write(issued / f"{device_id}.crt", tls.cert.read_bytes())
