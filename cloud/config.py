"""The cloud coordinator's configuration (TOML), checked as strictly as device profiles.

Relative paths resolve against the state directory. Holds paths to key files, never keys.
``medchain cloud init`` writes one with every field::

    [broker]      host, port, embedded, shared_group, workers, max_message_bytes, [broker.tls]
    [ledger]      genesis, ingest_key, operator_key, training_key, api_key, api_name, policy
    [store]       url        (a directory, file:///dir, or s3://bucket/prefix)
    [database]    url        (SQLAlchemy: sqlite:///cloud.sqlite, postgresql+psycopg://...)
    [keys]        custodian (the custodian's PUBLIC key file), model, meta
    [custodian]   socket     (where the custodian process listens: training reads through it)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medchain.errors import ConfigError
from medchain.mqtt import MqttEndpoint
from medchain.settings import Section, read_toml

__all__ = ["CloudConfig", "load_config", "parse_config", "ConfigError"]


@dataclass(frozen=True)
class CloudConfig:
    endpoint: MqttEndpoint
    embedded_broker: bool
    shared_group: str | None
    workers: int
    genesis: Path
    ingest_key: Path
    operator_key: Path | None
    training_key: Path | None
    policy: str
    store_url: str
    database_url: str
    custodian_key: Path
    model_key: Path
    state_dir: Path
    meta_key: Path = Path("keys/meta.key")  # X25519: devices seal envelope metadata for ingest
    # the deployment's certificate authority, the generated broker files, and the name of the
    # coordinator's certificate (its MQTT user in the ACL)
    pki_dir: Path | None = None
    broker_dir: Path | None = None
    coordinator_name: str = "cloud-coordinator"
    # the custodian process's Unix socket (cloud.custodian_service): the only way to a data key
    custodian_socket: Path | None = None
    # the HTTP API's ledger principal (role ``api``): files access requests on a signer's behalf
    api_key: Path | None = None
    api_name: str = "api"


def load_config(path: str | Path, state_dir: str | Path | None = None) -> CloudConfig:
    """Read and check ``path``; relative paths in it resolve against ``state_dir`` (default:
    the folder the file is in)."""
    path = Path(path)
    return parse_config(read_toml(path, ConfigError, "cloud configuration"),
                        origin=str(path), state_dir=path.resolve().parent if state_dir is None else state_dir)


def parse_config(raw: dict[str, Any], *, origin: str = "cloud configuration",
                 state_dir: str | Path | None = None) -> CloudConfig:
    base = Path(state_dir) if state_dir is not None else Path.cwd()
    top = dict(raw)

    def section(name: str) -> Section:
        if name not in top:
            raise ConfigError(f"{origin}: section [{name}] missing")
        return Section(origin, name, top.pop(name), base, ConfigError)

    b = section("broker")
    embedded = b.bool("embedded", False)
    tls = b.sub("tls")
    ca, cert, key = (tls.path(k, None) for k in ("ca", "cert", "key"))
    tls.done()
    endpoint = MqttEndpoint(host=b.str("host", "127.0.0.1"), port=b.int("port", 1883, lo=0, hi=65535),
                            tls_ca=str(ca) if ca else None, tls_cert=str(cert) if cert else None,
                            tls_key=str(key) if key else None,
                            keepalive=b.int("keepalive", 30, lo=5, hi=65535),
                            max_message_bytes=b.int("max_message_bytes", 256 * 1024**2, lo=1024))
    shared = b.str("shared_group", "", empty=True) or None
    workers = b.int("workers", 1, lo=1, hi=64)
    b.done()
    if embedded and shared:
        raise ConfigError(f"{origin}: [broker] shared_group: the embedded broker has no shared subscriptions")

    s = section("ledger")
    genesis, ingest_key = s.path("genesis"), s.path("ingest_key")
    operator_key, policy = s.path("operator_key", None), s.str("policy", "default")
    training_key = s.path("training_key", None)
    api_key, api_name = s.path("api_key", None), s.str("api_name", "api")
    s.done()

    s = section("store")
    url = s.str("url")
    store_url = url if "://" in url else str(base / url)
    s.done()

    s = section("database")
    database_url = s.str("url")
    s.done()

    s = section("keys")
    custodian, model = s.path("custodian"), s.path("model")
    meta_key = s.path("meta", "keys/meta.key")
    s.done()

    s = Section(origin, "pki", top.pop("pki", {}), base, ConfigError)
    pki_dir, broker_dir = s.path("dir", "pki"), s.path("broker_dir", "mosquitto")
    coordinator = s.str("coordinator", "cloud-coordinator")
    s.done()

    s = Section(origin, "custodian", top.pop("custodian", {}), base, ConfigError)
    custodian_socket = s.path("socket", None)
    s.done()

    if top:
        raise ConfigError(f"{origin}: unknown section(s): {', '.join(sorted(top))}")
    return CloudConfig(endpoint, embedded, shared, workers, genesis, ingest_key, operator_key,
                       training_key, policy, store_url, database_url, custodian, model, base,
                       meta_key, pki_dir, broker_dir, coordinator, custodian_socket, api_key, api_name)
