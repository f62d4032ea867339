"""The cloud coordinator: the services one cloud process runs, wired from its configuration.

Ingest (MQTT in, object store and ledger out, signed acks back), the prediction log that
commits edge predictions to the ledger in batches, the heartbeat monitor that keeps the
fleet registry current, and — when configured — the embedded broker they talk
through. A context manager: started in dependency order, stopped in reverse.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import uuid
from collections.abc import Callable

from ledger.client import LedgerClient
from medchain.identity import RecipientKey, RecipientPublicKey, SigningKey
from medchain.errors import ConfigError
from medchain.mqtt import MqttEndpoint

from cloud.broker import EmbeddedBroker
from cloud.catalog import Catalog
from cloud.config import CloudConfig
from cloud.fleet import FleetRegistry
from cloud.ingest import IngestService
from cloud.monitor import HeartbeatMonitor
from cloud.objectstore import open_store
from cloud.predictions import PredictionLog
from cloud.registration import LedgerDirectory, LedgerRegistrar

__all__ = ["Coordinator"]

log = logging.getLogger("medchain.cloud")


class Coordinator:
    def __init__(self, config: CloudConfig, *, endpoint: MqttEndpoint | None = None):
        self.config = config
        self._endpoint = endpoint
        self.broker: EmbeddedBroker | None = None
        self.ledger: LedgerClient | None = None
        self.ingest: IngestService | None = None
        self.monitor: HeartbeatMonitor | None = None
        self.predictions: PredictionLog | None = None
        self.ingest_key = SigningKey.load(config.ingest_key)
        # the public half only: the private key is the custodian process's (cloud.custodian_service)
        self.custodian_public = RecipientPublicKey.load(config.custodian_key)
        self.meta_key = RecipientKey.load(config.meta_key)
        self.store = open_store(config.store_url)
        self.catalog = Catalog(config.database_url)
        self.fleet = FleetRegistry(self.catalog.engine)

    @property
    def endpoint(self) -> MqttEndpoint:
        if self._endpoint is not None:
            return self._endpoint
        if self.broker is not None:  # the configured identity (client certificate), the port it got
            return dataclasses.replace(self.config.endpoint, host=self.broker.host, port=self.broker.port)
        return self.config.endpoint

    def __enter__(self) -> Coordinator:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        c = self.config
        if c.embedded_broker and self._endpoint is None:
            # the embedded broker too takes only the deployment's certificates: no anonymous clients
            if c.pki_dir is None or not (c.pki_dir / "ca.crt").exists():
                raise ConfigError(f"[broker] embedded = true needs the deployment's certificate authority "
                                  f"({c.pki_dir or 'pki'}/ca.crt): run `medchain cloud init --embedded`")
            from cloud.provision import broker_security, rewrite_acl  # noqa: PLC0415

            rewrite_acl(c, self.fleet)  # the ACL from the registry as it is now
            self.broker = EmbeddedBroker(c.endpoint.host, c.endpoint.port or None, security=broker_security(c))
            self.broker.start()
        self.ledger = LedgerClient(c.genesis, self.ingest_key, "ingest")
        self.ledger.start()
        self.predictions = PredictionLog(self.catalog, self.ledger)
        self.predictions.start()
        self.ingest = IngestService(
            self.endpoint, directory=LedgerDirectory(self.ledger), store=self.store,
            catalog=self.catalog, registrar=LedgerRegistrar(self.ledger, c.policy),
            ingest_key=self.ingest_key, meta_key=self.meta_key, shared_group=c.shared_group, workers=c.workers,
            on_stored=self.predictions.add, known=self.fleet.knows,
        )
        self.ingest.start()
        # retained heartbeats come back on every subscribe: no session to keep, so a unique id
        # lets several coordinators share one broker
        self.monitor = HeartbeatMonitor(self.endpoint, self.fleet,
                                        client_id=f"cloud-monitor-{uuid.uuid4().hex[:8]}")
        self.monitor.__enter__()
        log.info("cloud coordinator up: broker %s, store %s, ledger %s",
                 self.endpoint.describe(), c.store_url, c.genesis)

    def stop(self) -> None:
        for part in (self.monitor, self.ingest):
            if part is not None:
                try:
                    part.__exit__(None, None, None)
                except Exception:  # stopping one part must not keep the others running
                    log.exception("while stopping %s", type(part).__name__)
        self.monitor = self.ingest = None
        if self.predictions is not None:
            self.predictions.stop()  # commits what ingest stored before it stopped
            self.predictions = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def serve(self, ready: Callable[[Coordinator], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT, then stop cleanly."""
        stop = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: stop.set())
        try:
            with self:
                if ready:
                    ready(self)
                while not stop.wait(0.5):
                    pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
