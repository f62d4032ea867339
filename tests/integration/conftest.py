"""A whole site on this machine for end-to-end tests: a real 4-validator ledger (OS
processes), a cloud coordinator, an enrolled edge agent, and the simulated scanner sending
by C-STORE — over the embedded broker and over the real Mosquitto."""

from __future__ import annotations

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
                 edge_endpoint=None, cloud: dict | None = None):
        self.root, self.cluster, self.endpoint, self.device_id = root, cluster, endpoint, device_id
        self.edge_endpoint = edge_endpoint or endpoint
        cloud_dir = root / "cloud"
        (cloud_dir / "keys").mkdir(parents=True)
        RecipientKey.generate().save(cloud_dir / "keys" / "custodian.key")
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
            "keys": {"custodian": "keys/custodian.key", "model": "keys/model.key"},
        }
        for section, values in (cloud or {}).items():
            raw[section] = {**raw.get(section, {}), **values}
        self.config = parse_config(raw, state_dir=cloud_dir)
        self.custodian = RecipientKey.load(self.config.custodian_key)
        self.coordinator = Coordinator(self.config, endpoint=endpoint)
        self.edge_dir = root / "edge"
        (self.edge_dir / "keys").mkdir(parents=True)
        self.device_key = SigningKey.generate()
        self.device_key.save(self.edge_dir / "keys" / "device.key")
        new_secret(self.edge_dir / "keys" / "site.secret")
        self.secret = load_secret(self.edge_dir / "keys" / "site.secret")
        raw_profile = load_profile(profile_path("x86-cpu"), base_dir=self.edge_dir)
        import dataclasses

        self.profile = dataclasses.replace(
            raw_profile, device=dataclasses.replace(raw_profile.device, id=device_id),
            uplink=dataclasses.replace(raw_profile.uplink, resend_after_s=3.0, heartbeat_s=1.0))
        self.agent: EdgeAgent | None = None
        self.procs: list[subprocess.Popen] = []

    def enroll(self) -> None:
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
            f'[keys]\ncustodian = "{c.custodian_key}"\nmodel = "{c.model_key}"\n')
        return path

    def edge_profile_file(self) -> Path:
        """The x86-cpu profile with this site's device id and broker (no TLS on loopback)."""
        text = profile_path("x86-cpu").read_text()
        text = text.replace('id = "x86-cpu-001"', f'id = "{self.device_id}"')
        head, _, rest = text.partition("[mqtt]")
        _, _, after = rest.partition("[outbox]")
        mqtt = (f'[mqtt]\nhost = "{self.endpoint.host}"\nport = {self.endpoint.port}\n'
                f'keepalive = 30\nmax_message_bytes = 8388608\n\n')
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
    """A site on the embedded broker with SQLite, and again on the real Mosquitto with
    PostgreSQL (the catalog, fleet registry, prediction log and releases of its cloud).
    The deployment comes first, so its broker and schema outlive the sites."""
    endpoint, database_url = deployment
    cloud = {"database": {"url": database_url}} if database_url else None
    return lambda device_id=None: site_on(endpoint, device_id, cloud=cloud)


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
