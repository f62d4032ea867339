"""Fixtures shared by the whole suite.

Real services on loopback are used for real: PostgreSQL and Mosquitto. When one does not
answer (a laptop without them), tests that need it skip with the reason; with
``MEDCHAIN_REQUIRE_SERVICES=1`` (set by ``.ci/run``) a missing service fails instead, so CI
can never go green by skipping what it claims to test.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

POSTGRES_URL = os.environ.get(
    "MEDCHAIN_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MQTT_HOST = os.environ.get("MEDCHAIN_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("MEDCHAIN_TEST_MQTT_PORT", "1883"))


def service_missing(what: str, reason: str) -> None:
    """Skip (or, when services are required, fail) with a reason people can act on."""
    message = f"{what} is not available: {reason}"
    if os.environ.get("MEDCHAIN_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (MEDCHAIN_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def need_tools():
    """``need_tools("openssl", "mosquitto")``: each command on PATH, or skip (fail in CI)."""
    import shutil

    def need(*names: str) -> None:
        for name in names:
            if shutil.which(name) is None:
                service_missing(name, "not on PATH (its Debian package is not installed)")
    return need


def _port_open(host: str, port: int, timeout: float = 2.0) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"nothing answers on {host}:{port} ({exc.strerror or exc})"


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of the test database, checked by a real connection."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL)
    closed = _port_open(url.host or "127.0.0.1", url.port or 5432)
    if closed:
        service_missing("PostgreSQL", closed)
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # any driver error means: not usable here
        service_missing("PostgreSQL", f"{url.render_as_string(hide_password=True)}: {exc}")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture
def postgres_engine(postgres_url):
    """An engine bound to a fresh schema of its own, dropped afterwards (tests can run in
    parallel and never see each other's tables)."""
    from sqlalchemy import create_engine, event, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    engine = create_engine(postgres_url)

    @event.listens_for(engine, "connect")
    def _search_path(dbapi_conn, _record):
        with dbapi_conn.cursor() as cur:
            cur.execute(f'set search_path to "{schema}"')
        dbapi_conn.commit()

    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()


# -- Mosquitto -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    host: str
    port: int


@pytest.fixture(scope="session")
def mosquitto() -> Broker:
    """The Mosquitto broker on loopback, checked by a real MQTT CONNECT/CONNACK."""
    import paho.mqtt.client as mqtt

    closed = _port_open(MQTT_HOST, MQTT_PORT)
    if closed:
        service_missing("Mosquitto", closed)
    connected = threading.Event()
    outcome: list = []

    def on_connect(client, userdata, flags, reason_code, properties):
        outcome.append(reason_code)
        connected.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}")
    client.on_connect = on_connect
    try:
        client.connect(MQTT_HOST, MQTT_PORT, keepalive=10)
        client.loop_start()
        if not connected.wait(5):
            service_missing("Mosquitto", f"no CONNACK from {MQTT_HOST}:{MQTT_PORT} within 5 s")
        if outcome[0].is_failure:
            service_missing("Mosquitto", f"CONNECT refused: {outcome[0]}")
    except OSError as exc:
        service_missing("Mosquitto", f"{MQTT_HOST}:{MQTT_PORT}: {exc}")
    finally:
        client.loop_stop()
        client.disconnect()
    return Broker(MQTT_HOST, MQTT_PORT)


