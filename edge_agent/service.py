"""The whole edge agent: DICOM node -> packager -> durable outbox -> uplink, from a profile,
with the model manager that installs signed releases and serves predictions.

The one place that joins the pieces: it reads the device key and the enrolment file (the
cloud's public keys), opens the outbox and the clinical records, and wires back-pressure
(the node answers Out of Resources while the outbox cannot take more) and the nudge (the
uplink looks at the outbox as soon as something is added). Start and stop it as a context
manager; stopping lets the node finish the object in hand, then the uplink, then closes the
stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from medchain.errors import KeyFileError, ProtocolError
from medchain.identity import RecipientPublicKey, SigningKey, VerifyKey
from medchain.mqtt import MqttEndpoint
from medchain.protocol import Enrollment
from models.modality import ModalityConfig, config_for

from edge_agent.agent import build_node, serve
from edge_agent.config import PreprocessConfig, Profile
from edge_agent.errors import ConfigError
from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.packager import Packager
from edge_agent.records import RecordStore
from edge_agent.rollout import ModelManager, ReleaseTrust
from edge_agent.uplink import Uplink, UplinkSettings

__all__ = ["EdgeAgent", "load_enrollment", "load_device_key", "modality_configs", "endpoint_of"]


def load_device_key(profile: Profile) -> SigningKey:
    if profile.device.key is None:
        raise ConfigError(f"{profile.name}: [device] key is not set (create one with: "
                          "medchain keys new signing PATH)")
    try:
        return SigningKey.load(profile.device.key)
    except KeyFileError as exc:
        raise ConfigError(f"device key: {exc}") from None


def load_enrollment(profile: Profile, device_key: SigningKey) -> Enrollment:
    path = profile.cloud.enrollment
    if path is None:
        raise ConfigError(f"{profile.name}: [cloud] enrollment is not set: this device is not "
                          "enrolled (the operator runs `medchain cloud enroll`)")
    try:
        enrollment = Enrollment.from_json(Path(path).read_text(), where=str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: enrolment file not found: this device is not enrolled") from None
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None
    if enrollment.device_id != profile.device.id or enrollment.device_key != device_key.public.raw:
        raise ConfigError(f"{path}: issued for device {enrollment.device_id!r} with another key, "
                          f"not for {profile.device.id!r} with {device_key.public.id}")
    return enrollment


def modality_configs(profile: Profile) -> dict[str, ModalityConfig]:
    """The profile's [preprocess.*] tables as preprocessing configs (defaults fill the rest)."""

    def one(p: PreprocessConfig) -> ModalityConfig:
        rows, cols = p.target_size
        if rows != cols:
            raise ConfigError(f"{profile.name}: [preprocess.{p.modality}] target_size must be square")
        return replace(config_for(p.modality), size=rows, interpolation=p.interpolation,
                       window=p.window, denoise=p.denoise)

    return {m: one(p) for m, p in profile.preprocess.items()}


def endpoint_of(profile: Profile) -> MqttEndpoint:
    m = profile.mqtt
    return MqttEndpoint(
        host=m.host, port=m.port, keepalive=m.keepalive, max_message_bytes=m.max_message_bytes,
        tls_ca=str(m.tls.ca) if m.tls else None, tls_cert=str(m.tls.cert) if m.tls else None,
        tls_key=str(m.tls.key) if m.tls else None,
    )


class EdgeAgent:
    """``with EdgeAgent(profile, secret) as agent:`` — node, packager, outbox and uplink."""

    def __init__(self, profile: Profile, secret: bytes, *, endpoint: MqttEndpoint | None = None,
                 port: int | None = None, host: str | None = None,
                 clock: Callable[[], float] = time.time):
        self.profile = profile
        key = load_device_key(profile)
        enrollment = load_enrollment(profile, key)
        limits = OutboxLimits(profile.outbox.max_bytes, profile.outbox.max_count,
                              profile.outbox.min_disk_free_bytes)
        self.outbox = Outbox(profile.outbox.path, limits)
        self.records = RecordStore(profile.records.path)
        endpoint = endpoint or endpoint_of(profile)
        inf = profile.inference
        self.models = ModelManager(inf.models_dir, device_id=profile.device.id, device_key=key,
                                   trust=ReleaseTrust.from_enrollment(enrollment), endpoint=endpoint,
                                   providers=inf.execution_providers, threads=inf.threads,
                                   precision=inf.precision, clock=clock)
        u = profile.uplink
        self.uplink = Uplink(self.outbox, endpoint, device_id=profile.device.id,
                             device_key=key, cloud_key=VerifyKey(enrollment.ingest_key),
                             settings=UplinkSettings(u.window, u.resend_after_s, u.heartbeat_s),
                             model_version=self.models.model_version, clock=clock)
        self.packager = Packager(self.outbox, device_id=profile.device.id, device_key=key,
                                 custodian=RecipientPublicKey(enrollment.custodian_key),
                                 meta_key=RecipientPublicKey(enrollment.meta_key),
                                 preprocess=modality_configs(profile), records=self.records,
                                 clock=clock, on_enqueued=self.uplink.nudge,
                                 predict=self.models.predict, serves=self.models.serves)
        # the node's worker process prepares tensors beside de-identification, as configured here
        self.node = build_node(profile, secret, self.packager, backpressure=self._backpressure,
                               port=port, host=host, preparer=self.packager.preparer)

    def _backpressure(self) -> str | None:
        return self.packager.backpressure(self.node.spool.pending_bytes)

    def __enter__(self) -> EdgeAgent:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.models.start()
        self.uplink.start()
        self.node.start()

    def stop(self) -> None:
        try:
            self.node.stop()
        finally:
            self._close()

    def _close(self) -> None:
        self.uplink.stop()
        self.models.stop()
        self.outbox.close()
        self.records.close()

    def serve(self, ready: Callable[[EdgeAgent], None] | None = None) -> dict:
        """Run until SIGTERM/SIGINT (see :func:`edge_agent.agent.serve`), then shut down."""
        self.models.start()
        self.uplink.start()
        try:
            serve(self.node, ready=(lambda _node: ready(self)) if ready else None)
        finally:
            self._close()
        return self.stats()

    def stats(self) -> dict:
        return {
            "node": self.node.stats.as_dict(),
            "packaged": self.packager.stats.packaged,
            "predicted": self.packager.stats.predicted,
            "model": self.models.model_version() or None,
            "model_precision": self.models.serving_precision() or None,
            "model_offers_refused": self.models.offers_refused,
            "outbox_depth": self.outbox.depth,
            "uplink": {"published": self.uplink.stats.published, "released": self.uplink.stats.released,
                       "rejected": self.uplink.stats.rejected, "bad_acks": self.uplink.stats.bad_acks,
                       "unmatched_acks": self.uplink.stats.unmatched_acks},
        }
