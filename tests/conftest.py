"""Fixtures shared by the whole suite.

Real services on loopback are used for real: PostgreSQL and Mosquitto. When one does not
answer (a laptop without them), tests that need it skip with the reason; with
``MEDCHAIN_REQUIRE_SERVICES=1`` (set by ``.ci/run``) a missing service fails instead, so CI
can never go green by skipping what it claims to test.

Both services are shared (other runs, other people, a coordinator started next), so a run
leaves nothing behind on them: what it creates carries the run's mark (:data:`RUN`: device
ids from ``new_device_id``, schemas ``t_<RUN>_...``), is removed when the test ends, and
the session fails if anything marked is still there at the end (in CI, on a machine of its
own, anything new at all).
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
RUN = uuid.uuid4().hex[:8]  # marks what this run creates on the shared services
STRICT = bool(os.environ.get("CI"))  # CI has the services to itself: anything new is ours


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


def _postgres_objects(engine) -> set[str]:
    """Every schema and every table outside the system catalogs, as ``schema`` and
    ``schema.table``."""
    from sqlalchemy import text

    with engine.connect() as conn:
        schemas = conn.execute(text("select nspname from pg_namespace where nspname not like 'pg\\_%' "
                                    "and nspname <> 'information_schema'")).scalars()
        found = set(schemas)
        found |= {f"{s}.{t}" for s, t in conn.execute(text(
            "select schemaname, tablename from pg_tables "
            "where schemaname not in ('pg_catalog', 'information_schema')"))}
    return found


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of the test database, checked by a real connection. At the end of the
    session, a schema of this run still there (or, in CI, any new schema or table) fails it."""
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
        before = _postgres_objects(engine)
    except Exception as exc:  # any driver error means: not usable here
        engine.dispose()
        service_missing("PostgreSQL", f"{url.render_as_string(hide_password=True)}: {exc}")
    try:
        yield POSTGRES_URL
        after = _postgres_objects(engine)
        left = {o for o in after if o.startswith(f"t_{RUN}_")} | (after - before if STRICT else set())
        with engine.begin() as conn:  # leave the database clean either way
            for schema in {o.split(".")[0] for o in left if o.startswith(f"t_{RUN}_")}:
                conn.execute(text(f'drop schema if exists "{schema}" cascade'))
        if left:
            pytest.fail(f"the test run left {len(left)} schema(s)/table(s) in PostgreSQL: {sorted(left)[:8]}",
                        pytrace=False)
    finally:
        engine.dispose()


@pytest.fixture
def postgres_schema(postgres_url):
    """A fresh schema of this test's own (marked with the run), dropped afterwards: tests can
    run in parallel and never see each other's tables."""
    from sqlalchemy import create_engine, text

    schema = f"t_{RUN}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()


@pytest.fixture
def postgres_schema_url(postgres_url, postgres_schema) -> str:
    """A PostgreSQL URL whose sessions live in this test's own schema (``search_path`` set by
    the URL, so it can go into a configuration file and another process)."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={postgres_schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def postgres_engine(postgres_url, postgres_schema):
    """An engine bound to this test's own schema."""
    from sqlalchemy import create_engine, event

    schema = postgres_schema
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


# -- a small real filesystem ----------------------------------------------------------------


@pytest.fixture
def small_tmpfs():
    """``small_tmpfs(path, size_mib)``: a real tmpfs of that size mounted at ``path`` (made if
    needed, unmounted after the test), so a full disk is the kernel's ENOSPC, not a pretend
    one. Mounting needs root: CI runs as root, or inside a user and mount namespace of its own
    (``unshare -rm``, see ``.ci/run``); elsewhere the test skips, and with
    ``MEDCHAIN_REQUIRE_SERVICES=1`` it fails."""
    import shutil
    import subprocess

    mounted: list[Path] = []

    def mount(path: Path, size_mib: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            service_missing("a small tmpfs", "no mount command on PATH")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            service_missing("a small tmpfs", f"cannot mount one at {path} (needs root, or a user namespace: "
                                             f"unshare -rm): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- Mosquitto -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    host: str
    port: int


def retained_topics(host: str, port: int, topic_filter: str = "medchain/#", timeout: float = 20.0) -> set[str]:
    """Topics under ``topic_filter`` that hold a retained message, as a subscriber arriving now
    sees them. The broker queues them when it takes the SUBSCRIBE; a message we publish after
    the SUBACK on a topic of the filter comes back behind them, so it ends the reading."""
    import paho.mqtt.client as mqtt

    sentinel = f"medchain/janitor/{RUN}/{uuid.uuid4().hex}"
    found: set[str] = set()
    done, subscribed = threading.Event(), threading.Event()

    def on_message(client, userdata, msg):
        if msg.topic == sentinel:
            done.set()
        elif msg.retain and msg.payload:
            found.add(msg.topic)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"janitor-{RUN}-{uuid.uuid4().hex[:6]}")
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(timeout):
            raise RuntimeError(f"no SUBACK from {host}:{port}")
        client.publish(sentinel, b"end", qos=1)
        if not done.wait(timeout):
            raise RuntimeError(f"{host}:{port} did not hand back the retained messages within {timeout:.0f} s")
    finally:
        client.loop_stop()
        client.disconnect()
    return found


def clear_retained(host: str, port: int, topics) -> None:
    """Publish an empty retained message on each topic: the broker then forgets its retained one."""
    import paho.mqtt.client as mqtt

    topics = sorted(topics)
    if not topics:
        return
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"janitor-{RUN}-{uuid.uuid4().hex[:6]}")
    client.connect(host, port, keepalive=10)
    client.loop_start()
    try:
        for info in [client.publish(t, b"", qos=1, retain=True) for t in topics]:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def ours(topics) -> set[str]:
    """The topics of devices made by ``new_device_id`` in this run."""
    return {t for t in topics if f"-{RUN}-" in t}


