"""Crash-isolating worker processes for de-identification, and what each run comes back as.

Processing (parse, de-identify, look for burned-in text, re-encode and, given a preparer, the
model-ready tensor and metadata record) runs in a separate worker process by default, so it
uses a core of its own instead of sharing the GIL with the SCP threads that answer the
scanner. A worker process that dies (a decoder crashing on a hostile file) is replaced; the
object it held is run again on its own (the :class:`_Gate` lets a suspect run alone), and one
that kills a worker on its own comes back as :class:`WorkerCrashed`. The de-identified file
comes back through shared memory (:mod:`edge_agent.handback`) where it fits, else the pipe.

Every run ends in one :data:`Outcome`, a typed value: nothing but a class name of an
unexpected exception crosses the process boundary (its text could quote an attribute value).
Worker processes are spawned, so a script that starts a pool needs the usual
``if __name__ == "__main__":`` guard (or ``processes=0``, which runs in the calling thread).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edge_agent.errors import Quarantined
from edge_agent.handback import Handback, Slot, write_slot
from edge_agent.processor import Processor
from edge_agent.sink import DeidentifiedInstance
from edge_agent.spool import SpoolRef, read_ref
from edge_agent.textdetect import TextDetector

if TYPE_CHECKING:  # the preparer arrives built; the pool itself never needs the model code
    from edge_agent.preparation import Preparer

__all__ = ["WorkPool", "process_spooled", "Outcome", "Processed", "Quarantine", "SpoolReadError",
           "InternalError", "WorkerCrashed", "RetryLater", "WORKER_NICENESS", "HANDBACK_SLOT_BYTES"]

log = logging.getLogger("medchain.edge.workpool")

WORKER_NICENESS = 10  # the usual "background" step; 0 keeps the node's own priority
HANDBACK_SLOT_BYTES = 16 << 20  # a CT, MR or most CR/DX files; larger ones use the pipe


@dataclass(frozen=True)
class Processed:
    """De-identified (and prepared): the instance, and where the time went."""

    instance: DeidentifiedInstance
    deid_seconds: float
    prepare_seconds: float
    in_slot: int | None = None  # the file's length in the feeding thread's slot; dicom is empty then


@dataclass(frozen=True)
class Quarantine:
    """Set aside for a person, with a reason code and a short detail (never a value)."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class SpoolReadError:
    """The spooled object could not be read back (an I/O error): try again later."""

    message: str


@dataclass(frozen=True)
class InternalError:
    """A bug, by exception class name only: the object is kept for a person."""

    exception: str


@dataclass(frozen=True)
class WorkerCrashed:
    """The worker process died on this object, run alone."""

    detail: str = "the processing worker process died on this object alone"


@dataclass(frozen=True)
class RetryLater:
    """Not done: the worker died while it held this object among others, or the pool stops."""


Outcome = Processed | Quarantine | SpoolReadError | InternalError | WorkerCrashed | RetryLater


def process_spooled(processor: Processor, ref: SpoolRef, spool_id: str,
                    preparer: Preparer | None = None, slot: Slot | None = None) -> Outcome:
    """Read one spooled object, run it through ``processor`` and, with a ``preparer``, prepare
    the de-identified dataset while it is parsed; never raises. With a ``slot`` (in a worker
    process), the de-identified file goes back through shared memory where it fits."""
    try:
        raw = read_ref(ref)
    except OSError as exc:
        return SpoolReadError(f"spool entry {spool_id}: cannot read ({exc.strerror or exc})")
    except Quarantined as q:  # the record does not match its CRC
        return Quarantine(q.reason, q.detail)
    try:
        t0 = time.perf_counter()
        instance, ds = processor.process_keeping_dataset(raw, spool_id)
        t1 = time.perf_counter()
        if preparer is not None:
            instance = replace(instance, preparation=preparer.prepare(ds, instance.modality))
        t2, in_slot = time.perf_counter(), None
        if slot is not None and _write_slot(slot, instance.dicom):
            in_slot, instance = len(instance.dicom), replace(instance, dicom=b"")
        return Processed(instance, t1 - t0, t2 - t1, in_slot)
    except Quarantined as q:
        return Quarantine(q.reason, q.detail)
    except Exception as exc:  # a bug must not kill the worker; keep the object for a person
        return InternalError(exc.__class__.__name__)


def _write_slot(slot: Slot, data: bytes) -> bool:
    try:
        return write_slot(slot, data)
    except OSError as exc:  # the slots file is gone or unmappable: the pipe still works
        log.warning("result slot unusable (%s); returning the result through the pipe",
                    exc.__class__.__name__)
        return False


