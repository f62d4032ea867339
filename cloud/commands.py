"""``medchain cloud``: set up and run the coordinator, enrol and revoke devices, list the fleet,
release and roll out models (and roll them back), prove an edge prediction.

Imports nothing heavy at load time; each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medchain.commandline import hex_bytes, integer, number, port

__all__ = ["register"]

def _config(args):
    from cloud.config import load_config

    state = args.state_dir or args.config.resolve().parent
    return load_config(args.config, state_dir=state)


def _init(args: argparse.Namespace) -> int:
    from cloud.keybackend import Pkcs11Settings
    from cloud.provision import init_deployment

    ledger = args.ledger_dir.resolve()
    pkcs11 = None
    if args.pkcs11_module is not None:
        if args.pkcs11_token is None or args.pkcs11_pin_file is None:
            raise SystemExit("cloud init: --pkcs11-module needs --pkcs11-token and --pkcs11-pin-file")
        pkcs11 = Pkcs11Settings(module=args.pkcs11_module, token=args.pkcs11_token,
                                pin_file=args.pkcs11_pin_file.resolve(),
                                wrapped=(args.dir / "custodian" / "keys" / "custodian.key.wrapped").resolve())
    _, made = init_deployment(args.dir, genesis=ledger / "genesis.json", ingest_key=ledger / "keys" / "ingest.key",
                              operator_key=ledger / "keys" / "operator.key",
                              training_key=ledger / "keys" / "training.key", organization=args.organization,
                              broker_host=args.host, broker_port=args.port, embedded=args.embedded,
                              custodian_ledger_key=ledger / "keys" / "custodian.key", pkcs11=pkcs11)
    print(f"{args.dir}: {'created ' + ', '.join(made) if made else 'already set up'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from cloud.coordinator import Coordinator

    coordinator = Coordinator(_config(args))

    def ready(c) -> None:
        print(f"cloud coordinator ready: broker {c.endpoint.describe()}, store {c.config.store_url}",
              flush=True)

    coordinator.serve(ready=ready)
    print("cloud coordinator stopped: " + json.dumps({
        "stored": coordinator.catalog.count(), "devices": len(coordinator.fleet.list())}), flush=True)
    return 0


def _custodian(args: argparse.Namespace) -> int:
    from cloud.custodian_service import CustodianServer, load_custodian_config

    server = CustodianServer(load_custodian_config(args.config))

    def ready(s) -> None:
        print(f"custodian ready: key {s.backend.public.id} ({type(s.backend).__name__}) on "
              f"{s.config.socket}, serving {', '.join(s.config.serve)}", flush=True)

    server.serve(ready=ready)
    print("custodian stopped: " + json.dumps(dict(server.counts), sort_keys=True), flush=True)
    return 0


def _api(args: argparse.Namespace) -> int:
    import signal
    import threading
    from functools import partial

    from cloud.access import LedgerGateway
    from cloud.api import ApiServer, create_app
    from cloud.auth_failures import FailureLog
    from cloud.custodian_service import ask_custodian
    from cloud.objectstore import open_store
    from ledger.client import LedgerClient
    from medchain.errors import ConfigError
    from medchain.identity import SigningKey

    config = _config(args)
    if config.api_key is None or config.custodian_socket is None:
        raise ConfigError("cloud api: cloud.toml needs [ledger] api_key (the key of a principal of role 'api': "
                          "the API files access requests on behalf of the signer) and [custodian] socket")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with LedgerClient(config.genesis, SigningKey.load(config.api_key), config.api_name) as ledger:
        me = ledger.principal(config.api_name)
        if me is None or me["role"] != "api":  # never the operator's key: a compromised API would hold its power
            raise ConfigError(f"cloud api: principal {config.api_name!r} has role "
                              f"{me and me['role']!r} on the ledger; the API runs as a principal of role 'api' "
                              "(`medchain principal add --role api`)")
        gateway = LedgerGateway(ledger, partial(ask_custodian, config.custodian_socket), open_store(config.store_url))
        failures = FailureLog(args.failures_log or config.state_dir / "api-auth-failures.jsonl")
        with ApiServer(create_app(gateway, failures=failures), host=args.host, port=args.port, tls=tls) as server:
            print(f"cloud api ready: {server.url} (schema at {server.url}/openapi.json)", flush=True)
            while not stop.wait(0.5):
                pass
    print("cloud api stopped", flush=True)
    return 0


def _studies(args: argparse.Namespace) -> int:
    """The listing as the ledger authorizes it for the signer (the named principal, else the
    operator); by patient token the read is filed first and is on the patient's trail."""
    from cloud.access_commands import signer_client

    with signer_client(args.config, args.name, args.key, "cloud studies") as ledger:
        found = ledger.studies(modality=args.modality, patient=args.patient, study=args.study,
                               series=args.series)
    for s in found:
        print(json.dumps(s, sort_keys=True), flush=True)
    return 0


