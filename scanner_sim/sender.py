"""C-STORE senders: the simulated scanner, and a replay of a folder of real DICOM files.

Objects are spread over ``concurrency`` associations (threads), each negotiating the
presentation contexts its objects need; a progress bar shows instances sent. Files that
carry file meta information are sent as they are on disk (pynetdicom sends the encoded
bytes without decoding them), so a replay puts exactly what is in the file on the wire.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from scanner_sim.errors import ScannerError

__all__ = ["SendResult", "Item", "send", "check_reachable", "items_from_datasets", "items_from_folder",
           "items_from_paths"]

log = logging.getLogger("medchain.scanner")
MAX_CONTEXTS = 128
RETRY_DELAY = 1.0  # seconds before an association is opened again


@dataclass(frozen=True)
class Item:
    """One object to send: a dataset, or a file path sent as its encoded bytes."""

    sop_class: str
    transfer_syntax: str
    payload: Dataset | Path
    name: str


@dataclass
class SendResult:
    attempted: int = 0
    success: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)  # non-success status -> n
    errors: collections.Counter = field(default_factory=collections.Counter)  # association problems
    elapsed: float = 0.0
    retried: int = 0  # associations opened again after one was lost
    succeeded: list[str] = field(default_factory=list)  # item names that got Success

    @property
    def rate(self) -> float:
        return self.success / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.success}/{self.attempted} stored in {self.elapsed:.1f} s ({self.rate:.1f}/s)"]
        if self.statuses:
            parts.append("statuses " + ", ".join(f"0x{s:04X}: {n}" for s, n in sorted(self.statuses.items())))
        if self.errors:
            parts.append("errors " + ", ".join(f"{k}: {n}" for k, n in sorted(self.errors.items())))
        if self.retried:
            parts.append(f"{self.retried} association(s) opened again")
        return "; ".join(parts)


def items_from_datasets(datasets: Sequence[Dataset]) -> list[Item]:
    return [Item(str(ds.SOPClassUID), str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")
                                         or ExplicitVRLittleEndian), ds, str(ds.SOPInstanceUID))
            for ds in datasets]


def items_from_folder(folder: str | Path) -> tuple[list[Item], dict[str, int]]:
    """Every readable DICOM object under ``folder``; the second value counts what was skipped
    and why (not DICOM, no SOP Class/Instance UID, a DICOMDIR)."""
    return items_from_paths(sorted(p for p in Path(folder).rglob("*") if p.is_file()))


def items_from_paths(paths: Sequence[Path]) -> tuple[list[Item], dict[str, int]]:
    items, skipped = [], collections.Counter()
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True, force=True)
            sop_class, sop_inst = str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
        except Exception:
            skipped["not readable as DICOM"] += 1
            continue
        if sop_class == "1.2.840.10008.1.3.10":
            skipped["DICOMDIR (media directory, not a storage object)"] += 1
            continue
        if not sop_class or not sop_inst:
            skipped["no SOP Class/Instance UID"] += 1
            continue
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
        if ts:
            items.append(Item(sop_class, ts, path, str(path)))
        else:  # no file meta: read fully, record the encoding pydicom found, let pynetdicom send it
            try:
                full = dcmread(path, force=True)
                implicit, little = full.original_encoding
            except Exception:
                skipped["not readable as DICOM"] += 1
                continue
            ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            full.file_meta = FileMetaDataset()
            full.file_meta.TransferSyntaxUID = ts
            items.append(Item(sop_class, ts, full, str(path)))
    return items, dict(skipped)


def _contexts(items: Sequence[Item]) -> list[tuple[str, str]]:
    """One presentation context per (SOP class, transfer syntax) pair, as storescu does: the
    acceptor picks one syntax per context, so a compressed object needs a context of its own."""
    return list(dict.fromkeys((it.sop_class, it.transfer_syntax) for it in items))


def _batches(items: Sequence[Item]) -> list[list[Item]]:
    """Split into runs whose presentation contexts fit one association (128 at most)."""
    out, current, pairs = [], [], set()
    for it in items:
        pair = (it.sop_class, it.transfer_syntax)
        if pair not in pairs and len(pairs) >= MAX_CONTEXTS:
            out.append(current)
            current, pairs = [], set()
        pairs.add(pair)
        current.append(it)
    if current:
        out.append(current)
    return out


def _keep_stolen_responses(assoc) -> None:
    """Work around a race in pynetdicom's requestor (seen with 3.0.4): ``send_c_store`` pauses
    the association's reactor thread by clearing an event and then polling a flag the reactor
    sets *before* it waits on that event, so a reactor that had just passed the wait can still
    take the C-STORE response off the queue and drop it as an "unexpected service message";
    the sender then waits out the DIMSE timeout. Under heavy CPU contention this hit one
    800-instance pipeline benchmark run in four to eight. A response the reactor takes goes
    back on the queue."""
    serve, queue = assoc._serve_request, assoc.dimse.msg_queue

    def serve_or_requeue(msg, context_id):
        if not msg.is_valid_request and getattr(msg, "MessageIDBeingRespondedTo", None) is not None:
            queue.put((context_id, msg))
            log.info("a C-STORE response taken by pynetdicom's reactor thread was put back for the sender")
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_requeue


def _send_association(host: str, port: int, calling: str, called: str, batch: Sequence[Item],
                      result: SendResult, lock: threading.Lock, tick: Callable[[], None],
                      max_pdu: int) -> tuple[int, str | None]:
    """Send ``batch`` over one association and count what was answered (a status, or an
    encoding error). Returns how many items were answered and, when the association was lost
    or never established before all were, why; the rest is the caller's."""
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, syntax in _contexts(batch):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return 0, "association " + ("rejected" if assoc.is_rejected else
                                    "aborted" if assoc.is_aborted else "no answer")
    _keep_stolen_responses(assoc)
    answered = 0
    try:
        for it in batch:
            try:
                status = assoc.send_c_store(it.payload)
            except Exception as exc:  # a dataset pynetdicom cannot encode for any context
                code, err = None, exc.__class__.__name__
            else:
                if status is None or "Status" not in status:
                    return answered, "no response (association lost)"
                code, err = int(status.Status), None
            with lock:
                result.attempted += 1
                if code == 0x0000:
                    result.success += 1
                    result.succeeded.append(it.name)
                elif code is not None:
                    result.statuses[code] += 1
                else:
                    result.errors[err] += 1
            tick()
            answered += 1
            if not assoc.is_established and answered < len(batch):
                return answered, "association lost"
        return answered, None
    finally:
        if assoc.is_established:
            assoc.release()


