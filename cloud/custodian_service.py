"""The custodian as a process of its own: the only holder of the custodian key.

``medchain cloud custodian --config custodian.toml`` opens the key backend
(:mod:`cloud.keybackend`), listens on a Unix socket (mode 0660: the training service's user
or group, nobody else) and serves :class:`~cloud.custodian_protocol.ReleaseRequest`s signed
by a principal it serves (``training`` by default). For each, the
:class:`~cloud.custodian.Custodian` inside this process files ``ACCESS_REQUESTED`` on the
ledger as the ``custodian`` principal on behalf of the asking one and releases only what
the ledger grants and whose object id and Merkle root match the ledger's record; every
release and refusal is logged and counted (:attr:`CustodianServer.counts`, and with
``metrics_port`` set, ``GET /metrics`` in the Prometheus format beside the fetches that
established no principal, :mod:`cloud.auth_failures`). People's fetches
(``"kind": "fetch"``) are answered by :mod:`cloud.custodian_access`: data keys re-wrapped to
the requester after its committed grant and a fresh decision. The coordinator,
ingest, enrolment and the training service hold the custodian's public key only.

The configuration (TOML, relative paths against its folder)::

    [custodian]  socket, serve = ["training"], key = "keys/custodian.key",
                 failures_log, metrics_port (off unless set), metrics_host = "127.0.0.1" (loopback only)
    [custodian.pkcs11]  module, token, pin_file, wrapped, key_label   (instead of key)
    [ledger]     genesis, key (the custodian principal's), principal = "custodian"
    [store]      url
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily

from ledger.client import LedgerClient
from ledger.genesis import Genesis
from ledger.tls import is_loopback
from medchain.canonical import decode
from medchain.errors import ConfigError, EncodingError, MedChainError
from medchain.identity import SigningKey, VerifyKey
from medchain.settings import ConfigFile

from cloud.access_protocol import FETCH_KIND
from cloud.auth_failures import FailureLog
from cloud.catalog import CatalogEntry
from cloud.custodian import AccessFailed, AccessReport, Custodian, Released
from cloud.custodian_access import AccessGate
from cloud.custodian_protocol import (
    ReleasedItem,
    ReleaseReply,
    ReleaseRequest,
    ReplayGuard,
    frame,
    frame_length,
)
from cloud.errors import CustodianError, CustodianRefused
from cloud.keybackend import KeyBackend, Pkcs11Settings, open_backend
from cloud.objectstore import open_store

__all__ = ["CustodianConfig", "load_custodian_config", "CustodianServer", "RemoteCustodian", "ask_custodian"]

log = logging.getLogger("medchain.custodian")


@dataclass(frozen=True)
class CustodianConfig:
    socket: Path
    key: Path | Pkcs11Settings
    genesis: Path
    ledger_key: Path
    store_url: str
    principal: str = "custodian"
    serve: tuple[str, ...] = ("training",)
    # append-only log of fetches whose signature does not verify (cloud.auth_failures)
    failures_log: Path | None = None
    # Prometheus metrics over HTTP (GET /metrics): refusals and releases; off unless a port is set
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


def load_custodian_config(path: str | Path) -> CustodianConfig:
    f = ConfigFile(path, ConfigError, "custodian configuration")
    section, origin = f.section, f.origin
    c = section("custodian")
    sock = c.path("socket", "custodian.sock")
    serve = tuple(c.list("serve", str, ["training"], min_len=1))
    failures_log = c.path("failures_log", None)
    metrics_port = c.int("metrics_port", None, lo=0, hi=65535)
    metrics_host = c.str("metrics_host", "127.0.0.1")
    if not is_loopback(metrics_host):  # plain HTTP on the key holder: never beyond this host
        raise ConfigError(f"{origin}: [custodian] metrics_host {metrics_host!r}: the custodian serves "
                          "metrics on loopback only; scrape it through a local agent or TLS proxy")
    key_file = c.path("key", None)
    key: Path | Pkcs11Settings | None = key_file
    if "pkcs11" in c.table:
        p = c.sub("pkcs11")
        settings = Pkcs11Settings(module=p.path("module"), token=p.str("token"), pin_file=p.path("pin_file"),
                                  wrapped=p.path("wrapped"), key_label=p.str("key_label", "medchain-custodian"))
        p.done()
        if key_file is not None:
            raise ConfigError(f"{origin}: [custodian] key and [custodian.pkcs11]: choose one")
        key = settings
    c.done()
    if key is None:
        raise ConfigError(f"{origin}: [custodian] needs key (a key file) or [custodian.pkcs11] (a token)")
    s = section("ledger")
    genesis, ledger_key, principal = s.path("genesis"), s.path("key"), s.str("principal", "custodian")
    s.done()
    s = section("store")
    url = s.str("url")
    s.done()
    f.done()
    return CustodianConfig(sock, key, genesis, ledger_key, f.url(url), principal, serve, failures_log,
                           metrics_port, metrics_host)


class CustodianServer:
    """The custodian's shell: key backend, ledger client, store, and the socket. A context
    manager; ``backend`` may be given (tests, or a key already opened)."""

    def __init__(self, config: CustodianConfig, *, backend: KeyBackend | None = None,
                 clock: Callable[[], float] = time.time):
        self.config, self._clock = config, clock
        self.backend = backend
        self.counts: Counter = Counter()
        self._ledger: LedgerClient | None = None
        self._server: socketserver.UnixStreamServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one release at a time: the ledger client is shared
        self._guard = ReplayGuard()
        principals = {p.name: p for p in Genesis.load(config.genesis).principals}
        missing = [name for name in config.serve if name not in principals]
        if missing:
            raise ConfigError(f"custodian: principal(s) {missing} to serve are not in the genesis")
        self._keys = {name: VerifyKey.from_hex(principals[name].public_key) for name in config.serve}
        self._custodians: dict[str, Custodian] = {}
        self._gate: AccessGate | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Events(self.counts))
        self._metrics: WSGIServer | None = None

    def __enter__(self) -> CustodianServer:
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
        if len(os.fsencode(c.socket)) > 100:  # sun_path is 108 bytes on Linux, 104 on BSDs
            raise ConfigError(f"[custodian] socket {c.socket}: path too long for a Unix socket; "
                              "choose a shorter one")
        if self.backend is None:
            self.backend = open_backend(c.key)
        self._ledger = LedgerClient(c.genesis, SigningKey.load(c.ledger_key), c.principal)
        self._ledger.start()
        store = open_store(c.store_url)
        self._custodians = {name: Custodian(self._ledger, store, self.backend, user=name) for name in c.serve}
        self._gate = AccessGate(self._ledger, store, self.backend, self._guard,
                                FailureLog(c.failures_log, registry=self.registry))
        c.socket.parent.mkdir(parents=True, exist_ok=True)
        if c.socket.exists():
            c.socket.unlink()  # a stale socket of a previous run
        handler = _handler(self)
        old = os.umask(0o117)  # the socket: owner and group only
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(c.socket), handler)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="custodian", daemon=True)
        self._thread.start()
        if c.metrics_port is not None:
            self._metrics, _ = start_http_server(c.metrics_port, c.metrics_host, registry=self.registry)
            log.info("custodian metrics on http://%s:%d/metrics", *self.metrics_address)
        log.info("custodian up: key %s (%s), socket %s, serving %s", self.backend.public.id,
                 type(self.backend).__name__, c.socket, ", ".join(c.serve))

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served (the port the system chose for ``metrics_port = 0``)."""
        return None if self._metrics is None else (self.config.metrics_host, self._metrics.server_port)

    def stop(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            if self.config.socket.exists():
                self.config.socket.unlink()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self.backend is not None:
            self.backend.close()

    def respond(self, data: bytes) -> bytes:
        """One frame in, one frame out: a person's fetch (:mod:`cloud.custodian_access`)
        or a service's release request."""
        try:
            outer = decode(data)
        except EncodingError:
            outer = None
        if isinstance(outer, dict) and outer.get("kind") == FETCH_KIND:
            reply = self._gate.answer(outer, int(self._clock() * 1000))
            self.counts.update(self._gate.counts)
            self._gate.counts.clear()
            return reply.encode()
        return self.answer(data).encode()

    def answer(self, data: bytes) -> ReleaseReply:
        """One request in, one reply out (the pure part of serving, locks aside)."""
        try:
            request = ReleaseRequest.verified(data, self._keys, now_ms=int(self._clock() * 1000),
                                              guard=self._guard)
        except CustodianRefused as exc:
            self.counts["requests refused"] += 1
            log.warning("custodian: request refused: %s", exc)
            return ReleaseReply(error=f"refused: {exc}")
        entries = [CatalogEntry(e, d, 0, "", 0, 0, None, {}) for e, d in request.items]
        try:
            released, report = self._custodians[request.principal].release(
                entries, request.purpose, names=request.names, action=request.action)
        except AccessFailed as exc:
            self.counts["requests failed"] += 1
            log.warning("custodian: %s", exc)
            return ReleaseReply(error=f"failed: {exc}")
        for r in released:
            log.info("custodian: released %s to %s for %r (audit %d)", r.entry.envelope_id,
                     request.principal, request.purpose, r.audit_id)
        for envelope_id, reason in report.denied_ids:
            log.info("custodian: refused %s to %s for %r: %s", envelope_id, request.principal,
                     request.purpose, reason)
        self.counts["released"] += len(released)
        self.counts["denied"] += sum(report.denied.values())
        self.counts["unreadable"] += sum(report.unreadable.values())
        log.info("custodian: %s for %r (%s): %d released; %s", request.principal, request.purpose,
                 request.action, len(released), report.summary())
        return ReleaseReply(tuple(ReleasedItem(r.entry.envelope_id, r.parts, r.audit_id) for r in released),
                            report)

    def serve(self, ready: Callable[[CustodianServer], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        with self:
            if ready:
                ready(self)
            while not stop.wait(0.5):
                pass


class _Events:
    """The server's running counts (released, denied, unreadable, refused, ...) as one
    Prometheus counter labelled by event, read at scrape time (the registry describes it by
    collecting)."""

    def __init__(self, counts: Counter):
        self._counts = counts

    def collect(self):
        family = CounterMetricFamily("medchain_custodian_events", "Images released, denied and unreadable, "
                                     "keys re-wrapped and refused, requests and fetches refused, since the "
                                     "custodian started.", labels=["event"])
        for event, n in sorted(dict(self._counts).items()):
            family.add_metric([event], n)
        yield family


def _read_frame(sock: socket.socket) -> bytes | None:
    head = _read_exact(sock, 4)
    if head is None:
        return None
    body = _read_exact(sock, frame_length(head))
    if body is None:
        raise CustodianError("custodian connection closed mid-message")
    return body


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None if not buf else bytes(buf)
        buf += chunk
    return bytes(buf)


def _handler(server: CustodianServer):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                while (data := _read_frame(self.request)) is not None:
                    with server._lock:
                        reply = server.respond(data)
                    self.request.sendall(frame(reply))
            except (CustodianError, OSError, MedChainError) as exc:  # a bad client, never a dead server
                log.warning("custodian: connection dropped: %s", exc)
    return Handler


class RemoteCustodian:
    """The training service's side: :meth:`release` as :class:`Custodian` offers it, each
    batch a request signed by ``key`` (principal ``principal``) to the custodian process."""

    def __init__(self, socket_path: str | Path, key: SigningKey, *, principal: str = "training",
                 batch: int = 128, timeout: float = 600.0, clock: Callable[[], float] = time.time):
        self.path, self._key, self.principal, self.batch = Path(socket_path), key, principal, batch
        self.timeout, self._clock = timeout, clock

    def release(self, entries: Iterable[CatalogEntry], purpose: str, *, names: Sequence[str] | None = None,
                action: str = "read") -> tuple[list[Released], AccessReport]:
        entries = list(entries)
        by_id = {e.envelope_id: e for e in entries}
        released: list[Released] = []
        report = AccessReport()
        for start in range(0, len(entries), self.batch):
            chunk = entries[start:start + self.batch]
            request = ReleaseRequest.new(self.principal, purpose, [(e.envelope_id, e.device_id) for e in chunk],
                                         names, action=action, now_ms=int(self._clock() * 1000))
            reply = ReleaseReply.decode(self._ask(request.signed(self._key)))
            if reply.error is not None:
                kind = CustodianRefused if reply.error.startswith("refused") else AccessFailed
                raise kind(f"custodian: {reply.error}")
            released += [Released(by_id[r.envelope_id], r.parts, r.audit_id) for r in reply.released]
            report.merge(reply.report)
        return released, report

    def _ask(self, data: bytes) -> bytes:
        return ask_custodian(self.path, data, self.timeout)


def ask_custodian(path: Path, data: bytes, timeout: float = 600.0) -> bytes:
    """Send one request frame to the custodian's socket; its reply frame."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(frame(data))
            answer = _read_frame(sock)
    except OSError as exc:
        raise CustodianError(f"custodian at {path} not reachable: {exc.strerror or exc} "
                             "(is `medchain cloud custodian` running?)") from None
    if answer is None:
        raise CustodianError(f"custodian at {path} closed the connection")
    return answer