def _broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from cloud.broker import EmbeddedBroker

    host, port, security = args.host, args.port, None
    if args.config is not None:
        from cloud.config import ConfigError
        from cloud.fleet import FleetRegistry
        from cloud.provision import broker_security, rewrite_acl

        config = _config(args)
        if not (config.pki_dir / "ca.crt").exists():
            raise ConfigError(f"{config.pki_dir}: no certificate authority; run `medchain cloud init` first")
        rewrite_acl(config, FleetRegistry(config.database_url))
        host, port, security = config.endpoint.host, config.endpoint.port, broker_security(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedBroker(host, port, security=security) as broker:
        mode = "mutual TLS, the deployment's ACL" if security else "anonymous clients, loopback only"
        print(f"embedded MQTT broker ready on {broker.host}:{broker.port} ({mode})", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from cloud.fleet import FleetRegistry
    from cloud.provision import issue_kit
    from medchain.identity import SigningKey, VerifyKey

    config = _config(args)
    public = VerifyKey.from_hex(args.public_key) if args.public_key else SigningKey.load(args.key_file).public
    kit = issue_kit(config, FleetRegistry(config.database_url), device_id=args.device_id, public_key=public,
                    site=args.site, group=args.group, profile=args.profile, out=args.out)
    print(f"enrolled {args.device_id} (key {public.id}) on the ledger and in the fleet registry; its kit "
          f"(profile, enrolment, CA, client certificate) is in {kit.directory}: give it to the device. "
          f"Mosquitto applies the new ACL on SIGHUP")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from cloud.fleet import FleetRegistry
    from cloud.provision import revoke_device

    config = _config(args)
    revoke_device(config, FleetRegistry(config.database_url), args.device_id, args.reason)
    print(f"revoked {args.device_id}: its envelopes are refused, its certificate is on the CRL and its "
          "topics are gone from the ACL (Mosquitto: send SIGHUP)")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from cloud.provision import rotate_certificate

    tls = rotate_certificate(_config(args), args.device_id, args.kit)
    print(f"{args.device_id}: new client certificate {tls.cert} (the old one is on the CRL)")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from cloud.fleet import FleetRegistry

    fleet = FleetRegistry(_config(args).database_url)
    devices = fleet.list(args.group)
    for d in devices:
        print(json.dumps({"device_id": d.device_id, "group": d.group, "site": d.site, "state": d.state,
                          "revoked": d.revoked, "last_seen_ms": d.last_seen_ms, "queue_depth": d.queue_depth,
                          "model_version": d.model_version}, sort_keys=True))
    print(f"{len(devices)} device(s)" + (f" in group {args.group}" if args.group else ""), file=sys.stderr)
    return 0


def _principal_client(config, name: str):
    """A started ledger client acting as principal ``name`` (its key from cloud.toml)."""
    from cloud.config import ConfigError
    from ledger.client import LedgerClient
    from medchain.identity import SigningKey

    path = {"training": config.training_key, "ingest": config.ingest_key}[name]
    if path is None:
        raise ConfigError(f"[ledger] {name}_key is not set: this command acts as the {name} principal")
    client = LedgerClient(config.genesis, SigningKey.load(path), name)
    client.start()
    return client


def _rollout_shell(config):
    from cloud.fleet import FleetRegistry
    from cloud.rollout import Rollout
    from medchain.identity import SigningKey

    return Rollout(endpoint=config.endpoint, fleet=FleetRegistry(config.database_url),
                   database=config.database_url, model_key=SigningKey.load(config.model_key))


def _print_report(report) -> int:
    print(json.dumps(report.to_dict(), sort_keys=True), flush=True)
    return 0 if report.result == "complete" else 1


def _rollout(args: argparse.Namespace) -> int:
    config = _config(args)
    progress = (lambda line: print(f"rollout: {line}", flush=True))
    with _rollout_shell(config) as shell:
        if args.run is not None:
            ledger = _principal_client(config, "training")
            try:
                release = shell.release(args.run, ledger, name=args.name)
            finally:
                ledger.close()
            print(f"released {release.version} ({release.model_hash.hex()}): signed, recorded on "
                  f"the ledger at height {release.receipt['header']['height']}, published", flush=True)
            model_hash = release.model_hash
        else:
            model_hash = args.model
        report = shell.run(model_hash, args.group, canary_share=args.canary,
                           timeout_s=args.timeout, progress=progress)
    return _print_report(report)


def _rollback(args: argparse.Namespace) -> int:
    config = _config(args)
    with _rollout_shell(config) as shell:
        report = shell.rollback(args.group, timeout_s=args.timeout,
                                progress=lambda line: print(f"rollback: {line}", flush=True))
    return _print_report(report)


def _prediction(args: argparse.Namespace) -> int:
    from cloud.catalog import Catalog
    from cloud.predictions import PredictionLog

    config = _config(args)
    ledger = _principal_client(config, "ingest")
    try:
        log = PredictionLog(Catalog(config.database_url), ledger)
        record = log.get(args.envelope)
        if record is None:
            print(f"envelope {args.envelope}: no prediction recorded")
            return 1
        proof = log.prove(args.envelope)
        if proof is None:
            print(json.dumps({"prediction": record, "proof": "pending: not yet committed"}))
            return 1
        proof.verify(ledger.keyring)
        print(json.dumps({"prediction": proof.record, "proof": {
            "batch_root": record["batch_root"], "leaf_index": proof.proof.index,
            "batch_size": proof.proof.size, "ledger_height": proof.receipt.header.height,
            "verified": "inclusion proof and commit certificate check against the genesis validator keys"}},
            sort_keys=True))
        return 0
    finally:
        ledger.close()
def _train(args: argparse.Namespace) -> int:
    from cloud.training import train_from_store
    from models.errors import ModelError
    from models.training import Recipe

    overrides = {k: v for k, v in {
        "epochs": args.epochs, "seed": args.seed, "batch_size": args.batch_size,
        "patience": args.patience, "max_image_size": args.max_image_size}.items() if v is not None}
    if args.model:
        try:
            overrides["model"] = json.loads(args.model)
        except ValueError:
            raise ModelError("--model must be a JSON object") from None
        if not isinstance(overrides["model"], dict):
            raise ModelError("--model must be a JSON object")
    summary = train_from_store(_config(args), args.modality, args.out, Recipe(**overrides),
                               max_images=args.max_images, device=args.device,
                               progress=not args.no_progress)
    h = summary["hybrid"]["val"]
    print(f"validation: accuracy {h['accuracy']:.4f}, f1 {h['f1']:.4f} (epoch {summary['best_epoch']}); "
          f"knn accuracy {summary['knn']['val']['accuracy']:.4f}, svm accuracy "
          f"{summary['svm']['val']['accuracy']:.4f}; {summary['timings']['total_seconds']:.0f} s")
    print(f"run folder: {args.out}")
    return 0


def _hex(size: int):
    """A hex argument of ``size`` bytes, checked before any network wait, kept as text."""
    parse = hex_bytes(size)
    return lambda text: parse(text).hex()


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the coordinator's cloud.toml")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="base for relative paths (default: the config file's directory)")


def register(sub: argparse._SubParsersAction) -> None:
    cloud = sub.add_parser("cloud", help="the cloud coordinator: ingest, fleet, enrolment")
    actions = cloud.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("init", help="create the coordinator's keys (0600), the deployment's certificate "
                                        "authority, the broker's files and a cloud.toml (TLS on)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--ledger-dir", type=Path, required=True,
                   help="where `medchain ledger genesis/cluster` wrote genesis.json and keys/")
    p.add_argument("--host", default="127.0.0.1", help="the broker's address as devices reach it")
    p.add_argument("--port", type=port(), default=8883, help="the broker's TLS port (default 8883)")
    p.add_argument("--organization", default="MedChain", help="the name on the certificates")
    p.add_argument("--embedded", action="store_true", help="run the in-process broker (one machine)")
    p.add_argument("--pkcs11-module", type=Path, help="the custodian key in a PKCS#11 token: its library "
                                                      "(e.g. /usr/lib/softhsm/libsofthsm2.so)")
    p.add_argument("--pkcs11-token", help="the token's label")
    p.add_argument("--pkcs11-pin-file", type=Path, help="a file (0600) holding the token's user PIN")
    p.set_defaults(func=_init)

    p = actions.add_parser("custodian", help="run the custodian: the only holder of the custodian key; "
                                             "releases images to the training principal's signed "
                                             "requests as the ledger grants them")
    p.add_argument("--config", required=True, type=Path, help="custodian.toml (written by cloud init)")
    p.set_defaults(func=_custodian)

    p = actions.add_parser("api", help="serve the access API (signed requests of ledger principals) "
                                       "until SIGTERM; loopback unless TLS files are given")
    _with_config(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port(any_free=True), default=8443, help="0: any free port")
    p.add_argument("--tls-cert", type=Path, help="certificate (PEM): required off loopback")
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--failures-log", type=Path, help="append-only log of calls whose signature does not verify "
                                                    "(default: api-auth-failures.jsonl beside cloud.toml's state)")
    p.set_defaults(func=_api)

    p = actions.add_parser("studies", help="registered studies by pseudonymous patient, modality, series "
                                           "and the purposes consented now: metadata only (JSON lines)")
    p.add_argument("--config", type=Path, required=True, help="cloud.toml (its [ledger] operator_key reads "
                                                              "unless --name/--key)")
    p.add_argument("--name", help="the principal who lists (a clinician, radiologist, researcher, auditor)")
    p.add_argument("--key", type=Path, help="that principal's Ed25519 key file")
    p.add_argument("--modality")
    p.add_argument("--patient", help="a patient's pseudonym token (a read on the patient's trail, filed first)")
    p.add_argument("--study", help="a study uid (as registered: the edge's pseudonym)")
    p.add_argument("--series", help="a series uid (as registered): that series alone")
    p.set_defaults(func=_studies)

    p = actions.add_parser("run", help="run ingest and the heartbeat monitor until SIGTERM")
    _with_config(p)
    p.set_defaults(func=_run)

    p = actions.add_parser("broker", help="run the embedded MQTT broker (amqtt) until SIGTERM, "
                                          "for one machine without Mosquitto; with --config, the "
                                          "deployment's mutual TLS and ACL on its address")
    p.add_argument("--config", type=Path, default=None, help="the coordinator's cloud.toml (from cloud init)")
    p.add_argument("--state-dir", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port(any_free=True), default=1883, help="default 1883; 0: any free port")
    p.set_defaults(func=_broker)

    p = actions.add_parser("enroll", help="enrol a device (ledger + registry) and write its kit: enrolment, "
                                          "profile, CA and client certificate")
    _with_config(p)
    p.add_argument("--device-id", required=True)
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", type=_hex(32), help="the device's Ed25519 public key, hex")
    key.add_argument("--key-file", type=Path, help="the device's key file (only its public half is used)")
    p.add_argument("--site", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--profile", default="x86-cpu")
    p.add_argument("--out", type=Path, required=True, help="the folder to write the device's kit into")
    p.set_defaults(func=_enroll)

    p = actions.add_parser("rotate", help="give one device a new client certificate (the old one revoked)")
    _with_config(p)
    p.add_argument("--device-id", required=True)
    p.add_argument("--kit", type=Path, required=True, help="the device's kit folder (keys/ is replaced)")
    p.set_defaults(func=_rotate)

    p = actions.add_parser("revoke", help="revoke a device: its envelopes are refused from then on")
    _with_config(p)
    p.add_argument("--device-id", required=True)
    p.add_argument("--reason", required=True)
    p.set_defaults(func=_revoke)

    p = actions.add_parser("rollout", help="release a trained run (sign, MODEL_RELEASED, publish) "
                                           "and roll it out to a device group, canaries first")
    _with_config(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=Path, help="a training run folder (model.onnx + model_card.json)")
    what.add_argument("--model", type=hex_bytes(32), help="the hash (hex) of a model released before")
    p.add_argument("--group", required=True, help="the device group to roll out to")
    p.add_argument("--canary", type=number(0, 1, above=True, what="a share"), default=0.25,
                   help="share of the group offered first (default 0.25)")
    p.add_argument("--timeout", type=number(0, above=True, what="seconds"), default=600.0,
                   help="seconds to wait for devices (default 600)")
    p.add_argument("--name", default="hybrid", help="release name recorded on the ledger")
    p.set_defaults(func=_rollout)

    p = actions.add_parser("rollback", help="offer a group the model it ran before its last rollout")
    _with_config(p)
    p.add_argument("--group", required=True)
    p.add_argument("--timeout", type=number(0, above=True, what="seconds"), default=600.0,
                   help="seconds to wait for devices (default 600)")
    p.set_defaults(func=_rollback)

    p = actions.add_parser("prediction", help="an image's edge prediction with its verified "
                                              "ledger proof (INFERENCE_RECORDED batch)")
    _with_config(p)
    p.add_argument("--envelope", required=True, type=_hex(16), help="the envelope id (hex)")
    p.set_defaults(func=_prediction)
    p = actions.add_parser(
        "train", help="train on the stored images the ledger grants for training; export ONNX",
        description="For every stored image of the modality, ask the ledger for 'training' "
                    "access as the training principal (decided by policy and consent, audited); "
                    "decrypt only the granted ones, join their labels by pseudonym, split by "
                    "patient, train and write the run folder (model.onnx, model_card.json, "
                    "metrics, figures, access_report.json).")
    _with_config(p)
    p.add_argument("--modality", required=True, help="one modality, e.g. CR")
    p.add_argument("--out", required=True, type=Path, help="run folder to create")
    p.add_argument("--epochs", type=integer(1), help="maximum epochs (default 20)")
    p.add_argument("--seed", type=integer(0), help="seed of the split and of training (default 0)")
    p.add_argument("--max-images", type=integer(1), help="stop once this many labelled images are granted")
    p.add_argument("--batch-size", type=integer(2), help="batch size (default 64)")
    p.add_argument("--patience", type=integer(1), help="early-stopping patience in epochs (default 6)")
    p.add_argument("--max-image-size", type=integer(1), help="longest side fed to the model (default 64)")
    p.add_argument("--model", metavar="JSON", help='architecture overrides, e.g. \'{"depth": 1}\'')
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = actions.add_parser("devices", help="list the fleet with its latest heartbeats (JSON lines)")
    _with_config(p)
    p.add_argument("--group", default=None)
    p.set_defaults(func=_devices)

