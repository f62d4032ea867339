"""Releasing a trained model and rolling it out to a device group, canary first.

A release is the run folder's ``model.onnx`` and ``model_card.json``, signed with the
training service's model key over their hashes. Its hash is recorded on the ledger by a
``MODEL_RELEASED`` transaction (submitted as the ``training`` principal) and the release —
with that transaction's receipt, so devices can check it offline — is published once on its
retained topic. Each device is then told which model to run by a signed, retained offer on
its own topic: a deterministic canary share of the group first; the rest only after every
canary reported the model installed and a heartbeat since shows it serving and healthy. A
canary that refuses or goes silent halts the rollout and its offer is pointed back at the
model it was running, so the broker's retained state matches what devices run.

:func:`plan_canary` and :func:`rollout_step` are the pure core; :class:`Rollout` the shell
(broker, ledger, database). History lives in the ``releases`` and ``rollouts`` tables beside
the catalog, which is what ``medchain cloud rollback`` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, select
from sqlalchemy.engine import Engine

from ledger.client import LedgerClient
from medchain.identity import SigningKey
from ledger.transactions import ModelReleased
from medchain.errors import ProtocolError, VerificationError
from medchain.mqtt import MqttEndpoint, MqttLink
from medchain.protocol import (
    Heartbeat,
    ModelOffer,
    ModelRelease,
    ModelState,
    VARIANT_PRECISIONS,
    ModelStatus,
    OfferStage,
    decode_message,
    device_from_topic,
    encode,
    heartbeat_subscription,
    model_offer_topic,
    model_status_subscription,
    release_topic,
)
from models.card import ModelCard
from models.errors import ModelError

from cloud.database import engine_for
from cloud.errors import CloudError
from cloud.fleet import FleetRegistry

__all__ = ["RolloutError", "build_release", "release_transaction", "plan_canary", "DeviceView",
           "rollout_step", "RolloutReport", "Rollout"]

log = logging.getLogger(__name__)

_meta = MetaData()
releases = Table(
    "releases", _meta,
    Column("model_hash", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("version", String(128), nullable=False),
    Column("released_ms", BigInteger, nullable=False),
    Column("ledger_height", BigInteger, nullable=False),
    Column("card", Text, nullable=False),
)
rollouts = Table(
    "rollouts", _meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_group", String(128), nullable=False),
    Column("model_hash", String(64), nullable=False),
    Column("previous_hash", String(64), nullable=True),
    Column("kind", String(16), nullable=False),  # rollout | rollback
    Column("started_ms", BigInteger, nullable=False),
    Column("finished_ms", BigInteger, nullable=True),
    Column("result", String(16), nullable=False),  # running | complete | halted | timeout
    Column("detail", Text, nullable=False),
)


class RolloutError(CloudError):
    """A release or rollout that cannot go ahead (bad run folder, ledger refusal, no devices)."""


# -- pure core ------------------------------------------------------------------------------


def build_release(run_dir: str | Path, key: SigningKey, *, name: str, now_ms: int) -> ModelRelease:
    """The signed release of a run folder (no ledger receipt yet), carrying the lower-precision
    variants its card lists (each file checked against the card's SHA-256, which the signature
    covers through the card's hash)."""
    run = Path(run_dir)
    try:
        card = ModelCard.load(run / "model_card.json")
        card.check_model_file(run / "model.onnx")
    except ModelError as exc:
        raise RolloutError(f"{run}: not a finished training run: {exc}") from None
    onnx, card_bytes = (run / "model.onnx").read_bytes(), (run / "model_card.json").read_bytes()
    return ModelRelease(name, card.model_version, hashlib.sha256(onnx).digest(),
                        hashlib.sha256(card_bytes).digest(), key.public.id, now_ms, onnx,
                        card_bytes, variants=_variants(run, card)).signed(key)


def _variants(run: Path, card: ModelCard) -> dict[str, bytes]:
    """``{precision: ONNX bytes}`` of the variants the card lists beside FP32."""
    out = {}
    for precision, entry in sorted(card.variants().items()):
        if precision not in VARIANT_PRECISIONS:
            continue  # fp32 is the release's own file
        path = run / Path(entry["file"]).name  # a name in the run folder, never a path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RolloutError(f"{run}: the card lists a {precision} variant but "
                               f"{path.name} is missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise RolloutError(f"{run}: {path.name} does not match the SHA-256 its card lists "
                               f"for {precision}")
        out[precision] = data
    return out


