"""State transfer and status gossip, the part of the replica that catches up.

Every replica broadcasts a signed ``Status`` (view, executed height, stable checkpoint) every
``status_ms``. A replica that f + 1 peers report to be behind, and that is not catching up
by itself, or that sees a stable checkpoint or a commit certificate ahead of what it has,
asks one of them for the missing blocks (``Fetch``). Blocks come back with their commit
certificates (``Blocks``); each is checked (2f + 1 valid commit signatures over the digest
of exactly this height, time and request root) before it is re-executed, and the state root
we compute is compared with the sender's header. The sender's stable checkpoint proof comes
along, so the receiver can move its window and garbage-collect too. A replica behind in
*view* gets the current ``NEW-VIEW`` (self-proving: 2f + 1 signed view changes) from any
peer whose status shows it is ahead.

A mixin of :class:`ledger.pbft.Replica` (split out to keep modules small); it uses the
replica's fields and helpers.
"""

from __future__ import annotations

import logging

from ledger.blocks import Block
from ledger.errors import CertificateInvalid, MessageInvalid
from ledger.messages import Blocks, Certificate, Fetch, Status
from ledger.quorum import check_certificate, check_checkpoint_proof

__all__ = ["StateTransfer", "FETCH_BLOCKS", "FETCH_BYTES"]

log = logging.getLogger("ledger.pbft")
FETCH_BLOCKS = 64       # blocks per state-transfer answer
FETCH_BYTES = 16 * 1024 * 1024


class StateTransfer:
    def _block(self, height: int) -> Block | None:
        return self.recent.get(height) or self.reader.block(height)

    def _fetch_from(self, peer: int, upto: int) -> None:
        if self.fetching is not None or peer == self.me:
            return
        self.fetching = (peer, self.now + 4 * self.params.status_ms)
        end = max(min(upto, self.executed + FETCH_BLOCKS), self.executed + 1)
        self._send(peer, Fetch(self.me, self.executed + 1, end))
        self.counters["fetches"] += 1

    def _maybe_fetch(self, force: bool = False) -> None:
        """Fetch when f + 1 peers (so at least one honest) report more executed blocks than
        we have and we are not catching up on our own, or when forced (a stable checkpoint
        or a commit certificate is ahead of us)."""
        reports = sorted((s.executed for s in self.peer_status.values()), reverse=True)
        if len(reports) <= self.keys.f:
            return
        target = reports[self.keys.f]
        if target <= self.executed:
            return
        stalled = self.progress_mark[0] == self.executed and \
            self.now - self.progress_mark[1] >= 2 * self.params.status_ms
        far = target > self.executed + 2 * self.params.pipeline
        if force or stalled or far:
            peers = sorted(p for p, s in self.peer_status.items() if s.executed >= target)
            self._fetch_from(peers[self.counters["fetches"] % len(peers)], target)

    def _on_fetch(self, msg: Fetch, body: bytes) -> None:
        # each answer may cost up to FETCH_BYTES: a fetch that asks again for no more than the
        # last one served to that peer, soon after, is a replay (or a retry too eager) and gets
        # nothing; a catching-up peer asks for the next range, which is served at once
        last = self.fetch_served.get(msg.sender)
        if last is not None and msg.start <= last[0] and self.now - last[1] < 4 * self.params.status_ms:
            return self._drop("duplicate")
        self.fetch_served[msg.sender] = (msg.start, self.now)
        out, size = [], 0
        end = min(msg.end, self.executed, msg.start + FETCH_BLOCKS - 1)
        for height in range(msg.start, end + 1):
            block = self._block(height)
            if block is None or block.cert is None:
                break
            wire = block.to_wire()
            size += sum(len(r) for r in block.requests) + 512
            out.append(wire)
            if size > FETCH_BYTES:
                break
        self._send(msg.sender, Blocks(self.me, tuple(out), self.h, self.stable_digest,
                                      self.stable_proof))

    def _on_blocks(self, msg: Blocks, body: bytes) -> None:
        if self.fetching and self.fetching[0] == msg.sender:
            self.fetching = None
        applied = False
        for wire in msg.blocks:
            try:
                block = Block.from_wire(wire)
            except MessageInvalid:
                return self._drop("malformed")
            header = block.header
            if header.height <= self.executed:
                continue
            if header.height != self.executed + 1:
                break
            cert = block.cert
            try:
                if cert is None or cert.kind != "committed" or cert.seq != header.height:
                    raise CertificateInvalid("block without a commit certificate")
                full = Certificate(cert.kind, cert.view, cert.seq, cert.t, cert.digest,
                                   cert.sigs, None, block.requests)
                check_certificate(full, self.keys)
            except CertificateInvalid:
                return self._drop("bad_certificate")
            mine = self._apply_block(full)
            if mine.header.hash != header.hash:
                log.error("replica %d: block %d from %d differs after re-execution",
                          self.me, header.height, msg.sender)
                self.counters["divergent_block_offered"] += 1
            slot = self.slots.get(header.height)
            if slot is not None:
                slot.committed = full
            self.counters["fetched_blocks"] += 1
            applied = True
        if msg.stable_seq > self.h and msg.stable_seq <= self.executed:
            try:
                check_checkpoint_proof(msg.stable_seq, msg.stable_digest, msg.stable_proof,
                                       self.keys)
            except CertificateInvalid:
                return self._drop("bad_certificate")
            self._make_stable(msg.stable_seq, msg.stable_digest, msg.stable_proof)
        if applied:
            self._execute_ready()
            self._progress()
            self._maybe_fetch(force=True)  # keep going while peers are ahead

    def _on_status(self, msg: Status, body: bytes) -> None:
        self.peer_status[msg.sender] = msg
        if (msg.view < self.view and self.normal and self.newview_frame is not None
                and self.now - self.nv_sent.get(msg.sender, -10**12) >= 4 * self.params.status_ms):
            self.nv_sent[msg.sender] = self.now
            self._out.messages.append((msg.sender, self.newview_frame))
        if msg.executed > self.executed + 2 * self.params.pipeline:
            self._maybe_fetch()