def _worker_init(parent: int, niceness: int) -> None:
    """In a worker process: exit as soon as the node's process is gone (a node killed with
    SIGKILL cannot shut its pool down, and the idle worker would otherwise live on, orphaned,
    holding its memory, through every later restart); and step back from the CPU by
    ``niceness``, so that where cores are few the SCP threads that answer the scanner run
    first and a burst's de-identification waits in the durable spool instead. Priority moves
    waiting, not capacity: a machine short of CPU for long fills the spool until backpressure
    refuses C-STOREs, whatever the niceness."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if niceness:
        os.nice(niceness)


def _child_ready(preparing: bool, detector: TextDetector | None) -> bool:
    """Run once per worker process at start, so that its imports are done and its text
    detector loaded before traffic (the model code only where this node prepares tensors)."""
    import edge_agent.processor  # noqa: F401

    if preparing:
        import edge_agent.preparation  # noqa: F401
    if detector is not None:
        detector.load()
    return True


class _Gate:
    """Shared/exclusive admission to the worker pool: a suspect object (one that was in flight
    when a worker process died) runs alone, so a second death names its culprit."""

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


class WorkPool:
    """``processes`` worker processes (0: run in the caller's thread) fed by ``feeders``
    threads, each with a result slot of its own."""

    def __init__(self, processes: int, feeders: int, niceness: int = WORKER_NICENESS) -> None:
        self.processes = max(0, processes)
        self.feeders = max(1, feeders)
        self.niceness = max(0, niceness)
        self.handback: Handback | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._gate = _Gate()
        self._suspects: set[str] = set()
        self._stopping = False

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: the node runs threads (SCP, timers), and a forked child would
        # inherit their locks in whatever state they were in
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(os.getpid(), self.niceness))

    def start(self, *, preparing: bool, detector: TextDetector | None) -> None:
        """Start the worker processes now, not on the first object, each with its imports
        done and its text detector loaded."""
        if not self.processes:
            return
        try:
            self.handback = Handback(self.feeders, HANDBACK_SLOT_BYTES)
        except OSError as exc:
            log.info("no shared-memory result slots (%s); results come back through the pipe", exc)
        self._pool = self._new_pool()
        for ready in [self._pool.submit(_child_ready, preparing, detector) for _ in range(self.processes)]:
            ready.result(timeout=120)

    def call(self, fn: Callable, *args, timeout: float = 30.0):
        """Run ``fn(*args)`` in a worker process (tests look at a worker this way)."""
        return self._pool.submit(fn, *args).result(timeout=timeout)

    def run(self, processor: Processor, ref: SpoolRef, spool_id: str, preparer: Preparer | None,
            feeder: int) -> Outcome:
        """Process one spooled object, from feeding thread number ``feeder``."""
        if not self.processes:
            return process_spooled(processor, ref, spool_id, preparer)
        with self._lock:
            suspect = spool_id in self._suspects
        self._gate.acquire(suspect)
        try:
            with self._lock:
                pool = self._pool
            if pool is None:  # stopping
                return RetryLater()
            try:
                # the processor and preparer travel with each object (a few hundred bytes):
                # options changed on a running node apply from the next object on, as in-thread
                handback = self.handback
                slot = handback.slots[feeder] if handback is not None else None
                outcome = pool.submit(process_spooled, processor, ref, spool_id, preparer, slot).result()
                if isinstance(outcome, Processed) and outcome.in_slot is not None:
                    try:  # only this thread writes its slot
                        dicom = handback.take(slot, outcome.in_slot)
                    except ValueError:  # the pool stopped and closed its slots: stays spooled
                        return RetryLater()
                    outcome = replace(outcome, instance=replace(outcome.instance, dicom=dicom), in_slot=None)
            except BrokenProcessPool:
                return self._crashed(pool, spool_id, suspect)
            with self._lock:
                self._suspects.discard(spool_id)
            return outcome
        finally:
            self._gate.release(suspect)

    def _crashed(self, pool: ProcessPoolExecutor, spool_id: str, suspect: bool) -> Outcome:
        with self._lock:
            if self._pool is pool and not self._stopping:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
            if not suspect:
                self._suspects.add(spool_id)
                log.warning("worker process died while processing spool entry %s; retrying it on "
                            "its own", spool_id)
                return RetryLater()
            self._suspects.discard(spool_id)
        return WorkerCrashed()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if self.handback is not None:
            self.handback.close()
            self.handback = None