def _flat_metrics(card: ModelCard) -> dict[str, float]:
    """The hybrid's validation metrics as ``{name: number}`` (what the ledger keeps)."""
    val = (card.metrics.get("hybrid") or {}).get("val") or {}
    return {f"val_{k}": float(v) for k, v in sorted(val.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def release_transaction(release: ModelRelease) -> ModelReleased:
    card = ModelCard.from_json(release.card.decode())
    manifest = str(card.data.get("manifest_sha256", ""))
    try:
        manifest_hash = bytes.fromhex(manifest)
    except ValueError:
        manifest_hash = b""
    if len(manifest_hash) != 32:
        raise RolloutError("model card carries no data manifest hash")
    return ModelReleased(release.model_hash, release.name, release.version, _flat_metrics(card),
                         manifest_hash)


def plan_canary(devices: list[str], share: float, salt: bytes) -> tuple[list[str], list[str]]:
    """Split a group into canaries (``ceil(share * n)``, at least one) and the rest, in an
    order fixed by ``salt`` (the model hash), so the same rollout picks the same canaries."""
    if not 0 < share <= 1:
        raise RolloutError(f"canary share must be in (0, 1], got {share}")
    order = sorted(devices, key=lambda d: hashlib.sha256(salt + d.encode()).digest())
    k = min(len(order), max(1, math.ceil(share * len(order))))
    return order[:k], order[k:]


@dataclass(frozen=True)
class DeviceView:
    """What the cloud last heard from one device about models."""

    status: ModelStatus | None = None
    heartbeat: Heartbeat | None = None


def rollout_step(devices: list[str], model_hash: bytes, version: str,
                 views: dict[str, DeviceView]) -> tuple[list[str], dict[str, str], list[str]]:
    """``(healthy, refused {device: reason}, waiting)`` for devices offered ``model_hash``.

    Healthy: reported it installed, and a heartbeat sent after that report shows the
    version serving in state ``ok``."""
    healthy, refused, waiting = [], {}, []
    for d in devices:
        v = views.get(d, DeviceView())
        st, hb = v.status, v.heartbeat
        if st is not None and st.model_hash == model_hash and st.state == ModelState.REFUSED:
            refused[d] = st.reason
        elif (st is not None and st.model_hash == model_hash and st.state == ModelState.INSTALLED
              and hb is not None and hb.sent_ms >= st.sent_ms and hb.model_version == version):
            if hb.state == "ok":
                healthy.append(d)
            else:
                refused[d] = f"unhealthy after install: heartbeat state {hb.state!r}"
        else:
            waiting.append(d)
    return healthy, refused, waiting


@dataclass
class RolloutReport:
    group: str
    version: str
    model_hash: str
    kind: str
    canary: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    healthy: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    result: str = "running"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("group", "version", "model_hash", "kind", "canary",
                                              "rest", "healthy", "refused", "waiting", "result")}


# -- shell ----------------------------------------------------------------------------------


class _FleetWatch:
    """Latest signed heartbeat and model status per device, from the retained topics."""

    def __init__(self, fleet: FleetRegistry):
        self._fleet = fleet
        self._views: dict[str, DeviceView] = {}
        self._lock = threading.Lock()
        self.bad = 0

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            device_id = device_from_topic(topic)
            msg = decode_message(payload)
            if not isinstance(msg, (Heartbeat, ModelStatus)) or msg.device_id != device_id:
                raise ProtocolError("unexpected message")
            msg.verify(self._fleet.get(device_id).public_key)
        except (ProtocolError, VerificationError, CloudError):
            self.bad += 1
            return
        with self._lock:
            v = self._views.get(device_id, DeviceView())
            if isinstance(msg, Heartbeat):
                if v.heartbeat is None or msg.sent_ms >= v.heartbeat.sent_ms:
                    self._views[device_id] = DeviceView(v.status, msg)
            elif v.status is None or msg.sent_ms >= v.status.sent_ms:
                self._views[device_id] = DeviceView(msg, v.heartbeat)

    def views(self) -> dict[str, DeviceView]:
        with self._lock:
            return dict(self._views)


class Rollout:
    """Release, roll out and roll back models over one broker connection."""

    def __init__(self, *, endpoint: MqttEndpoint, fleet: FleetRegistry, database: str | Engine,
                 model_key: SigningKey, clock: Callable[[], float] = time.time):
        self.fleet, self._key, self._clock = fleet, model_key, clock
        self.engine = engine_for(database)
        _meta.create_all(self.engine)
        self._watch = _FleetWatch(fleet)
        self._last_offer_ms: dict[str, int] = {}
        self._link = MqttLink(endpoint, client_id=f"cloud-rollout-{int(clock() * 1000) % 10**8}",
                              persistent_session=False,
                              subscriptions=[(heartbeat_subscription(), 1),
                                             (model_status_subscription(), 1)],
                              on_message=self._watch.on_message)

    def __enter__(self) -> Rollout:
        self._link.start()
        if not self._link.wait_connected(30):
            self._link.close()
            raise RolloutError(f"broker {self._link.endpoint.describe()} not reachable")
        return self

    def __exit__(self, *exc) -> None:
        self._link.close()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- releases -------------------------------------------------------------------------

    def release(self, run_dir: str | Path, ledger: LedgerClient, name: str = "hybrid") -> ModelRelease:
        """Sign the run, record its hash on the ledger, publish it (retained)."""
        rel = build_release(run_dir, self._key, name=name, now_ms=self._now_ms())
        known = self.release_record(rel.model_hash)
        if known is None:
            result = ledger.submit(release_transaction(rel))
            if not result.committed and "already released" not in result.reason:
                raise RolloutError(f"ledger refused MODEL_RELEASED: {result.reason}")
        receipt = ledger.model_receipt(rel.model_hash)
        if receipt is None:
            raise RolloutError("MODEL_RELEASED committed but the ledger has no record of it")
        rel = dataclasses.replace(rel, receipt=receipt.to_wire())
        self.publish_release(rel)
        if known is None:
            with self.engine.begin() as conn:
                conn.execute(releases.insert().values(
                    model_hash=rel.model_hash.hex(), name=rel.name, version=rel.version,
                    released_ms=rel.released_ms, ledger_height=receipt.header.height,
                    card=rel.card.decode()))
        log.info("released %s (%s) at ledger height %d", rel.version, rel.model_hash.hex()[:12],
                 receipt.header.height)
        return rel

    def publish_release(self, rel: ModelRelease) -> None:
        payload = encode(rel)
        self._link.publish(release_topic(rel.model_hash), payload, retain=True).wait_for_publish(60)

    def retire(self, model_hash: bytes) -> None:
        """Clear a release's retained message from the broker (devices that installed it keep
        their verified copy; a later rollout or rollback of it needs ``release`` again)."""
        self._link.publish(release_topic(model_hash), b"", retain=True).wait_for_publish(30)

    def release_record(self, model_hash: bytes) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(releases).where(
                releases.c.model_hash == model_hash.hex())).first()
        return dict(row._mapping) if row else None

    def history(self, group: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(rollouts).where(rollouts.c.device_group == group)
                                .order_by(rollouts.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def _serving(self, group: str) -> bytes | None:
        """The model the group ran after its last complete rollout or rollback."""
        done = [r for r in self.history(group) if r["result"] == "complete"]
        return bytes.fromhex(done[-1]["model_hash"]) if done else None

    # -- offers ---------------------------------------------------------------------------

    def _offer(self, device: str, group: str, model_hash: bytes, version: str, stage: str) -> None:
        record = self.release_record(model_hash)
        if record is None:
            raise RolloutError(f"model {model_hash.hex()[:12]} was never released here: nothing to offer")
        issued = max(self._now_ms(), self._last_offer_ms.get(device, -1) + 1)  # rises per device
        self._last_offer_ms[device] = issued
        offer = ModelOffer(device, group, model_hash, version, stage, issued,
                           record["ledger_height"]).signed(self._key)
        self._link.publish(model_offer_topic(device), encode(offer), retain=True).wait_for_publish(30)

    def _devices(self, group: str) -> list[str]:
        devices = [d.device_id for d in self.fleet.list(group) if not d.revoked]
        if not devices:
            raise RolloutError(f"no enrolled devices in group {group!r}")
        return devices

    def _wait(self, devices: list[str], model_hash: bytes, version: str, deadline: float,
              progress: Callable[[str], None]) -> tuple[list[str], dict[str, str], list[str]]:
        last = None
        while True:
            healthy, refused, waiting = rollout_step(devices, model_hash, version, self._watch.views())
            line = f"{len(healthy)}/{len(devices)} healthy, {len(refused)} refused"
            if line != last:
                progress(line)
                last = line
            if not waiting or refused or time.monotonic() > deadline:
                return healthy, refused, waiting
            time.sleep(0.2)

    def run(self, model_hash: bytes, group: str, *, canary_share: float = 0.25,
            timeout_s: float = 600.0, kind: str = "rollout",
            progress: Callable[[str], None] = lambda _: None) -> RolloutReport:
        """Offer a released model to a group, canaries first; returns the report (also kept
        in the ``rollouts`` table)."""
        rec = self.release_record(model_hash)
        if rec is None:
            raise RolloutError(f"model {model_hash.hex()[:12]} was never released here")
        devices = self._devices(group)
        previous = self._serving(group)
        if kind == "rollback":
            canary, rest = sorted(devices), []
        else:
            canary, rest = plan_canary(devices, canary_share, model_hash)
        report = RolloutReport(group, rec["version"], model_hash.hex(), kind, canary, rest)
        with self.engine.begin() as conn:
            rid = conn.execute(rollouts.insert().values(
                device_group=group, model_hash=model_hash.hex(),
                previous_hash=previous.hex() if previous else None, kind=kind,
                started_ms=self._now_ms(), result="running", detail="{}")).inserted_primary_key[0]
        deadline = time.monotonic() + timeout_s
        first = OfferStage.ROLLBACK if kind == "rollback" else OfferStage.CANARY
        stages = [(first, canary)] + ([(OfferStage.FLEET, rest)] if rest else [])
        for stage, members in stages:
            progress(f"{stage}: offering {rec['version']} to {', '.join(members)}")
            for d in members:
                self._offer(d, group, model_hash, rec["version"], stage)
            healthy, refused, waiting = self._wait(members, model_hash, rec["version"], deadline,
                                                   progress)
            report.healthy += healthy
            report.refused.update(refused)
            report.waiting += waiting
            if refused or waiting:
                report.result = "halted" if refused else "timeout"
                self._restore_offers(refused.keys() | set(waiting), group, previous)
                break
        else:
            report.result = "complete"
        with self.engine.begin() as conn:
            conn.execute(rollouts.update().where(rollouts.c.id == rid).values(
                finished_ms=self._now_ms(), result=report.result,
                detail=json.dumps(report.to_dict(), sort_keys=True)))
        return report

    def _restore_offers(self, devices, group: str, previous: bytes | None) -> None:
        """Point the retained offer of devices that did not take the model back at the model
        they still run (or clear it), so a restart does not retry a refused model forever."""
        rec = self.release_record(previous) if previous else None
        for d in sorted(devices):
            if rec is not None:
                self._offer(d, group, previous, rec["version"], OfferStage.ROLLBACK)
            else:
                self._link.publish(model_offer_topic(d), b"", retain=True).wait_for_publish(30)

    def rollback(self, group: str, **options) -> RolloutReport:
        """Offer the whole group the model it ran before its latest complete rollout."""
        done = [r for r in self.history(group) if r["result"] == "complete"]
        if not done or not done[-1]["previous_hash"]:
            raise RolloutError(f"group {group!r} has no earlier model to roll back to")
        return self.run(bytes.fromhex(done[-1]["previous_hash"]), group, kind="rollback", **options)