class _Janitor:
    """Whether the current test touched the shared Mosquitto (its retained messages are then
    cleared when the test ends)."""

    used = False


_JANITOR = _Janitor()


@pytest.fixture(scope="session")
def new_device_id():
    """``new_device_id(tag="edge")``: a fresh device id carrying this run's mark, so what its
    device leaves retained on the shared broker is found and cleared (and nothing else is)."""
    return lambda tag="edge": f"{tag}-{RUN}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def mosquitto_server() -> Broker:
    """The Mosquitto broker on loopback, checked by a real MQTT CONNECT/CONNACK. At the end of
    the session, a retained message of this run still there (or, in CI, any retained message
    under ``medchain/`` that was not there before) fails it; they are cleared either way."""
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
    before = retained_topics(MQTT_HOST, MQTT_PORT)
    yield Broker(MQTT_HOST, MQTT_PORT)
    now = retained_topics(MQTT_HOST, MQTT_PORT)
    left = ours(now) | (now - before if STRICT else set())
    clear_retained(MQTT_HOST, MQTT_PORT, left)
    if left:
        pytest.fail(f"the test run left {len(left)} retained message(s) on the shared Mosquitto "
                    f"{MQTT_HOST}:{MQTT_PORT}: {sorted(left)[:6]}", pytrace=False)


@pytest.fixture
def mosquitto(mosquitto_server) -> Broker:
    """The shared Mosquitto for one test; this run's retained messages are cleared after it."""
    _JANITOR.used = True
    return mosquitto_server


@pytest.fixture(autouse=True)
def _clear_retained_after_test():
    """Set up before every other fixture of a test, so torn down after all of them (sites,
    edges, uplinks have stopped publishing): then clear what the test left retained."""
    yield
    if _JANITOR.used:
        _JANITOR.used = False
        clear_retained(MQTT_HOST, MQTT_PORT, ours(retained_topics(MQTT_HOST, MQTT_PORT)))


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


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    """The path of the ``mosquitto`` broker program (tests start private brokers with it)."""
    import shutil

    path = shutil.which("mosquitto")
    if path is None:
        service_missing("the mosquitto binary", "not on PATH (Debian package mosquitto)")
    return path


@pytest.fixture
def private_mosquitto(tmp_path, mosquitto_binary):
    broker = MosquittoProcess(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def tls_mosquitto(tmp_path, mosquitto_binary):
    """A private Mosquitto whose only listener is TLS with client certificates required;
    ``tls_mosquitto.pki`` holds the CA, the client certificates and a rogue CA."""
    broker = MosquittoProcess(tmp_path / "mosquitto-tls", pki=issue_pki(tmp_path / "pki"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def embedded_endpoint():
    """The endpoint of an embedded broker of this test's own."""
    from cloud.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.endpoint


@pytest.fixture
def mosquitto_endpoint(mosquitto):
    """The endpoint of the shared Mosquitto."""
    from medchain.mqtt import MqttEndpoint

    return MqttEndpoint(host=mosquitto.host, port=mosquitto.port, max_message_bytes=8 * 1024 * 1024,
                        reconnect_min_s=0.2, reconnect_max_s=1.0)


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_endpoint(request):
    """Each integration test runs on the embedded broker and on the real Mosquitto."""
    return request.getfixturevalue(f"{request.param}_endpoint")


@pytest.fixture(scope="session")
def mosquitto_sub() -> str:
    """The path of the ``mosquitto_sub`` command-line client, to look at a broker the way
    an operator would."""
    import shutil

    path = shutil.which("mosquitto_sub")
    if path is None:
        service_missing("mosquitto_sub", "not on PATH (Debian package mosquitto-clients)")
    return path


# -- a PKCS#11 token ------------------------------------------------------------------------

SOFTHSM_MODULE = Path(os.environ.get("MEDCHAIN_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory):
    """``softhsm_token(key_label)``: ``Pkcs11Settings`` for a key of that label in a real
    SoftHSM2 token initialised in this session's own folder (``SOFTHSM2_CONF``; the library
    reads it once per process, so the token is one per session, keys one per label). Skips
    (fails in CI) without python-pkcs11 or Debian's softhsm2."""
    import shutil
    import subprocess

    try:
        import pkcs11  # noqa: F401
    except ImportError:
        service_missing("python-pkcs11", "not installed (pip install -e '.[hsm]')")
    if not SOFTHSM_MODULE.is_file() or shutil.which("softhsm2-util") is None:
        service_missing("SoftHSM2", f"{SOFTHSM_MODULE} or softhsm2-util missing (Debian package softhsm2)")
    from cloud.keybackend import Pkcs11Settings
    from medchain.identity import write_secret_file

    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # child processes (the custodian) find the token too
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "medchain", "--so-pin", "0000",
                    "--pin", "1234"], check=True, capture_output=True)
    write_secret_file(root / "pin", b"1234\n")

    def settings(key_label: str) -> Pkcs11Settings:
        return Pkcs11Settings(module=SOFTHSM_MODULE, token="medchain", pin_file=root / "pin",
                              wrapped=root / f"{key_label}.wrapped", key_label=key_label)

    yield settings
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous
