"""The DICOM node: the storage SCP that spools (:mod:`edge_agent.scp`), the worker pool that
de-identifies (:mod:`edge_agent.workpool`), and what to do with each outcome.

Durability contract: a C-STORE is answered Success only after the received object is in the
spool; the spooled original is removed only after the sink accepted the de-identified
instance. Feeding threads take spool ids off a queue, run each through the pool, and act on
the typed outcome: hand it to the sink (on failure, keep it spooled and try again), quarantine
it with its reason, or, when the spool could not be read back (an I/O error), try again less
and less often, never dropping it. One bad object never stops the node. Quarantine entries a
reviewer released come back into the spool with the checks they waived.

Logs name spool ids, AE titles, SOP classes and reasons — never an attribute value.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from edge_agent.config import DicomConfig
from edge_agent.errors import QuarantineError, SpoolError
from edge_agent.processor import Processor
from edge_agent.scp import Backpressure, ReceiveStats, StorageSCP
from edge_agent.sink import Sink
from edge_agent.spool import Spool
from edge_agent.workpool import (
    WORKER_NICENESS,
    InternalError,
    Outcome,
    Processed,
    Quarantine,
    RetryLater,
    SpoolReadError,
    WorkerCrashed,
    WorkPool,
)

if TYPE_CHECKING:  # the preparer arrives built; the node itself never needs the model code
    from edge_agent.preparation import Preparer

__all__ = ["EdgeNode", "NodeStats", "Backpressure"]

log = logging.getLogger("medchain.edge.node")

MAX_READ_RETRY_S = 300.0  # longest wait between tries to read a spooled object


@dataclass(frozen=True)
class Gone:
    """The spool no longer holds this id (a retry queued twice): nothing to do."""

    message: str


@dataclass
class NodeStats:
    receive: ReceiveStats = field(default_factory=ReceiveStats)
    forwarded: int = 0  # accepted by the sink
    quarantined: collections.Counter = field(default_factory=collections.Counter)
    sink_failures: int = 0
    spool_read_failures: int = 0  # spooled objects that could not be read (retried, backing off)
    # time spent de-identifying and preparing objects that came out whole (where the CPU goes)
    deid_seconds: float = 0.0
    prepare_seconds: float = 0.0

    @property
    def received(self) -> int:
        return self.receive.received

    @property
    def stored(self) -> int:  # answered Success
        return self.receive.stored

    @property
    def refused(self) -> collections.Counter:
        return self.receive.refused

    @property
    def rejected_associations(self) -> int:
        return self.receive.rejected_associations

    def as_dict(self) -> dict:
        return {"received": self.received, "stored": self.stored, "forwarded": self.forwarded,
                "refused": dict(self.refused), "quarantined": dict(self.quarantined),
                "sink_failures": self.sink_failures, "spool_read_failures": self.spool_read_failures,
                "rejected_associations": self.rejected_associations,
                "deid_seconds": round(self.deid_seconds, 3),
                "prepare_seconds": round(self.prepare_seconds, 3)}


class EdgeNode:
    """Start with ``with EdgeNode(...) as node:`` or ``start()``/``stop()``."""

    def __init__(self, dicom: DicomConfig, spool: Spool, processor: Processor, sink: Sink, *,
                 backpressure: Backpressure | None = None, retry_delay: float = 2.0,
                 precheck: bool = True, workers: int = 3, processes: int = 1,
                 preparer: Preparer | None = None, worker_niceness: int = WORKER_NICENESS,
                 release_poll_s: float = 2.0) -> None:
        self.dicom, self.spool, self.processor, self.sink = dicom, spool, processor, sink
        # with a preparer, the model-ready tensor and metadata record are made beside
        # de-identification (in the worker process) and travel to the sink in the instance
        self.preparer = preparer
        self.backpressure = backpressure
        self.retry_delay = retry_delay
        self.precheck = precheck
        self.stats = NodeStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._in_flight = 0
        self.scp: StorageSCP | None = None
        # threads that feed the pool and call the sink: >1 overlaps one's sink fsyncs with
        # another's processing; processes: worker processes (0: process in these threads)
        self.workers = max(1, workers)
        self.pool = WorkPool(processes, self.workers, worker_niceness)
        self._workers: list[threading.Thread] = []
        self._read_failures: dict[str, int] = {}  # spool id -> consecutive read failures
        self._retry_timers: list[threading.Timer] = []
        self.release_poll_s = release_poll_s  # how often to look for quarantine releases
        self._release_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> EdgeNode:
        detector = self.processor.detector if self.processor.burned_in.detect_text else None
        self.pool.start(preparing=self.preparer is not None, detector=detector)
        pending = self.spool.pending()
        if pending:
            log.info("spool holds %d object(s) from before; processing them first", len(pending))
        for spool_id in pending:
            self._queue.put(spool_id)
        self.admit_released()
        self._release_thread = threading.Thread(target=self._poll_releases, name="edge-releases", daemon=True)
        self._release_thread.start()
        self._workers = [threading.Thread(target=self._work, args=(i,), name=f"edge-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for worker in self._workers:
            worker.start()
        self.scp = StorageSCP(self.dicom, self.spool, self._queue.put, backpressure=self.backpressure,
                              precheck=self.precheck, stats=self.stats.receive, lock=self._lock).start()
        return self

    @property
    def port(self) -> int:
        return self.scp.port if self.scp is not None else self.dicom.port

    def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let open associations finish (up to ``grace`` seconds, then abort
        them), finish the object being processed, and return. Spooled work stays on disk."""
        if self.scp is None or not self.scp.running:
            return
        self.scp.stop(grace)
        self._stop.set()
        if self._release_thread is not None:
            self._release_thread.join(timeout=grace)
        for timer in self._retry_timers:
            timer.cancel()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=grace)
        self.pool.stop()
        self.spool.close()
        log.info("DICOM node stopped: %s", self.stats.as_dict())

    def __enter__(self) -> EdgeNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until nothing is queued or in flight (tests, demo). True when drained."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue.unfinished_tasks or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def admit_released(self) -> int:
        """Take the quarantine entries a reviewer released back into the spool, with the checks
        they waived, and queue them; returns how many."""
        admitted = 0
        for request in self.spool.quarantine_store.release_requests():
            try:
                spool_id = self.spool.readmit(request.spool_id, request.waived)
            except (QuarantineError, SpoolError, OSError) as exc:
                log.error("quarantine entry %s could not be released (%s); left in quarantine",
                          request.spool_id, exc.__class__.__name__)
                continue
            log.info("quarantine entry %s released as spool entry %s%s", request.spool_id, spool_id,
                     f" (waived: {', '.join(sorted(request.waived))})" if request.waived else "")
            self._queue.put(spool_id)
            admitted += 1
        return admitted

    def _poll_releases(self) -> None:
        while not self._stop.wait(self.release_poll_s):
            self.admit_released()

    # -- feeding threads -----------------------------------------------------------------------

    def _retry_later(self, spool_id: str, delay: float | None = None) -> None:
        timer = threading.Timer(self.retry_delay if delay is None else delay, self._queue.put,
                                args=(spool_id,))
        timer.daemon = True
        self._retry_timers = [t for t in self._retry_timers if t.is_alive()] + [timer]
        timer.start()

    def _work(self, index: int) -> None:
        while True:
            spool_id = self._queue.get()
            try:
                if spool_id is None or self._stop.is_set():
                    return
                with self._idle:
                    self._in_flight += 1
                try:
                    self._process(spool_id, index)
                finally:
                    with self._idle:
                        self._in_flight -= 1
            finally:
                with self._idle:
                    self._queue.task_done()
                    self._idle.notify_all()

    def _run(self, spool_id: str, index: int) -> Outcome | Gone:
        """Process one spooled object with the checks its reviewer waived, if any."""
        try:
            ref = self.spool.ref(spool_id)
        except SpoolError as exc:
            return Gone(str(exc))
        waived = self.spool.waived(spool_id)
        processor = replace(self.processor, waived=waived) if waived else self.processor
        return self.pool.run(processor, ref, spool_id, self.preparer, index)

    def _process(self, spool_id: str, index: int) -> None:
        outcome = self._run(spool_id, index)
        if self._read_failures and not isinstance(outcome, SpoolReadError):
            with self._lock:  # only ever after a read failure: no lock per object otherwise
                self._read_failures.pop(spool_id, None)
        match outcome:
            case RetryLater():
                if not self._stop.is_set():
                    self._queue.put(spool_id)
            case Gone(message):
                log.debug("%s", message)
            case SpoolReadError(message):
                self._read_failed(spool_id, message)
            case Quarantine(reason, detail):
                self._quarantine(spool_id, reason, detail)
            case WorkerCrashed(detail):
                self._quarantine(spool_id, "worker-crashed", detail)
            case InternalError(exception):
                # class name only: exception text from a parser may quote attribute values
                self._quarantine(spool_id, "internal-error", exception)
            case Processed():
                self._forward(spool_id, outcome)

    def _read_failed(self, spool_id: str, message: str) -> None:
        """The object got Success and is on disk: keep trying (a disk or descriptor problem may
        pass), less and less often, and say so each time."""
        with self._lock:
            self.stats.spool_read_failures += 1
            failures = self._read_failures[spool_id] = self._read_failures.get(spool_id, 0) + 1
        delay = min(self.retry_delay * 2 ** (failures - 1), MAX_READ_RETRY_S)
        log.error("%s; kept spooled, retrying in %.1f s (attempt %d)", message, delay, failures)
        if not self._stop.is_set():
            self._retry_later(spool_id, delay)

    def _quarantine(self, spool_id: str, reason: str, detail: str) -> None:
        try:
            self.spool.quarantine(spool_id, reason, detail)
        except OSError as exc:
            log.error("spool entry %s could not be quarantined (%s); left spooled", spool_id,
                      exc.__class__.__name__)
            return
        with self._lock:
            self.stats.quarantined[reason] += 1
        log.warning("spool entry %s quarantined: %s", spool_id, f"{reason}: {detail}" if detail else reason)

    def _forward(self, spool_id: str, done: Processed) -> None:
        with self._lock:
            self.stats.deid_seconds += done.deid_seconds
            self.stats.prepare_seconds += done.prepare_seconds
        try:
            self.sink.accept(done.instance)
        except Exception as exc:
            with self._lock:
                self.stats.sink_failures += 1
            log.warning("sink refused spool entry %s (%s); kept spooled, retrying in %.1f s",
                        spool_id, exc.__class__.__name__, self.retry_delay)
            if not self._stop.is_set():
                self._retry_later(spool_id)
            return
        self.spool.remove(spool_id)
        with self._lock:
            self.stats.forwarded += 1
        log.debug("spool entry %s forwarded as %s", spool_id, done.instance.modality)
