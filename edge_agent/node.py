"""The DICOM node: a pynetdicom SCP that spools, then a worker that de-identifies and hands off.

The shell around the pure cores. What a PACS administrator sees is an ordinary storage SCP:
C-ECHO, C-STORE of every storage SOP class in every transfer syntax we can decode, calling
AE titles checked at association, a PDU size and an association limit from the profile.

Durability contract: a C-STORE is answered Success only after the received object is in the
spool (appended and fdatasynced); the spooled original is removed only after the sink accepted
the de-identified instance. Malformed objects get a failure status (cannot be parsed) or a
quarantine entry (parsed, but cannot be de-identified or decoded); one bad object never
stops the node. Back-pressure: a callable that returns a reason (or the spool's own
``max_bytes``) makes C-STORE answer 0xA700 Out of Resources without storing anything.

Processing (parse, de-identify, pixel check, re-encode and, given a preparer, the model-ready
tensor and metadata record) runs by default in a separate worker process, so that it uses a
core of its own instead of sharing the GIL with the SCP threads that answer the scanner; the
worker threads here only hand spool locations over, then call the sink and remove the spool
entry; the de-identified file comes back through shared memory (:mod:`edge_agent.handback`).
A worker process that dies (a decoder crashing on a hostile file) is replaced; the instances
it held are retried, each suspect one alone, and the one that kills a worker on its own is
quarantined as ``worker-crashed``: one bad object never stops the node. A spooled object
that cannot be read back (an I/O error) is tried again, less and less often, never dropped.
Worker processes are spawned, so a script that starts a node needs the usual
``if __name__ == "__main__":`` guard (or pass ``processes=0``).

Logs name spool ids, AE titles, SOP classes and reasons — never an attribute value.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pydicom.pixels import get_decoder
from pydicom.uid import RLELossless

from edge_agent.config import DicomConfig
from edge_agent.errors import Quarantined, QuarantineError, SpoolError, SpoolFull
from edge_agent.handback import Handback, Slot, write_slot
from edge_agent.pipeline import Processor, parse_received
from edge_agent.sink import DeidentifiedInstance, Sink
from edge_agent.spool import Spool, SpoolRef, read_ref
from edge_agent.textdetect import TextDetector

if TYPE_CHECKING:  # the preparer arrives built; the node itself never needs the model code
    from edge_agent.preparation import Preparer

__all__ = ["EdgeNode", "NodeStats", "SUCCESS", "OUT_OF_RESOURCES", "CANNOT_UNDERSTAND",
           "ACCEPTED_TRANSFER_SYNTAXES"]

log = logging.getLogger("medchain.edge.node")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210



def _decodable(ts: str) -> bool:
    try:
        return get_decoder(ts).is_available
    except NotImplementedError:
        return False


# every transfer syntax an installed pixel decoder can read (uncompressed, deflated, RLE,
# JPEG, JPEG-LS, JPEG 2000, HTJ2K): a syntax we could only quarantine is not offered, so the
# scanner falls back to one we can de-identify and check. pynetdicom accepts, per context,
# the first of *our* syntaxes the peer proposed: compressed ones come first, so an object
# the peer holds compressed (and proposes as such) arrives as it is, never transcoded by a
# peer that may lack the codec; uncompressed data still arrives uncompressed.
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
ACCEPTED_TRANSFER_SYNTAXES = sorted(
    (ts for ts in dict.fromkeys([*ALL_TRANSFER_SYNTAXES, RLELossless]) if _decodable(ts)),
    key=lambda ts: (ts in _UNCOMPRESSED, _UNCOMPRESSED.index(ts) if ts in _UNCOMPRESSED else 0))

Backpressure = Callable[[], "str | None"]
MAX_READ_RETRY_S = 300.0  # longest wait between tries to read a spooled object

# -- processing, in this process or in a worker process ----------------------------------------
# An outcome is ("ok", instance, deid seconds, prepare seconds, length in its result slot or
# None) | ("quarantined", reason, detail) | ("spool-error", message) | ("internal-error", exception class name): plain tuples,
# so nothing but a class name of an unexpected exception crosses the process boundary (its
# text could quote an attribute value). ``EdgeNode._run`` adds ("gone", message) for an id no
# longer in the spool.

Outcome = tuple


def process_spooled(processor: Processor, ref: SpoolRef, spool_id: str,
                    preparer: Preparer | None = None, slot: Slot | None = None) -> Outcome:
    """Read one spooled object, run it through ``processor`` and, with a ``preparer``, prepare
    the de-identified dataset while it is parsed; never raises. With a ``slot`` (in a worker
    process), the de-identified file goes back through shared memory where it fits: the
    outcome's last item is then its length and the instance's ``dicom`` is empty."""
    try:
        raw = read_ref(ref)
    except OSError as exc:
        return ("spool-error", f"spool entry {spool_id}: cannot read ({exc.strerror or exc})")
    except Quarantined as q:  # the record does not match its CRC
        return ("quarantined", q.reason, q.detail)
    try:
        t0 = time.perf_counter()
        instance, ds = processor.process_keeping_dataset(raw, spool_id)
        t1 = time.perf_counter()
        if preparer is not None:
            instance = replace(instance, preparation=preparer.prepare(ds, instance.modality))
        t2, in_slot = time.perf_counter(), None
        if slot is not None and _write_slot(slot, instance.dicom):
            in_slot, instance = len(instance.dicom), replace(instance, dicom=b"")
        return ("ok", instance, t1 - t0, t2 - t1, in_slot)
    except Quarantined as q:
        return ("quarantined", q.reason, q.detail)
    except Exception as exc:  # a bug must not kill the worker; keep the object for a person
        return ("internal-error", exc.__class__.__name__)


WORKER_NICENESS = 10  # the usual "background" step; 0 keeps the node's own priority


def _write_slot(slot: Slot, data: bytes) -> bool:
    try:
        return write_slot(slot, data)
    except OSError as exc:  # the slots file is gone or unmappable: the pipe still works
        log.warning("result slot unusable (%s); returning the result through the pipe",
                    exc.__class__.__name__)
        return False


def _worker_init(parent: int, niceness: int) -> None:
    """In a worker process: exit as soon as the node's process is gone (a node killed with
    SIGKILL, or crashing, cannot shut its pool down, and the idle worker would otherwise live
    on, orphaned, holding its memory, through every later restart); and step back from the
    CPU by ``niceness``, so that where cores are few the SCP threads that answer the scanner
    run first and a burst's de-identification waits in the durable spool instead (on 2
    cores, bench/ingest.py: the scanner's rate 0.86-0.91 of a bare SCP's before, 0.93-0.96
    after). Priority moves waiting, not capacity: a machine that is short of CPU for long
    fills the spool until backpressure refuses C-STOREs, whatever the niceness."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if niceness:
        os.nice(niceness)


