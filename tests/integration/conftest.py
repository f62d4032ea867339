"""A whole site on this machine for end-to-end tests: a real 4-validator ledger (OS
processes), a cloud coordinator, an enrolled edge agent, and the simulated scanner sending
by C-STORE — over the embedded broker and over the real Mosquitto."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloud.config import parse_config
from cloud.coordinator import Coordinator
from cloud.enrolment import enroll, write_enrollment
from edge_agent.config import load_profile, profile_path
from edge_agent.service import EdgeAgent
from ledger.cluster import LocalCluster
from medchain.identity import RecipientKey, SigningKey
from medchain.identity import load_secret, new_secret
from scanner_sim.sender import items_from_datasets, send
from scanner_sim.studies import generate_studies


@pytest.fixture(scope="module")
def ledger_cluster(tmp_path_factory):
    """One real 4-validator cluster per test module (starting one costs seconds)."""
    with LocalCluster(n=4, workdir=tmp_path_factory.mktemp("ledger")) as cluster:
        yield cluster


class SecureBroker:
    """A broker set up as a deployment's is (:mod:`cloud.provision`'s pieces): a CA of its own,
    mutual TLS only, no anonymous clients, each certificate's subject its MQTT user, and an
    ACL from :func:`cloud.brokerconf.acl_text` naming the admitted devices; a private
    Mosquitto started from the generated ``mosquitto.conf`` (re-read on SIGHUP) or the
    embedded broker enforcing the same files.

    ``admit(device_id)`` issues the device's certificate and puts its topics in the ACL, as
    ``cloud enroll`` does; ``insider(name)`` is a broker account whose ACL lets it publish on
    every device's envelope topic and read every ack (a compromised broker or a mistaken
    ACL), for the tests of what ingest must refuse on its own."""

    COORDINATOR = "cloud-coordinator"

    def __init__(self, workdir: Path, kind: str):
        from medchain.pki import CertificateAuthority

        self.workdir, self.kind = workdir, kind
        self.ca = CertificateAuthority.create(workdir / "pki", "MedChain test")
        self.ca.issue("broker", workdir / "pki", client=False, server=True, hosts=("127.0.0.1", "localhost"),
                      stem="broker")
        self.coordinator = self.ca.issue(self.COORDINATOR, workdir / "pki", stem="coordinator-tls")
        self.devices: list[str] = []
        self.insiders: list[str] = []
        from cloud.broker import free_port

        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.embedded = None
        self._write()

    @property
    def security(self):
        from cloud.broker import BrokerSecurity

        pki = self.workdir / "pki"
        return BrokerSecurity(ca=pki / "ca.crt", cert=pki / "broker.crt", key=pki / "broker.key",
                              crl=pki / "crl.pem", acl=self.workdir / "mosquitto" / "acl")

    def _write(self) -> None:
        import os

        from cloud.brokerconf import acl_text, write_broker_files
        from medchain.durable import durable_write
        from medchain.protocol import ack_topic, envelope_topic

        sec = self.security
        files = write_broker_files(self.workdir / "mosquitto", host="127.0.0.1", port=self.port, ca=sec.ca,
                                   cert=sec.cert, key=sec.key, crl=sec.crl, devices=self.devices,
                                   coordinator=self.COORDINATOR, as_root=os.geteuid() == 0)
        self.conf = files.conf
        if self.insiders:
            text = acl_text(self.devices, self.COORDINATOR) + "".join(
                f"\nuser {name}\ntopic write {envelope_topic('+')}\ntopic read {ack_topic('+')}\n"
                for name in self.insiders)
            durable_write(files.acl, text.encode())
        if self.proc is not None and self.proc.poll() is None:
            import signal

            self.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)  # Mosquitto re-reads the ACL in its main loop

    def start(self) -> None:
        if self.kind == "embedded":
            from cloud.broker import EmbeddedBroker

            self.embedded = EmbeddedBroker("127.0.0.1", self.port, security=self.security)
            self.embedded.start()
            return
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                log = self.workdir / "mosquitto" / "mosquitto.log"
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    text = log.read_text()[-2000:] if log.exists() else "(no log)"
                    raise RuntimeError(f"mosquitto from the generated conf did not start:\n{text}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def endpoint_for(self, identity):
        from medchain.mqtt import MqttEndpoint

        return MqttEndpoint(host="127.0.0.1", port=self.port, max_message_bytes=8 * 1024 * 1024,
                            reconnect_min_s=0.2, reconnect_max_s=1.0, tls_ca=str(self.ca.cert_path),
                            tls_cert=str(identity.cert), tls_key=str(identity.key))

    @property
    def coordinator_endpoint(self):
        return self.endpoint_for(self.coordinator)

    def admit(self, device_id: str, out_dir: Path | None = None):
        """The device's certificate (``device.crt``, ``device-tls.key`` in ``out_dir``) and
        its topics in the ACL."""
        identity = self.ca.issue(device_id, out_dir or self.workdir / "devices" / device_id, stem="device",
                                 key_stem="device-tls")
        self.devices.append(device_id)
        self._write()
        return identity

    def insider(self, name: str):
        identity = self.ca.issue(name, self.workdir / "insiders" / name)
        self.insiders.append(name)
        self._write()
        return self.endpoint_for(identity)


def wait_for(predicate, timeout: float = 60.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


@pytest.fixture(name="wait_for")
def wait_for_fixture():
    """``wait_for(predicate, timeout)`` for tests (test modules cannot import each other)."""
    return wait_for


class Site:
    """The cloud (coordinator) and one edge device, sharing a broker and a ledger.

    ``edge_endpoint`` lets the edge reach the broker differently from the cloud (its own TLS
    client certificate); ``cloud`` adds or overrides keys of the cloud configuration's
    sections (``{"broker": {"shared_group": "g"}, "database": {"url": ...}}``). A cloud
    endpoint with TLS files is written into ``[broker.tls]``, so the configuration is parsed
    as an operator's would be.
    """

    def __init__(self, root: Path, cluster: LocalCluster, endpoint, device_id: str, *,
                 edge_endpoint=None, cloud: dict | None = None, broker: SecureBroker | None = None):
        self.root, self.cluster, self.endpoint, self.device_id = root, cluster, endpoint, device_id
        self.broker = broker
        self.edge_endpoint = edge_endpoint or endpoint
        cloud_dir = root / "cloud"
        (cloud_dir / "keys").mkdir(parents=True)
        # the custodian's key in a folder of its own; the coordinator gets the public key only
        self.custodian_dir = root / "custodian"
        self.custodian = RecipientKey.generate()
        self.custodian.save(self.custodian_dir / "keys" / "custodian.key")
        self.custodian.public.save(cloud_dir / "keys" / "custodian.pub")
        SigningKey.generate().save(cloud_dir / "keys" / "model.key")
        RecipientKey.generate().save(cloud_dir / "keys" / "meta.key")
        broker = {"host": endpoint.host, "port": endpoint.port}
        if endpoint.tls_ca:
            broker["tls"] = {k: v for k, v in (("ca", endpoint.tls_ca), ("cert", endpoint.tls_cert),
                                                ("key", endpoint.tls_key)) if v}
        raw = {
            "broker": broker,
            "ledger": {"genesis": str(cluster.genesis_path), "ingest_key": str(cluster.key_path("ingest")),
                       "operator_key": str(cluster.key_path("operator")),
                       "training_key": str(cluster.key_path("training"))},
            "store": {"url": "objects"},
            "database": {"url": f"sqlite:///{cloud_dir / 'cloud.sqlite'}"},
            "keys": {"custodian": "keys/custodian.pub", "model": "keys/model.key"},
            "custodian": {"socket": str(self.custodian_dir / "custodian.sock")},
        }
        for section, values in (cloud or {}).items():
            raw[section] = {**raw.get(section, {}), **values}
        self.config = parse_config(raw, state_dir=cloud_dir)
        self.coordinator = Coordinator(self.config, endpoint=endpoint)
        self.edge_dir = root / "edge"
        (self.edge_dir / "keys").mkdir(parents=True)
        self.device_key = SigningKey.generate()
        self.device_key.save(self.edge_dir / "keys" / "device.key")
        new_secret(self.edge_dir / "keys" / "site.secret")
        self.secret = load_secret(self.edge_dir / "keys" / "site.secret")
        raw_profile = load_profile(profile_path("x86-cpu"), base_dir=self.edge_dir)
        self.profile = dataclasses.replace(
            raw_profile, device=dataclasses.replace(raw_profile.device, id=device_id),
            uplink=dataclasses.replace(raw_profile.uplink, resend_after_s=3.0, heartbeat_s=1.0))
        self.agent: EdgeAgent | None = None
        self.procs: list[subprocess.Popen] = []

    def admit(self) -> None:
        """On a :class:`SecureBroker`: the device's certificate where its profile's
        ``[mqtt.tls]`` names it, and its topics in the broker's ACL (``cloud enroll``'s kit)."""
        import shutil

        keys = self.edge_dir / "keys"
        tls = self.profile.mqtt.tls
        identity = self.broker.admit(self.device_id, keys)
        assert (tls.ca, tls.cert, tls.key) == (keys / "ca.pem", identity.cert, identity.key)
        shutil.copyfile(self.broker.ca.cert_path, tls.ca)
        self.edge_endpoint = dataclasses.replace(self.broker.endpoint_for(identity), tls_ca=str(tls.ca))

    def insider(self):
        """An endpoint that may publish on this device's envelope topic and read its acks:
        someone else on a broker whose ACL does not protect the device."""
        if self.broker is None:
            return self.endpoint
        return self.broker.insider(f"insider-{len(self.broker.insiders)}")

    def enroll(self) -> None:
        if self.broker is not None and self.device_id not in self.broker.devices:
            self.admit()
        enrollment = enroll(self.config, self.coordinator.fleet, device_id=self.device_id,
                            public_key=self.device_key.public, site="site-a", group="x86-cpu",
                            profile="x86-cpu")
        write_enrollment(enrollment, self.profile.cloud.enrollment)

    def start_edge(self) -> EdgeAgent:
        self.agent = EdgeAgent(self.profile, self.secret, endpoint=self.edge_endpoint, port=0,
                               host="127.0.0.1")
        self.agent.start()
        return self.agent

    def stop_edge(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def send(self, modality: str, studies: int, seed: int, per_study: int = 2):
        sims = generate_studies(modality, studies, seed=seed, images_per_study=per_study)
        datasets = [ds for st in sims for ds in st.datasets]
        result = send("127.0.0.1", self.agent.node.port, items_from_datasets(datasets),
                      calling_ae=f"SCANNER_{modality}", called_ae=self.profile.dicom.ae_title,
                      concurrency=2, progress=False)
        return sims, result

    def settled(self, timeout: float = 90.0) -> bool:
        """Everything received was handed to the packager and everything queued was acked."""
        agent = self.agent
        return wait_for(lambda: not agent.node.spool.pending() and agent.node.drain(0.1)
                        and agent.outbox.depth == 0, timeout)

    # -- the same site as separate OS processes, for crash tests ----------------------------

    def cloud_config_file(self) -> Path:
        path = self.root / "cloud" / "cloud.toml"
        c = self.config
        path.write_text(
            f'[broker]\nhost = "{self.endpoint.host}"\nport = {self.endpoint.port}\n\n'
            f'[ledger]\ngenesis = "{c.genesis}"\ningest_key = "{c.ingest_key}"\n'
            f'operator_key = "{c.operator_key}"\ntraining_key = "{c.training_key}"\n\n[store]\nurl = "{c.store_url}"\n\n'
            f'[database]\nurl = "{c.database_url}"\n\n'
            f'[keys]\ncustodian = "{c.custodian_key}"\nmodel = "{c.model_key}"\nmeta = "{c.meta_key}"\n\n'
            f'[custodian]\nsocket = "{c.custodian_socket}"\n')
        if self.endpoint.tls_ca:
            with path.open("a") as f:
                f.write(f'\n[broker.tls]\nca = "{self.endpoint.tls_ca}"\ncert = "{self.endpoint.tls_cert}"\n'
                        f'key = "{self.endpoint.tls_key}"\n')
        return path

    def custodian_config_file(self) -> Path:
        """The custodian's own configuration (its key file, the ledger's ``custodian``
        principal, the coordinator's store), for ``medchain cloud custodian``."""
        path = self.custodian_dir / "custodian.toml"
        path.write_text(
            f'[custodian]\nsocket = "{self.config.custodian_socket}"\nkey = "keys/custodian.key"\n\n'
            f'[ledger]\ngenesis = "{self.cluster.genesis_path}"\nkey = "{self.cluster.key_path("custodian")}"\n\n'
            f'[store]\nurl = "{self.config.store_url}"\n')
        return path

    def spawn_custodian(self) -> subprocess.Popen:
        """The custodian as its own OS process, as an operator runs it."""
        return self.spawn("cloud", "custodian", "--config", str(self.custodian_config_file()))

    def edge_profile_file(self) -> Path:
        """The x86-cpu profile with this site's device id and broker (its kit's TLS files
        on a :class:`SecureBroker`)."""
        text = profile_path("x86-cpu").read_text()
        text = text.replace('id = "x86-cpu-001"', f'id = "{self.device_id}"')
        head, _, rest = text.partition("[mqtt]")
        _, _, after = rest.partition("[outbox]")
        e = self.edge_endpoint
        mqtt = f'[mqtt]\nhost = "{e.host}"\nport = {e.port}\nkeepalive = 30\nmax_message_bytes = 8388608\n\n'
        if e.tls_cert:
            mqtt += f'[mqtt.tls]\nca = "{e.tls_ca}"\ncert = "{e.tls_cert}"\nkey = "{e.tls_key}"\n\n'
        text = head + mqtt + "[outbox]" + after
        text = text.replace("resend_after_s = 30", "resend_after_s = 3").replace("heartbeat_s = 30", "heartbeat_s = 1")
        path = self.edge_dir / "profile.toml"
        path.write_text(text)
        return path

    def spawn(self, *args: str) -> subprocess.Popen:
        """A ``medchain`` process; returns once it printed its ready line."""
        proc = subprocess.Popen([sys.executable, "-m", "medchain_app.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if " ready" in line:
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return proc
            if not line and proc.poll() is not None:
                break
        proc.kill()
        raise AssertionError("process did not become ready:\n" + "".join(lines[-30:]))

    def spawn_cloud(self) -> subprocess.Popen:
        return self.spawn("cloud", "run", "--config", str(self.cloud_config_file()))

    def spawn_edge(self, port: int) -> subprocess.Popen:
        return self.spawn("edge", "run", "--config", str(self.edge_profile_file()), "--state-dir",
                          str(self.edge_dir), "--port", str(port), "--host", "127.0.0.1")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.stop_edge()
        self.coordinator.stop()


@pytest.fixture
def site_on(tmp_path, ledger_cluster, new_device_id):
    """``site_on(endpoint, device_id=None, **Site options)``: a site on a given broker
    (closed after the test)."""
    sites = []

    def make(endpoint, device_id: str | None = None, **options) -> Site:
        device_id = device_id or new_device_id()
        site = Site(tmp_path / f"site{len(sites)}", ledger_cluster, endpoint, device_id, **options)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """The cloud's database, once SQLite (a file of the test's own) and once PostgreSQL (a
    schema of the test's own), for tests that run on one broker."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_schema_url")
    return f"sqlite:///{tmp_path / 'cloud-db.sqlite'}"


@pytest.fixture
def make_site(deployment, site_on):
    """A site on the embedded broker with SQLite, and again on a real Mosquitto with
    PostgreSQL (the catalog, fleet registry, prediction log and releases of its cloud), both
    brokers with mutual TLS and the generated ACL. The deployment comes first, so its broker
    and schema outlive the sites."""
    broker, database_url = deployment
    cloud = {"database": {"url": database_url}} if database_url else None
    return lambda device_id=None: site_on(broker.coordinator_endpoint, device_id, cloud=cloud, broker=broker)


@pytest.fixture
def secure_mosquitto(tmp_path, mosquitto_binary):
    """A private Mosquitto from the generated configuration (mutual TLS, the ACL)."""
    broker = SecureBroker(tmp_path / "broker-secure", "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(params=["embedded-sqlite", "mosquitto-postgres"])
def deployment(request, tmp_path):
    """``(SecureBroker, database_url)``: as on one machine (the embedded broker, SQLite:
    ``None``, the default) and as in a hospital's data centre (Mosquitto from the generated
    configuration, PostgreSQL in a schema of the test's own). Pairing them keeps each such
    test at two runs, not four."""
    kind, database = request.param.split("-")
    if kind == "mosquitto":
        request.getfixturevalue("mosquitto_binary")
    broker = SecureBroker(tmp_path / f"broker-{kind}", kind)
    broker.start()
    try:
        yield broker, request.getfixturevalue("postgres_schema_url") if database == "postgres" else None
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def model_runs(tmp_path_factory):
    """Two small finished training runs (different seeds), their cards marked as CR models
    so the edge runs them on CR images: what `medchain train` leaves, trained in seconds."""
    import dataclasses as dc

    from models.card import ModelCard
    from models.pipeline import train_run
    from models.synthetic import write_synthetic_npz
    from models.training import Recipe

    root = tmp_path_factory.mktemp("runs")
    tiny = {"stem_channels": [8, 16], "embed_dim": 16, "depth": 1, "heads": 2, "head_hidden": 16}
    runs = []
    for seed in (1, 2):
        data = write_synthetic_npz(root / f"data{seed}.npz", {"train": 96, "val": 32}, seed=seed)
        out = root / f"run{seed}"
        train_run(data, out, Recipe(epochs=2, batch_size=32, seed=seed, model=tiny, augment=[]),
                  progress=False)
        card = ModelCard.load(out / "model_card.json")
        dc.replace(card, data={**card.data, "modality": "CR"}).save(out / "model_card.json")
        runs.append(out)
    return runs


# -- access for people: a custodian server beside the module's ledger, principals on demand ----

ACCESS_DEVICE = SigningKey.generate()
ACCESS_DEVICE_ID = "dev-access"
_access_seq = iter(range(1, 1_000_000))


def dicom_bytes(text: str) -> bytes:
    """A small DICOM file (Part 10) with ``text`` as its study description."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.PatientID, ds.StudyDescription = "tok-pseudonym", text
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclasses.dataclass
class AccessWorld:
    cluster: LocalCluster
    server: object  # CustodianServer
    store: object   # LocalObjectStore
    ingest: object  # LedgerClient
    operator: object
    public: object

    def image(self, consent=("diagnosis",), patient=None, study="st", series="se",
              study_date=None) -> tuple[str, str, bytes]:
        """Seal, store and register one image; (envelope id, patient token, DICOM bytes)."""
        import os

        from ledger.transactions import ImageRegistered
        from medchain.sealing import new_object_key, package

        data = dicom_bytes(f"image {os.urandom(4).hex()}")
        env = package({"dicom": data}, new_object_key(self.public), device_id=ACCESS_DEVICE_ID,
                      sequence=next(_access_seq), signer=ACCESS_DEVICE, created_ms=0)
        self.store.put(env)
        h = env.header
        patient = patient or f"tok-{os.urandom(4).hex()}"
        r = self.ingest.submit(ImageRegistered(h.object_id, h.merkle_root, patient, study, series, "in",
                                               "CR", consent, "default", ACCESS_DEVICE_ID, h.sequence,
                                               study_date))
        assert r.committed, r.reason
        return env.envelope_id, patient, data


@pytest.fixture(scope="module")
def world(ledger_cluster, tmp_path_factory):
    """The module's ledger with an enrolled device, a custodian server (file key) on a Unix
    socket, its store, and operator and ingest clients."""
    from cloud.custodian_service import CustodianConfig, CustodianServer
    from cloud.objectstore import LocalObjectStore
    from ledger.transactions import DeviceEnrolled

    tmp = tmp_path_factory.mktemp("access")
    key = RecipientKey.generate()
    key.save(tmp / "custodian.key")
    config = CustodianConfig(socket=tmp / "c.sock", key=tmp / "custodian.key",
                             genesis=ledger_cluster.genesis_path,
                             ledger_key=ledger_cluster.key_path("custodian"), store_url=str(tmp / "store"))
    with ledger_cluster.client("operator") as operator, ledger_cluster.client("ingest") as ingest, \
            CustodianServer(config) as server:
        enrolled = operator.submit(DeviceEnrolled(ACCESS_DEVICE_ID, ACCESS_DEVICE.public.raw, "site", "cr"))
        assert enrolled.committed
        yield AccessWorld(ledger_cluster, server, LocalObjectStore(tmp / "store"), ingest, operator, key.public)


@dataclasses.dataclass
class Person:
    name: str
    role: str
    key: SigningKey
    recipient: RecipientKey
    ledger: object    # LedgerClient
    requester: object  # Requester (direct: ledger, custodian socket, store)


@pytest.fixture
def person(world):
    """``person(role, recipient=True, store=None)``: a principal the operator registered,
    with its own ledger client and a direct Requester."""
    import os
    from functools import partial

    from cloud.access import LedgerGateway, Requester
    from cloud.custodian_service import ask_custodian
    from ledger.client import LedgerClient
    from ledger.transactions import PrincipalSet

    made = []

    def make(role: str, *, recipient: bool = True, store=None) -> Person:
        name = f"{role}-{os.urandom(3).hex()}"
        key, rk = SigningKey.generate(), RecipientKey.generate()
        r = world.operator.submit(PrincipalSet(name, role, key.public.raw, True,
                                               rk.public.raw if recipient else None))
        assert r.committed, r.reason
        ledger = LedgerClient(world.cluster.genesis_path, key, name)
        ledger.start()
        made.append(ledger)
        gateway = LedgerGateway(ledger, partial(ask_custodian, world.server.config.socket), store or world.store)
        return Person(name, role, key, rk, ledger, Requester(gateway, name, key, rk))

    yield make
    for ledger in made:
        ledger.close()
