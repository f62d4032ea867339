"""The embedded MQTT broker: the one-machine default when no Mosquitto/EMQX is installed.

It runs amqtt (a pure-Python MQTT 3.1.1 broker) on loopback, either on a thread of the
calling process (:class:`EmbeddedBroker`) or as a process of its own
(:class:`BrokerProcess`, ``medchain cloud broker``): moving large messages through a Python
broker costs CPU that should not compete with ingest for one interpreter lock. It keeps
nothing on disk and has no shared subscriptions: good for the demo and for a laptop; a
hospital deployment points edge and cloud at a real broker instead.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medchain.mqtt import MqttEndpoint

from cloud.errors import BrokerError

__all__ = ["EmbeddedBroker", "BrokerSecurity", "BrokerProcess", "BrokerError", "free_port"]


class _Payload(bytearray):
    """A message payload whose ``repr`` is its size, not its bytes.

    amqtt (0.12) formats every message it relays into a debug f-string, payload included,
    whether or not debug logging is on: for our ~0.6 MB envelopes that ``repr`` cost ~10 ms
    of broker CPU per message, most of what relaying one costs (py-spy, bench/pipeline.py).
    """

    def __repr__(self) -> str:
        return f"<{len(self)}-byte payload>"


class _BroadcastQueue(asyncio.Queue):
    """amqtt's broadcast queue, handing each payload on as a :class:`_Payload`."""

    def put_nowait(self, item) -> None:
        data = item.get("data") if isinstance(item, dict) else None
        if isinstance(data, (bytes, bytearray)) and not isinstance(data, _Payload):
            item["data"] = _Payload(data)
        super().put_nowait(item)


def _cheap_payload_repr(broker) -> None:
    """Give ``broker`` a :class:`_BroadcastQueue` (a private attribute: the fix belongs in
    amqtt). A later amqtt without that queue only loses the saving."""
    queue = getattr(broker, "_broadcast_queue", None)
    if type(queue) is asyncio.Queue and queue.empty():
        broker._broadcast_queue = _BroadcastQueue()
    else:
        logging.getLogger(__name__).info("amqtt has no broadcast queue to patch; payloads "
                                         "are formatted for its debug log as they come")


class _SnapshotDict(dict):
    """A dict whose iteration walks a copy: amqtt (0.12) awaits inside ``for topic in
    self._subscriptions`` when a client connects, and another client subscribing meanwhile
    ended the connecting one with "dictionary changed size during iteration"."""

    def __iter__(self):
        return iter(list(super().__iter__()))

    def items(self):
        return list(super().items())


def _fix_amqtt(broker) -> None:
    """Two amqtt (0.12) faults, mended on the instance (the fixes belong in amqtt):
    iteration over subscriptions that others change (:class:`_SnapshotDict`), and a client
    that reconnects to its persistent session being authenticated with the TLS object of
    its *previous* connection (amqtt carries the stored session over and keeps its stale
    ``ssl_object``): the certificate checked must be the one this connection presented."""
    broker._subscriptions = _SnapshotDict(broker._subscriptions)
    initialize = broker._initialize_client_session

    async def initialize_with_this_connection(reader, writer, *args, **kwargs):
        handler, session = await initialize(reader, writer, *args, **kwargs)
        session.ssl_object = writer.get_ssl_info()
        return handler, session

    broker._initialize_client_session = initialize_with_this_connection


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BrokerSecurity:
    """What the embedded broker needs to hold clients to the deployment's rules: the CA and
    its CRL, the broker's own certificate and key, and the generated ACL file."""

    ca: Path
    cert: Path
    key: Path
    crl: Path
    acl: Path


class EmbeddedBroker:
    """``with EmbeddedBroker(security=...) as broker: broker.endpoint`` — started and stopped
    cleanly. With ``security`` (the default everywhere but tests of the broker itself) it
    speaks TLS only, takes only clients whose certificate the CA issued, not revoked, for a
    name the ACL knows, and applies the ACL; without it, anyone on loopback may connect."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 10.0,
                 security: BrokerSecurity | None = None):
        if security is None and host not in ("127.0.0.1", "::1", "localhost"):
            raise BrokerError(f"embedded broker on {host}: without TLS and client certificates it "
                              "listens on loopback only")
        self.host = host
        self.security = security
        self.port = port or free_port(host)
        self._start_timeout = start_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> MqttEndpoint:
        """Where clients connect (without a client certificate: add one with
        ``dataclasses.replace(endpoint, tls_cert=..., tls_key=...)``)."""
        return MqttEndpoint(host=self.host, port=self.port, max_message_bytes=8 * 1024 * 1024,
                            tls_ca=str(self.security.ca) if self.security else None)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._check_bindable()
        for name in ("amqtt", "transitions"):  # their INFO lines would drown ours
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._serve, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout) or self._error:
            raise BrokerError(f"embedded broker on {self.host}:{self.port} did not start: {self._error}")

    def _check_bindable(self) -> None:
        """A port in use or out of range is one clear error here, rather than amqtt's
        traceback in the log followed by a start that never comes."""
        try:
            with socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio binds
                probe.bind((self.host, self.port))
        except (OSError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise BrokerError(f"embedded broker cannot listen on {self.host}:{self.port}: {reason}") from None

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop and self._stop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    def _serve(self) -> None:
        from amqtt.broker import Broker  # imported here: only the embedded default needs it

        listener = {"type": "tcp", "bind": f"{self.host}:{self.port}"}
        plugins: dict = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        sec = self.security
        if sec is not None:
            listener.update(ssl=True, cafile=str(sec.ca), certfile=str(sec.cert), keyfile=str(sec.key))
            plugins = {"cloud.broker_security.CertificateAuth": {"crl": str(sec.crl), "acl": str(sec.acl)},
                       "cloud.broker_security.FileAcl": {"acl": str(sec.acl)}}
        config = {"listeners": {"default": listener}, "plugins": plugins}

        async def main() -> None:
            self._stop = asyncio.Event()
            broker = Broker(config)
            _cheap_payload_repr(broker)
            _fix_amqtt(broker)
            await broker.start()
            self._ready.set()
            await self._stop.wait()
            await broker.shutdown()
            current = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not current]
            for task in rest:  # amqtt leaves per-client handler tasks behind
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
            self._ready.set()
        finally:
            # finalize amqtt's stray coroutines while their loop still takes callbacks: once
            # closed, each one collected later raises "Event loop is closed" from a finalizer
            gc.collect()
            try:
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            finally:
                self._loop.close()


class BrokerProcess:
    """The embedded broker as a child process (``medchain cloud broker``), started and
    stopped as a context manager; ``endpoint`` as for :class:`EmbeddedBroker`. With
    ``config`` (a ``cloud.toml`` from ``cloud init``) it serves that deployment's mutual TLS
    and ACL on the configured address; without, anonymous clients on loopback (a plain
    baseline for benchmarks and the broker's own tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, start_timeout: float = 20.0,
                 config: Path | None = None, endpoint: MqttEndpoint | None = None):
        self.config, self._endpoint = config, endpoint
        self.host = endpoint.host if endpoint else host
        self.port = endpoint.port if endpoint else port or free_port(host)
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> MqttEndpoint:
        return self._endpoint or MqttEndpoint(host=self.host, port=self.port, max_message_bytes=8 * 1024 * 1024)

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud", "cloud", "broker",
             *(["--config", str(self.config)] if self.config else ["--host", self.host, "--port", str(self.port)])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"broker process on {self.host}:{self.port} exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"broker process on {self.host}:{self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