def _send_share(host: str, port: int, calling: str, called: str, share: Sequence[Item], result: SendResult,
                lock: threading.Lock, tick: Callable[[], None], max_pdu: int, retries: int) -> None:
    """Each batch on one association, opened again up to ``retries`` times for what got no
    answer; what is still unanswered after that is counted as errors, never dropped silently."""
    for batch in _batches(share):
        remaining = list(batch)
        for attempt in range(retries + 1):
            answered, lost = _send_association(host, port, calling, called, remaining, result, lock,
                                               tick, max_pdu)
            remaining = remaining[answered:]
            if not remaining:
                break
            if attempt == retries:
                with lock:
                    result.attempted += len(remaining)
                    result.errors[lost or "not sent"] += len(remaining)
                for _ in remaining:
                    tick()
                break
            log.warning("association to %s:%s: %s with %d object(s) unanswered; sending them again "
                        "on a new association", host, port, lost, len(remaining))
            with lock:
                result.retried += 1
            time.sleep(RETRY_DELAY)


def check_reachable(host: str, port: int, timeout: float = 5.0) -> None:
    """Open and close one TCP connection to ``host:port``, so a wrong host or port is one
    clear error before any study is generated or association attempted."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise ScannerError(f"cannot reach {host}:{port}: unknown host ({exc.strerror})") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ScannerError(f"cannot reach {host}:{port}: {reason} (is the DICOM node running there?)") from None


def send(host: str, port: int, items: Sequence[Item], *, calling_ae: str = "SCANNER", called_ae: str = "ANY-SCP",
         concurrency: int = 4, progress: bool = True, max_pdu: int = 65536, retries: int = 0) -> SendResult:
    """Send ``items`` over ``concurrency`` associations in parallel; never raises for a
    refused object or association — see the returned counts. With ``retries``, an
    association that is lost or refused is opened again (up to that many times per share) and
    the objects that got no answer are sent again, as a scanner's retry queue does; the
    receiver must take a repeated object as the same one (the edge does, by SOP Instance UID)."""
    result = SendResult()
    lock = threading.Lock()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), unit="inst", desc=f"C-STORE -> {host}:{port}", leave=True)

    def tick() -> None:
        if bar is not None:
            with lock:
                bar.update(1)

    concurrency = max(1, min(concurrency, len(items) or 1))
    shares = [list(items[i::concurrency]) for i in range(concurrency)]
    failures: list[BaseException] = []

    def share_thread(share: Sequence[Item]) -> None:
        try:
            _send_share(host, port, calling_ae, called_ae, share, result, lock, tick, max_pdu, retries)
        except Exception as exc:  # reported by send(), never a thread's traceback
            failures.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=share_thread, args=(share,), name=f"scu-{i}")
               for i, share in enumerate(shares) if share]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if failures:
        exc = failures[0]
        raise ScannerError(f"sending to {host}:{port} failed: {type(exc).__name__}: {exc}") from exc
    return result