# -- brokers for integration tests -----------------------------------------------------------


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and client
    certificates, plus a second, unrelated CA with a client of its own (for refusals)."""

    ca: Path
    server: TlsIdentity
    clients: dict[str, TlsIdentity]
    rogue_ca: Path
    rogue_client: TlsIdentity


def issue_pki(directory: Path, clients: tuple[str, ...] = ("edge", "cloud", "probe")) -> Pki:
    """Generate the CA, server and client certificates of :class:`Pki` into ``directory``
    (EC P-256 keys, valid for one day, keys written with mode 0600)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedChain test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        return path

    def write_cert(cert, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def authority(cn: str, stem: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(cn, name(cn), key.public_key())
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert, write_cert(cert, directory / f"{stem}.crt")

    def leaf(cn: str, stem: str, ca_key, ca_cert, server: bool) -> TlsIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (builder(cn, ca_cert.subject, key.public_key())
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return TlsIdentity(write_cert(cert, directory / f"{stem}.crt"),
                           write_key(key, directory / f"{stem}.key"))

    ca_key, ca_cert, ca_path = authority("MedChain test CA", "ca")
    rogue_key, rogue_cert, rogue_path = authority("Some other CA", "rogue-ca")
    return Pki(
        ca=ca_path,
        server=leaf("127.0.0.1", "server", ca_key, ca_cert, server=True),
        clients={c: leaf(c, f"client-{c}", ca_key, ca_cert, server=False) for c in clients},
        rogue_ca=rogue_path,
        rogue_client=leaf("rogue", "client-rogue", rogue_key, rogue_cert, server=False),
    )


class MosquittoProcess:
    """A private Mosquitto on a free port that a test may stop and restart at will (the
    machine's own broker is shared and must never be stopped by a test). With ``pki`` its
    only listener is TLS and requires a client certificate signed by ``pki.ca``."""

    def __init__(self, workdir, pki: Pki | None = None):
        from cloud.broker import free_port

        self.port = free_port()
        self.workdir = workdir
        self.pki = pki
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        tls = (f"cafile {pki.ca}\ncertfile {pki.server.cert}\nkeyfile {pki.server.key}\n"
               f"require_certificate true\n") if pki else ""
        # run as root, mosquitto would switch to its own user and could then read neither
        # our 0600 keys nor write its log and persistence files here: stay who we are
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"{user}listener {self.port} 127.0.0.1\n{tls}allow_anonymous true\n"
            f"persistence true\npersistence_location {workdir / 'data'}/\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
        )
        self.proc = None

    def start(self) -> None:
        import subprocess
        import time

        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while _port_open("127.0.0.1", self.port, timeout=0.2):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else "(no log)"
                raise RuntimeError(f"private mosquitto on {self.port} did not start:\n{log[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def endpoint(self):
        """A plain endpoint, or for a TLS broker one without a client certificate."""
        from medchain.mqtt import MqttEndpoint

        return MqttEndpoint(host="127.0.0.1", port=self.port, max_message_bytes=8 * 1024 * 1024,
                            reconnect_min_s=0.2, reconnect_max_s=1.0,
                            tls_ca=str(self.pki.ca) if self.pki else None)

    def endpoint_as(self, client: TlsIdentity, ca: Path | None = None):
        """The TLS endpoint of a client presenting ``client``'s certificate."""
        import dataclasses

        return dataclasses.replace(self.endpoint, tls_ca=str(ca or self.pki.ca),
                                   tls_cert=str(client.cert), tls_key=str(client.key))


@pytest.fixture
def private_mosquitto(tmp_path):
    import shutil

    if shutil.which("mosquitto") is None:
        service_missing("the mosquitto binary", "not on PATH (Debian package mosquitto)")
    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def tls_mosquitto(tmp_path):
    """A private Mosquitto whose only listener is TLS with client certificates required;
    ``tls_mosquitto.pki`` holds the CA, the client certificates and a rogue CA."""
    import shutil

    if shutil.which("mosquitto") is None:
        service_missing("the mosquitto binary", "not on PATH (Debian package mosquitto)")
    broker = MosquittoProcess(tmp_path / "mosquitto-tls", pki=issue_pki(tmp_path / "pki"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_endpoint(request):
    """Each integration test runs on the embedded broker and on the real Mosquitto."""
    from medchain.mqtt import MqttEndpoint

    if request.param == "mosquitto":
        found = request.getfixturevalue("mosquitto")
        yield MqttEndpoint(host=found.host, port=found.port, max_message_bytes=8 * 1024 * 1024,
                           reconnect_min_s=0.2, reconnect_max_s=1.0)
        return
    from cloud.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.endpoint


@pytest.fixture(scope="session")
def mosquitto_sub() -> str:
    """The path of the ``mosquitto_sub`` command-line client, to look at a broker the way
    an operator would."""
    import shutil

    path = shutil.which("mosquitto_sub")
    if path is None:
        service_missing("mosquitto_sub", "not on PATH (Debian package mosquitto-clients)")
    return path
