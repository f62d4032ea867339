"""``medchain demo``: the whole system on one machine, one command, no services to install.

Scanner -> edge -> broker -> cloud -> ledger -> training -> rollout -> inference, for real:

1. a 4-validator PBFT ledger (OS processes on loopback) and the cloud coordinator (embedded
   MQTT broker, ingest, object store, catalog, prediction log) start; two edge agents are
   enrolled (ledger + fleet registry + enrolment file) and start as DICOM nodes;
2. simulated CR scanners send studies with fake PHI by C-STORE; the site's EHR export
   (labels, consent) is imported by pseudonym; every instance is de-identified, sealed,
   pushed over MQTT, verified, stored once and registered on the ledger;
3. one patient withdraws consent for training (``CONSENT_SET`` on the ledger);
4. the training service trains the CNN-transformer hybrid on the images whose consent covers
   training (each read decided and audited by the ledger), exports and checks ONNX;
5. the model is signed, recorded (``MODEL_RELEASED``) and rolled out, canary first;
6. newly sent studies get predictions at the edge, which travel with the images and are
   committed in ``INFERENCE_RECORDED`` batches; one is proven from the ledger;
7. a clinician, registered on the ledger, asks for two images for diagnosis: one granted
   (fetched through the custodian, verified, opened in pydicom), one denied because its
   patient has just withdrawn consent; both audit entries are shown.

Everything lands in ``--workdir`` (default ``.medchain-demo``), which a new run replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from medchain.commandline import integer

__all__ = ["register", "run"]

MARKER = ".medchain-demo"
MODALITY = "CR"
GROUP = "demo-fleet"
_QUIET = ("pynetdicom", "amqtt", "transitions", "medchain", "edge_agent", "cloud", "ledger",
          "onnx_ir", "onnxscript")


def _fresh(workdir: Path) -> None:
    """Empty the work folder, but only one an earlier demo made (never a user's folder)."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise SystemExit(f"demo: {workdir} is not empty and not a demo folder; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `medchain demo`; replaced by the next run\n")


def _cloud_toml(workdir: Path, cluster, port: int) -> Path:
    """The deployment as ``medchain cloud init --embedded`` makes it: keys, CA, broker and
    coordinator certificates, ACL, and a cloud.toml whose embedded broker is mutual TLS."""
    from cloud.provision import init_deployment

    path, _ = init_deployment(workdir / "cloud", genesis=cluster.genesis_path, ingest_key=cluster.key_path("ingest"),
                              operator_key=cluster.key_path("operator"), training_key=cluster.key_path("training"),
                              organization="MedChain demo", broker_port=port, embedded=True,
                              custodian_ledger_key=cluster.key_path("custodian"))
    return path


def _start_custodian(stack: contextlib.ExitStack, config: Path) -> str:
    """``medchain cloud custodian`` as its own OS process (the only holder of the custodian
    key), stopped when the demo ends; returns its ready line."""
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "medchain_app.cli", "cloud", "custodian", "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    stack.callback(stop)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("custodian ready"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return line.strip()
    raise SystemExit("demo: the custodian did not start:\n" + "".join(lines[-20:]))


class _Edge:
    """One enrolled edge device: keys, profile, enrolment file, running agent."""

    def __init__(self, root: Path, device_id: str, config, fleet):
        from cloud.provision import issue_kit
        from edge_agent.config import load_profile
        from edge_agent.service import EdgeAgent
        from medchain.identity import SigningKey
        from medchain.identity import load_secret, new_secret

        (root / "keys").mkdir(parents=True)
        key = SigningKey.generate()
        key.save(root / "keys" / "device.key")
        new_secret(root / "keys" / "site.secret")
        self.secret = load_secret(root / "keys" / "site.secret")
        kit = issue_kit(config, fleet, device_id=device_id, public_key=key.public, site="site-a", group=GROUP,
                        profile="x86-cpu", out=root)  # enrolment, CA, client certificate, profile
        raw = load_profile(kit.profile, base_dir=root)
        self.profile = dataclasses.replace(
            raw, uplink=dataclasses.replace(raw.uplink, resend_after_s=5.0, heartbeat_s=1.0))
        self.device_id = device_id
        self.agent = EdgeAgent(self.profile, self.secret, port=0, host="127.0.0.1")

    def import_records(self, studies, path: Path) -> int:
        from edge_agent.pseudonyms import Pseudonymizer
        from edge_agent.records import pseudonymize, read_records_file
        from scanner_sim.studies import write_ground_truth

        truth = write_ground_truth(studies, path)
        pz = Pseudonymizer(self.secret, self.profile.deid.patient_id_issuer)
        return self.agent.records.upsert(pseudonymize(read_records_file(truth), pz))

    def token(self, patient) -> str:
        """The pseudonym the images of a (simulated) patient carry."""
        from edge_agent.pseudonyms import Pseudonymizer

        pz = Pseudonymizer(self.secret, self.profile.deid.patient_id_issuer)
        return pz.patient(patient.patient_id, patient.issuer)

    def send(self, studies):
        from scanner_sim.sender import items_from_datasets, send

        datasets = [ds for st in studies for ds in st.datasets]
        return send("127.0.0.1", self.agent.node.port, items_from_datasets(datasets),
                    calling_ae=f"SCANNER_{MODALITY}", called_ae=self.profile.dicom.ae_title,
                    concurrency=2, progress=False, retries=1)

    def settled(self, timeout: float) -> bool:
        agent, deadline = self.agent, time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not agent.node.spool.pending() and agent.node.drain(0.1) and agent.outbox.depth == 0:
                return True
            time.sleep(0.2)
        return False


def _wait(predicate, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def _access(workdir: Path, config, config_path: Path, studies: list, edges: list, catalog, cli, out) -> dict:
    """A clinician asks for two images for diagnosis through the ledger: one whose patient
    consents (granted: the custodian re-wraps its data key to the clinician, who decrypts,
    checks it against the ledger and opens the DICOM file) and one whose patient has just
    withdrawn consent (denied: the contract's reason only); then the audit entries of both."""
    import pydicom

    from medchain.identity import RecipientKey, SigningKey

    keys = workdir / "dr-demo"
    keys.mkdir()
    key, recipient = SigningKey.generate(), RecipientKey.generate()
    key.save(keys / "dr-demo.key")
    recipient.save(keys / "dr-demo.x25519")
    if cli(["principal", "add", "--config", str(config_path), "--name", "dr-demo", "--role", "clinician",
            "--public-key", key.public.raw.hex(), "--recipient-key", recipient.public.raw.hex()]) != 0:
        raise SystemExit("demo: the clinician could not be registered")
    (keys / "access.toml").write_text(
        f'[principal]\nname = "dr-demo"\nkey = "dr-demo.key"\nrecipient = "dr-demo.x25519"\n\n'
        f'[ledger]\ngenesis = "{config.genesis}"\n\n[custodian]\nsocket = "{config.custodian_socket}"\n\n'
        f'[store]\nurl = "{config.store_url}"\n')
    by_token = {e.meta["patient_token"]: e.envelope_id for e in catalog.entries()}

    def image_of(study) -> str | None:
        return next((by_token[e.token(study.patient)] for e in edges if e.token(study.patient) in by_token), None)

    consenting = [(st, image_of(st)) for st in studies if st.consent.get("diagnosis") and image_of(st)]
    (_, granted), (withdrawn, denied) = consenting[:2]
    token = next(e.token(withdrawn.patient) for e in edges if e.token(withdrawn.patient) in by_token)
    if cli(["consent", "revoke", "--config", str(config_path), "--patient", token, "--purpose", "diagnosis"]) != 0:
        raise SystemExit("demo: the consent could not be revoked")
    out(f"consent   patient {token[:12]}… withdrew consent for diagnosis (medchain consent revoke)")
    asked = [granted, denied]
    out("access    clinician dr-demo (registered on the ledger with PRINCIPAL_SET) asks for two images for "
        "diagnosis; the ledger decides each by role and consent:")
    cli(["access", "request", "--config", str(keys / "access.toml"), "--image", *asked, "--purpose", "diagnosis"])
    if cli(["access", "fetch", "--config", str(keys / "access.toml"), "--out", str(keys / "fetched"),
            "--purpose", "diagnosis"]) != 0:
        raise SystemExit("demo: the granted image could not be fetched")
    files = sorted((keys / "fetched").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    out(f"access    fetched {files[0].name}: re-wrapped by the custodian to dr-demo's key after it checked the "
        f"committed grant; Merkle root checked against the ledger; opens in pydicom: {ds.Modality} "
        f"{ds.Rows}x{ds.Columns}, patient {str(ds.PatientID)[:12]}… (pseudonym)")
    out("access    dr-demo's audit trail (each entry signed by the validators that executed it):")
    cli(["access", "status", "--config", str(keys / "access.toml")])
    return {"access_fetched": len(files)}


def run(workdir: Path, *, studies: int = 150, new_studies: int = 6, epochs: int = 30,
        out=print) -> dict:
    from cloud.config import load_config
    from cloud.coordinator import Coordinator
    from ledger.cluster import LocalCluster
    from ledger.genesis import free_ports
    from medchain.identity import SigningKey
    from ledger.client import LedgerClient
    from ledger.transactions import ConsentSet
    from medchain_app.cli import main as cli
    from scanner_sim.studies import generate_studies

    t_start = time.perf_counter()
    workdir = workdir.resolve()  # cloud.toml resolves relative paths against its own folder
    _fresh(workdir)
    summary: dict = {}
    with contextlib.ExitStack() as stack:
        for name in _QUIET:  # the demo narrates; the parts' own logs would drown it
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        cluster = stack.enter_context(LocalCluster(n=4, workdir=workdir / "ledger"))
        out(f"ledger    4 PBFT validators (f = 1) running as processes on loopback; genesis "
            f"{cluster.genesis_path}")
        config_path = _cloud_toml(workdir, cluster, free_ports(1)[0])
        config = load_config(config_path, state_dir=config_path.parent)
        coordinator = stack.enter_context(Coordinator(config))
        out(f"cloud     coordinator up: embedded broker {coordinator.endpoint.describe()} (mutual TLS, "
            f"the deployment's CA, ACL from the fleet registry), object store {config.store_url}, catalog + "
            f"fleet registry in SQLite")
        ready = _start_custodian(stack, config_path.parent / "custodian" / "custodian.toml")
        out(f"custodian its own process, the only holder of the custodian key (the coordinator has its "
            f"public key): {ready.removeprefix('custodian ready: ')}")
        edges = [_Edge(workdir / f"edge-{i}", f"demo-edge-{i}", config, coordinator.fleet) for i in (1, 2)]
        for e in edges:
            e.agent.start()
            stack.callback(e.agent.stop)
        out(f"edge      {len(edges)} devices enrolled on the ledger (group {GROUP}), each from its startup kit "
            f"(client certificate named for it), serving DICOM on "
            + ", ".join(f"{e.device_id} :{e.agent.node.port}" for e in edges))

        # -- acquisition: scanners -> edge -> cloud -> ledger --------------------------------
        t0 = time.perf_counter()
        batch = generate_studies(MODALITY, studies, seed=7)
        halves = [batch[: len(batch) // 2], batch[len(batch) // 2:]]
        sent = 0
        for e, part in zip(edges, halves):
            rows = e.import_records(part, e.profile.records.path.with_name("ehr_export.csv"))
            result = e.send(part)
            sent += result.success
            out(f"scanner   {len(part)} {MODALITY} studies with fake PHI -> {e.device_id}: {result.summary()}; "
                f"{rows} EHR rows (labels, consent) imported by pseudonym")
        if not all(e.settled(180) for e in edges):
            raise SystemExit("demo: the edge did not drain its outbox in time")
        stored = coordinator.catalog.count()
        height = cluster.status(0)["executed"]
        out(f"uplink    {sent} instances de-identified, sealed (AES-256-GCM, HPKE, Ed25519), pushed over "
            f"MQTT; cloud stored {stored} exactly once and registered each on the ledger "
            f"(height {height}) in {time.perf_counter() - t0:.1f} s")
        entry = coordinator.catalog.entries()[0]
        proof = coordinator.ledger.image(bytes.fromhex(entry.envelope_id))
        out(f"proof     image {entry.envelope_id[:12]}…: IMAGE_REGISTERED at height {proof.header.height}, "
            f"Merkle root {proof.record['merkle_root'].hex()[:16]}… matches the stored envelope; inclusion "
            f"proof + commit certificate ({len(proof.cert.sigs)} validator signatures) verified")
        if sent != stored:
            raise SystemExit(f"demo: {sent} instances got DICOM Success but {stored} are stored")

        # -- consent: one patient withdraws training consent --------------------------------
        withdrawn = next(st for st in halves[0] if st.consent.get("training"))
        token = edges[0].token(withdrawn.patient)
        with LedgerClient(config.genesis, SigningKey.load(config.operator_key), "operator") as op:
            op.submit(ConsentSet(token, "training", False, int(time.time() * 1000)))
        out(f"consent   patient {token[:12]}… withdrew consent for training (CONSENT_SET on the ledger)")

        # -- training on the store, rollout, inference -------------------------------------
        run_dir = workdir / "runs" / "hybrid"
        out(f"train     training the CNN-transformer hybrid on consented {MODALITY} images in the store")
        rc = cli(["cloud", "train", "--config", str(config_path), "--modality", MODALITY,
                  "--out", str(run_dir), "--epochs", str(epochs), "--patience", str(epochs),
                  # lesions are a few pixels across: train at the edge's full 128 x 128
                  "--max-image-size", "128", "--batch-size", "16"])
        if rc != 0:
            raise SystemExit("demo: training on the store failed")
        card = json.loads((run_dir / "model_card.json").read_text())
        val = card["metrics"]["hybrid"]["val"]
        base = card["metrics"]
        out(f"model     {card['model_version']}: val accuracy {val['accuracy']:.3f}, macro F1 {val['f1']:.3f} "
            f"on {card['data']['counts'].get('val', 0)} images (KNN {base['knn']['val']['accuracy']:.3f}, "
            f"SVM {base['svm']['val']['accuracy']:.3f} on the same split); run folder {run_dir}")

        out(f"rollout   signing, recording and rolling out to group {GROUP}, canary first")
        rc = cli(["cloud", "rollout", "--config", str(config_path), "--run", str(run_dir),
                  "--group", GROUP, "--canary", "0.5", "--timeout", "120"])
        if rc != 0:
            raise SystemExit("demo: rollout did not complete")

        fresh = generate_studies(MODALITY, new_studies, seed=99)
        before = {e.envelope_id for e in coordinator.catalog.entries()}
        result = edges[0].send(fresh)
        if not edges[0].settled(120):
            raise SystemExit("demo: new studies did not arrive")
        new = [e for e in coordinator.catalog.entries() if e.envelope_id not in before]
        truth = {edges[0].token(st.patient): st.label for st in fresh}
        log = coordinator.predictions
        if not _wait(lambda: log.pending() == 0 and all(log.get(e.envelope_id) for e in new
                                                        if "prediction" in e.meta), 60):
            raise SystemExit("demo: predictions were not committed to the ledger")
        correct = 0
        out(f"infer     {result.success} new studies -> {edges[0].device_id}; its prediction travels with each image:")
        for e in new:
            p = e.meta.get("prediction")
            want = truth.get(e.meta["patient_token"], "?")
            got = p["class_name"] if p else "(none)"
            correct += got == want
            probs = " ".join(f"{x:.2f}" for x in p["probabilities"]) if p else ""
            out(f"          patient {e.meta['patient_token'][:10]}…  truth {want:<9}  predicted {got:<9}  p=[{probs}]")
        rc = cli(["cloud", "prediction", "--config", str(config_path), "--envelope", new[0].envelope_id])
        if rc != 0:
            raise SystemExit("demo: the prediction proof did not verify")
        access = _access(workdir, config, config_path, batch, edges, coordinator.catalog, cli, out)
        with LedgerClient(config.genesis, SigningKey.load(config.training_key), "training") as tr:
            audit = tr.audit(user="training")
        granted = sum(1 for a in audit if a["granted"])
        summary = {
            "instances_stored": coordinator.catalog.count(), "ledger_height": cluster.status(0)["executed"],
            "model": card["model_version"], "val_accuracy": round(val["accuracy"], 4),
            "new_studies": len(new), "predicted_correctly": correct,
            "training_reads_audited": len(audit), "training_reads_granted": granted,
            **access, "seconds": round(time.perf_counter() - t_start, 1),
        }
        out("summary   " + json.dumps(summary, sort_keys=True))
    return summary


def _main(args: argparse.Namespace) -> int:
    print("MedChain demo: scanners -> edge -> MQTT -> cloud -> PBFT ledger -> training -> signed "
          "rollout -> edge inference", flush=True)
    run(args.workdir, studies=args.studies, new_studies=args.new_studies, epochs=args.epochs,
        out=lambda line: print(line, flush=True))
    print(f"done: everything is under {args.workdir}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole system end to end on embedded defaults")
    p.add_argument("--workdir", type=Path, default=Path(".medchain-demo"),
                   help="where everything goes (default .medchain-demo; replaced by each run)")
    p.add_argument("--studies", type=integer(10), default=150,
                   help="CR studies sent before training (default 150; at least 10, so that the "
                        "patient split leaves patients for training, validation and test)")
    p.add_argument("--new-studies", type=integer(1), default=6, help="CR studies sent after the rollout")
    p.add_argument("--epochs", type=integer(1), default=30, help="training epochs (a short run on purpose)")
    p.set_defaults(func=_main)