HANDBACK_SLOT_BYTES = 16 << 20  # a CT, MR or most CR/DX files; larger ones use the pipe


def _child_ready(preparing: bool, detector: TextDetector | None) -> bool:
    """Run once per worker process at start, so that its imports are done and its text
    detector loaded before traffic (the model code only where this node prepares tensors)."""
    import edge_agent.pipeline  # noqa: F401

    if preparing:
        import edge_agent.preparation  # noqa: F401
    if detector is not None:
        detector.load()
    return True


class _Gate:
    """Shared/exclusive admission to the worker pool: a suspect instance (one that was in
    flight when a worker process died) runs alone, so a second death names its culprit."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    def acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._waiting_exclusive += 1
                while self._shared or self._exclusive:
                    self._cond.wait()
                self._waiting_exclusive -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._waiting_exclusive:
                    self._cond.wait()
                self._shared += 1

    def release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


@dataclass
class NodeStats:
    received: int = 0
    stored: int = 0  # answered Success
    forwarded: int = 0  # accepted by the sink
    refused: collections.Counter = field(default_factory=collections.Counter)  # failure statuses by reason
    quarantined: collections.Counter = field(default_factory=collections.Counter)
    sink_failures: int = 0
    spool_read_failures: int = 0  # spooled objects that could not be read (retried, backing off)
    rejected_associations: int = 0
    # time spent de-identifying and preparing objects that came out whole (where the CPU goes)
    deid_seconds: float = 0.0
    prepare_seconds: float = 0.0

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
        self._server = None
        # threads that feed the processing and call the sink: >1 overlaps one's sink fsyncs with
        # another's processing; processes: worker processes (0: process in these threads)
        self.workers = max(1, workers)
        self.processes = max(0, processes)
        self.worker_niceness = max(0, worker_niceness)
        self._workers: list[threading.Thread] = []
        self._pool: ProcessPoolExecutor | None = None
        self._handback: Handback | None = None
        self._pool_lock = threading.Lock()
        self._gate = _Gate()
        self._suspects: set[str] = set()
        self._read_failures: dict[str, int] = {}  # spool id -> consecutive read failures
        self._retry_timers: list[threading.Timer] = []
        self.release_poll_s = release_poll_s  # how often to look for quarantine releases
        self._release_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.dicom.ae_title)
        ae.maximum_pdu_size = self.dicom.max_pdu
        ae.maximum_associations = self.dicom.max_associations
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        if not self.dicom.accepts_any_caller:
            ae.require_calling_aet = list(self.dicom.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: this process runs threads (SCP, timers), and a forked child would
        # inherit their locks in whatever state they were in
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(), self.worker_niceness))

    def start(self) -> EdgeNode:
        if self.processes:
            try:
                self._handback = Handback(self.workers, HANDBACK_SLOT_BYTES)
            except OSError as exc:
                log.info("no shared-memory result slots (%s); results come back through the pipe", exc)
            self._pool = self._new_pool()
            # start the worker processes now, not on the first C-STORE
            detector = self.processor.detector if self.processor.burned_in.detect_text else None
            for ready in [self._pool.submit(_child_ready, self.preparer is not None, detector)
                          for _ in range(self.processes)]:
                ready.result(timeout=120)
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
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        self._ae = self._make_ae()
        self._server = self._ae.start_server((self.dicom.host, self.dicom.port), block=False,
                                             evt_handlers=handlers)
        log.info("DICOM node %s listening on %s:%d (max PDU %d, max %d associations)",
                 self.dicom.ae_title, self.dicom.host, self.port, self.dicom.max_pdu,
                 self.dicom.max_associations)
        return self

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.dicom.port

    def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let open associations finish (up to ``grace`` seconds, then abort
        them), finish the object being processed, and return. Spooled work stays on disk."""
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + grace
        while self._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._ae.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        self._server = None
        self._stop.set()
        if self._release_thread is not None:
            self._release_thread.join(timeout=grace)
        for timer in self._retry_timers:
            timer.cancel()
        for _ in self._workers:
            self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=grace)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._handback is not None:
            self._handback.close()
            self._handback = None
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

    # -- network handlers ----------------------------------------------------------------------

    def _on_echo(self, event) -> int:
        return SUCCESS

    def _on_rejected(self, event) -> None:
        with self._lock:
            self.stats.rejected_associations += 1
        log.warning("association from calling AE %r at %s rejected: calling AE title not allowed "
                    "or request not acceptable", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address)

    def _refuse(self, reason: str, status: int) -> int:
        with self._lock:
            self.stats.refused[reason] += 1
        return status

    def _on_store(self, event) -> int:
        with self._lock:
            self.stats.received += 1
        calling = event.assoc.requestor.ae_title
        if self.backpressure is not None:
            reason = self.backpressure()
            if reason:
                log.warning("C-STORE from %s refused (0xA700 out of resources): %s", calling, reason)
                return self._refuse("backpressure", OUT_OF_RESOURCES)
        data = event.encoded_dataset(include_meta=True)
        if self.precheck:
            try:
                parse_received(data, headers_only=True)
            except Quarantined as q:
                log.warning("C-STORE from %s refused (0xC210 cannot understand): %s", calling, q)
                return self._refuse(q.reason, CANNOT_UNDERSTAND)
        try:
            spool_id = self.spool.put(data)
        except SpoolFull as exc:
            log.warning("C-STORE from %s refused (0xA700 out of resources): %s", calling, exc)
            return self._refuse("spool-full", OUT_OF_RESOURCES)
        except SpoolError as exc:
            log.error("C-STORE from %s refused (0xA700 out of resources): %s", calling, exc)
            return self._refuse("spool-error", OUT_OF_RESOURCES)
        with self._lock:
            self.stats.stored += 1
        self._queue.put(spool_id)
        return SUCCESS

    # -- worker --------------------------------------------------------------------------------

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

    def _run(self, spool_id: str, index: int) -> Outcome | None:
        """Process one spooled object here or in a worker process; None: try again later (the
        worker process died while it held this object, and it was not yet known to be the cause)."""
        try:
            ref = self.spool.ref(spool_id)
        except SpoolError as exc:  # removed meanwhile (a retry queued twice): nothing to do
            return ("gone", str(exc))
        waived = self.spool.waived(spool_id)
        processor = replace(self.processor, waived=waived) if waived else self.processor
        if self.processes == 0:
            return process_spooled(processor, ref, spool_id, self.preparer)
        with self._pool_lock:
            suspect = spool_id in self._suspects
        self._gate.acquire(suspect)
        try:
            with self._pool_lock:
                pool = self._pool
            if pool is None:  # stopping
                return None
            try:
                # the processor and preparer travel with each object (a few hundred bytes):
                # options changed on a running node apply from the next object on, as in-thread
                handback = self._handback
                slot = handback.slots[index] if handback is not None else None
                outcome = pool.submit(process_spooled, processor, ref, spool_id,
                                      self.preparer, slot).result()
                if outcome[0] == "ok" and outcome[4] is not None:  # only this thread writes its slot
                    try:
                        dicom = handback.take(slot, outcome[4])
                    except ValueError:  # the node stopped and closed its slots: stays spooled
                        return None
                    outcome = ("ok", replace(outcome[1], dicom=dicom), *outcome[2:4], None)
            except BrokenProcessPool:
                with self._pool_lock:
                    if self._pool is pool and not self._stop.is_set():
                        pool.shutdown(wait=False, cancel_futures=True)
                        self._pool = self._new_pool()
                    if not suspect:
                        self._suspects.add(spool_id)
                        log.warning("worker process died while processing spool entry %s; retrying "
                                    "it on its own", spool_id)
                        return None
                    self._suspects.discard(spool_id)
                return ("worker-crashed", "the processing worker process died on this object alone")
            with self._pool_lock:
                self._suspects.discard(spool_id)
            return outcome
        finally:
            self._gate.release(suspect)

    def _quarantine(self, spool_id: str, reason: str, detail: str) -> None:
        try:
            self.spool.quarantine(spool_id, reason, detail)
        except OSError as exc:
            log.error("spool entry %s could not be quarantined (%s); left spooled", spool_id,
                      exc.__class__.__name__)
            return
        with self._lock:
            self.stats.quarantined[reason] += 1

    def _process(self, spool_id: str, index: int) -> None:
        outcome = self._run(spool_id, index)
        if outcome is None:
            if not self._stop.is_set():
                self._queue.put(spool_id)
            return
        kind = outcome[0]
        if kind == "gone":
            log.debug("%s", outcome[1])
            return
        if kind == "spool-error":
            # the object got Success and is on disk: keep trying (a disk or descriptor problem
            # may pass), less and less often, and say so each time
            with self._lock:
                self.stats.spool_read_failures += 1
                failures = self._read_failures[spool_id] = self._read_failures.get(spool_id, 0) + 1
            delay = min(self.retry_delay * 2 ** (failures - 1), MAX_READ_RETRY_S)
            log.error("%s; kept spooled, retrying in %.1f s (attempt %d)", outcome[1], delay, failures)
            if not self._stop.is_set():
                self._retry_later(spool_id, delay)
            return
        if self._read_failures:  # only ever after a read failure: no lock per object otherwise
            with self._lock:
                self._read_failures.pop(spool_id, None)
        if kind in ("quarantined", "worker-crashed"):
            reason, detail = (outcome[1], outcome[2]) if kind == "quarantined" else (kind, outcome[1])
            self._quarantine(spool_id, reason, detail)
            log.warning("spool entry %s quarantined: %s", spool_id, f"{reason}: {detail}" if detail else reason)
            return
        if kind == "internal-error":
            self._quarantine(spool_id, "internal-error", outcome[1])
            # class name only: exception text from a parser may quote attribute values
            log.error("spool entry %s quarantined after an internal error (%s)", spool_id, outcome[1])
            return
        instance: DeidentifiedInstance = outcome[1]
        with self._lock:
            self.stats.deid_seconds += outcome[2]
            self.stats.prepare_seconds += outcome[3]
        try:
            self.sink.accept(instance)
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
        log.debug("spool entry %s forwarded as %s", spool_id, instance.modality)
