"""The storage SCP a PACS administrator sees: C-ECHO, C-STORE of every storage SOP class in
every transfer syntax we can decode, calling AE titles checked at association, a PDU size and
an association limit from the profile.

A C-STORE is answered Success only after the received object is in the spool (appended and
fdatasynced); what happens to it next is the node's (:mod:`edge_agent.node`). An object that
cannot be parsed gets 0xC210; back-pressure (a callable that returns a reason, or the spool's
own ``max_bytes``) gets 0xA700 Out of Resources without storing anything. Exceptions never
escape a handler: pynetdicom turns them into a failure status, and the server keeps serving.
Logs name AE titles, addresses and reasons, never an attribute value.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pydicom.pixels import get_decoder
from pydicom.uid import RLELossless

from edge_agent.config import DicomConfig
from edge_agent.errors import EdgeError, Quarantined, SpoolError, SpoolFull
from edge_agent.processor import parse_received
from edge_agent.spool import Spool

__all__ = ["StorageSCP", "ReceiveStats", "Backpressure", "SUCCESS", "OUT_OF_RESOURCES", "CANNOT_UNDERSTAND",
           "ACCEPTED_TRANSFER_SYNTAXES"]

log = logging.getLogger("medchain.edge.scp")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC210

Backpressure = Callable[[], "str | None"]


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


@dataclass
class ReceiveStats:
    received: int = 0
    stored: int = 0  # answered Success
    refused: collections.Counter = field(default_factory=collections.Counter)  # failure statuses by reason
    rejected_associations: int = 0


class StorageSCP:
    """Start with ``start()``; ``on_spooled(spool_id)`` is called for every object stored."""

    def __init__(self, dicom: DicomConfig, spool: Spool, on_spooled: Callable[[str], None], *,
                 backpressure: Backpressure | None = None, precheck: bool = True,
                 stats: ReceiveStats | None = None, lock=None) -> None:
        self.dicom, self.spool, self.on_spooled = dicom, spool, on_spooled
        self.backpressure = backpressure
        self.precheck = precheck  # parse the headers while the scanner waits
        self.stats = stats if stats is not None else ReceiveStats()
        self._lock = lock if lock is not None else threading.Lock()
        self._ae: AE | None = None
        self._server = None

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

    def start(self) -> StorageSCP:
        handlers = [(evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_REJECTED, self._on_rejected)]
        self._ae = self._make_ae()
        try:
            self._server = self._ae.start_server((self.dicom.host, self.dicom.port), block=False,
                                                 evt_handlers=handlers)
        except (OSError, OverflowError) as exc:  # port taken, out of range, address not ours
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise EdgeError(f"DICOM node cannot listen on {self.dicom.host}:{self.dicom.port}: {reason}") from None
        log.info("DICOM node %s listening on %s:%d (max PDU %d, max %d associations)",
                 self.dicom.ae_title, self.dicom.host, self.port, self.dicom.max_pdu,
                 self.dicom.max_associations)
        return self

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.dicom.port

    def stop(self, grace: float = 30.0) -> None:
        """Stop listening, let open associations finish (up to ``grace`` seconds), then abort
        what is left."""
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

    # -- handlers ------------------------------------------------------------------------------

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
        self.on_spooled(spool_id)
        return SUCCESS
