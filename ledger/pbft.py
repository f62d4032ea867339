"""The PBFT replica (Castro & Liskov, OSDI '99), as a pure state machine.

``Replica.step(msg, body)``, ``Replica.requests(frames)`` and ``Replica.tick(now_ms)`` take
a message, a burst of client requests or the time, and return a :class:`ledger.ready.Ready`:
frames to send, replies for clients, blocks and votes to persist first. There is no socket,
clock or disk in here: time comes in as a number, blocks already on disk are read through a
:class:`ledger.ready.BlockReader`, and the application is a deterministic
:class:`ledger.execution.Ledger`.

Normal case: request -> pre-prepare (primary, one *batch* per sequence number, up to
``pipeline`` batches in flight within the ``(h, h + L]`` window; a batch that is not full
only while fewer than ``partial_in_flight`` are) -> prepare (2f matching from
backups) -> commit (2f + 1) -> execute in sequence order -> reply; checkpoints every ``K``
sequence numbers, stable with 2f + 1 signatures, garbage-collect the log below them. View
change with prepared/commit certificates when the primary is silent (timer with back-off, as
in PBFT: a replica only escalates past ``v + 1`` once 2f + 1 replicas want ``v + 1``, and
joins a higher view once f + 1 replicas do). State transfer: blocks carry commit
certificates, so a lagging replica fetches the missing blocks from any peer, checks every
certificate, re-executes them and compares state roots.

Authentication: every validator message is Ed25519-signed by its sender and verified here
before it counts; anything unauthenticated, malformed, from a non-member, for a wrong or
stale view or outside the window is dropped and counted in ``Replica.dropped``. See
``docs/ledger.md`` ("Authentication") for why signatures and not MACs.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from ledger.blocks import Block, batch_digest, tx_root
from ledger.execution import Ledger
from ledger.messages import (
    Blocks,
    Certificate,
    Checkpoint,
    Commit,
    Fetch,
    NewView,
    Prepare,
    PrePrepare,
    Reply,
    Status,
    ViewChange,
    encode_frame,
    request_digest,
)
from ledger.quorum import Keyring, Signer
from ledger.ready import BROADCAST, BlockReader, CommittedBlock, Ready, Restored
from ledger.transfer import StateTransfer
from ledger.viewchange import ViewChanges

__all__ = ["Replica", "Slot", "MAX_PENDING"]

log = logging.getLogger(__name__)
MAX_PENDING = 20_000    # known, unexecuted requests a replica holds before shedding load


@dataclass(slots=True)
class Slot:
    """Everything a replica knows about one sequence number."""

    seq: int
    pp: PrePrepare | None = None                                  # accepted, current view
    batches: dict[bytes, tuple[int, tuple[bytes, ...]]] = field(default_factory=dict)
    prepares: dict[tuple[int, bytes], dict[int, bytes]] = field(default_factory=dict)
    commits: dict[tuple[int, bytes], dict[int, bytes]] = field(default_factory=dict)
    prepared: Certificate | None = None                           # best prepared certificate
    committed: Certificate | None = None                          # commit certificate
    commit_sent: int = -1                                         # view we sent commit in


class Replica(StateTransfer, ViewChanges):
    def __init__(self, signer: Signer, keyring: Keyring, ledger: Ledger, params,
                 reader: BlockReader, restored: Restored | None = None, now: int = 0):
        self.me = signer.id
        self.signer = signer
        self.keys = keyring
        self.ledger = ledger
        self.params = params
        self.reader = reader
        self.now = now
        self.dropped: Counter[str] = Counter()
        self.dropped_from: Counter[tuple[int, str]] = Counter()
        self._sender = -1
        self.counters: Counter[str] = Counter()
        r = restored or Restored()
        self.view, self.normal = r.view, r.normal
        genesis_digest = reader.block(0).header.hash if reader.block(0) else None
        self.genesis_digest = genesis_digest or ledger.header.hash
        if r.stable:
            self.h, self.stable_digest, self.stable_proof = r.stable[0], r.stable[1], r.stable[2]
        else:
            self.h, self.stable_digest, self.stable_proof = 0, self.genesis_digest, ()
        self.votes: dict[tuple[int, int], bytes] = dict(r.votes)
        self.slots: dict[int, Slot] = {}
        for cert in r.prepared:
            if cert.seq > self.h:
                slot = self._slot(cert.seq)
                slot.prepared = cert
                slot.batches[cert.digest] = (cert.t, cert.requests)
        self.recent: dict[int, Block] = {}
        for b in reader.blocks(max(1, self.h - params.checkpoint_interval + 1), ledger.height):
            self.recent[b.header.height] = b
        self.pending: OrderedDict[bytes, bytes] = OrderedDict()   # digest -> frame
        self.queue: OrderedDict[bytes, bytes] = OrderedDict()     # not yet proposed
        self.checkpoints: dict[int, dict[bytes, dict[int, bytes]]] = {}
        self.view_changes: dict[int, dict[int, tuple[ViewChange, bytes]]] = {}
        self.newview_frame: bytes | None = None
        self.my_vc: bytes | None = None
        self.peer_status: dict[int, Status] = {}
        self.nv_sent: dict[int, int] = {}
        self.next_seq = max([ledger.height] + [n for (v, n) in self.votes if v == self.view]) + 1
        self.last_t = 0
        self.deadline: int | None = None
        self.backoff = 0
        self.status_due = now
        self.vc_resend_due = now
        self.fetching: tuple[int, int] | None = None   # (peer, deadline)
        self.fetch_served: dict[int, tuple[int, int]] = {}  # peer -> (start, when) last answered
        self.progress_mark = (ledger.height, now)
        self.exec_gap = 0.0   # smoothed ms between executed blocks while busy
        self._out = Ready()

    # -- helpers -------------------------------------------------------------------------------

    @property
    def executed(self) -> int:
        return self.ledger.height

    @property
    def primary(self) -> int:
        return self.keys.primary(self.view)

    def _slot(self, seq: int) -> Slot:
        slot = self.slots.get(seq)
        if slot is None:
            slot = self.slots[seq] = Slot(seq)
        return slot

    def _send(self, dest: int, msg) -> bytes:
        signed, body = self.signer.sign(msg)
        frame = encode_frame(signed, body)
        self._out.messages.append((dest, frame))
        return frame

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        self.dropped_from[(self._sender, reason)] += 1

    def _take(self) -> Ready:
        out, self._out = self._out, Ready()
        return out

    def _timeout(self) -> int:
        """The view-change timeout: the base, or four typical gaps between executed blocks
        when the cluster is loaded (a busy primary is slow, not dead), doubled per failed
        view change, capped."""
        p = self.params
        base = max(p.view_change_ms, 4 * int(self.exec_gap))
        return min(base * (2 ** self.backoff), p.max_view_change_ms)

    def _outstanding(self) -> bool:
        return bool(self.pending) or any(
            s.pp is not None for n, s in self.slots.items() if n > self.executed)

    def _arm(self) -> None:
        if not self.normal:
            return
        if not self._outstanding():
            self.deadline = None
        elif self.deadline is None:
            self.deadline = self.now + self._timeout()

    # -- entry points --------------------------------------------------------------------------

    def requests(self, frames) -> Ready:
        """Client request frames (each signed by its principal)."""
        for frame in frames:
            digest = request_digest(frame)
            if digest in self.pending:
                self._drop("duplicate")
                continue
            adm = self.ledger.admit(frame, digest)
            if isinstance(adm, str):
                self._drop(adm)
                continue
            req = adm.request
            done = self.ledger.result_for(req.client, req.rid)
            if done is not None:  # a retry of something executed: answer it again
                self._send_reply(req.client, [(req.rid, done)])
                continue
            if len(self.pending) >= MAX_PENDING:
                self._drop("overload")
                continue
            self.pending[digest] = frame
            self.queue[digest] = frame
        self._propose()
        self._arm()
        return self._take()

    def step(self, msg, body: bytes) -> Ready:
        """One authenticated-or-not validator message, with the body bytes it was signed as."""
        handler = _HANDLERS.get(type(msg))
        self._sender = getattr(msg, "sender", -1)
        if handler is None:
            self._drop("unexpected_kind")
            return self._take()
        sender = msg.sender
        if not 0 <= sender < self.keys.n:
            self._drop("non_member")
            return self._take()
        if sender == self.me:  # our own message sent back to us: a replay
            self._drop("from_self")
            return self._take()
        if isinstance(msg, Blocks) and (self.fetching is None or self.fetching[0] != sender):
            self._drop("unsolicited")  # before the signature check: a large body costs to hash
            return self._take()
        if not self.keys.valid(sender, msg.KIND, body, msg.sig):
            self._drop("bad_signature")
            return self._take()
        handler(self, msg, body)
        self._sender = -1
        return self._take()

    def tick(self, now: int) -> Ready:
        late = now - self.now
        if late > self.params.status_ms and self.deadline is not None:
            # a tick this late means this replica was not running (its process paused, the
            # machine starved): that time is not the primary's fault, so it does not count
            self.deadline += late
            self.counters["stalls_forgiven"] += 1
        self.now = max(self.now, now)
        if self.deadline is not None and self.now >= self.deadline:
            self.counters["timeouts"] += 1
            self._start_view_change(self.view + 1)
        if self.now >= self.status_due:
            self.status_due = self.now + self.params.status_ms
            self._send(BROADCAST, Status(self.view, self.me, self.executed, self.h, self.normal))
            self._maybe_fetch()
        if not self.normal and self.my_vc is None:  # restarted while changing view
            self._start_view_change(self.view, rebuild=True)
        if not self.normal and self.my_vc and self.now >= self.vc_resend_due:
            self.vc_resend_due = self.now + 4 * self.params.status_ms
            self._out.messages.append((BROADCAST, self.my_vc))
        if self.fetching and self.now >= self.fetching[1]:
            self.fetching = None
        return self._take()

    # -- normal case ---------------------------------------------------------------------------

    def _propose(self) -> None:
        p = self.params
        if not self.normal or self.primary != self.me:
            return
        while self.queue and self.next_seq <= self.h + p.window:
            in_flight = self.next_seq - 1 - self.executed
            if in_flight >= p.pipeline or (len(self.queue) < p.max_batch
                                           and in_flight >= p.partial_in_flight):
                break  # pipeline full, or a partial batch while enough are in flight: let it
                # fill (the next execution proposes again)
            frames = []
            while self.queue and len(frames) < p.max_batch:
                frames.append(self.queue.popitem(last=False)[1])
            n = self.next_seq
            self.next_seq += 1
            t = self.last_t = max(self.now, self.last_t)
            d = batch_digest(n, t, tx_root(frames))
            self.votes[(self.view, n)] = d
            self._out.votes.append((self.view, n, d))
            pp, body = self.signer.sign(
                PrePrepare(self.view, n, t, d, self.me, requests=tuple(frames)))
            self._out.messages.append((BROADCAST, encode_frame(pp, body)))
            slot = self._slot(n)
            slot.pp = pp
            slot.batches[d] = (t, tuple(frames))
            self.counters["proposed_batches"] += 1

    def _on_preprepare(self, pp: PrePrepare, body: bytes) -> None:
        if pp.sender != self.keys.primary(pp.view):
            return self._drop("not_primary")
        if not self._in_view(pp.view, need_normal=True):
            return
        n = pp.seq
        if n <= self.executed or n <= self.h:
            return self._drop("stale")
        if n > self.h + self.params.window:
            return self._drop("out_of_window")
        slot = self._slot(n)
        if slot.pp is not None and slot.pp.view == pp.view:
            return self._drop("duplicate" if slot.pp.digest == pp.digest else "equivocation")
        voted = self.votes.get((pp.view, n))
        if voted is not None and voted != pp.digest:
            return self._drop("equivocation")
        if len(pp.requests) > self.params.max_batch:
            return self._drop("malformed")
        if batch_digest(n, pp.t, tx_root(pp.requests)) != pp.digest:
            return self._drop("bad_digest")
        if abs(pp.t - self.now) > self.params.max_skew_ms:
            return self._drop("bad_time")
        self._accept(slot, pp)

    def _accept(self, slot: Slot, pp: PrePrepare) -> None:
        """Take ``pp`` as this view's proposal for its seq and vote for it."""
        slot.pp = pp
        # prepares for another batch at this (view, seq) that came before the proposal: the same
        # evidence of an equivocating primary as those that come after it (see _on_prepare)
        self.counters["conflicting_votes"] += sum(
            len(votes) for (view, digest), votes in slot.prepares.items()
            if view == pp.view and digest != pp.digest)
        slot.batches[pp.digest] = (pp.t, pp.requests)
        for frame in pp.requests:
            self.queue.pop(request_digest(frame), None)
        if (pp.view, pp.seq) not in self.votes:
            self.votes[(pp.view, pp.seq)] = pp.digest
            self._out.votes.append((pp.view, pp.seq, pp.digest))
        if self.me != self.keys.primary(pp.view):
            prep = Prepare(pp.view, pp.seq, pp.digest, self.me)
            signed, body = self.signer.sign(prep)
            slot.prepares.setdefault((pp.view, pp.digest), {})[self.me] = signed.sig
            self._out.messages.append((BROADCAST, encode_frame(signed, body)))
        self._check_prepared(slot)
        self._check_committed(slot)
        self._arm()

    def _in_view(self, view: int, need_normal: bool) -> bool:
        if view < self.view:
            self._drop("stale")
            return False
        if view > self.view:
            self._drop("wrong_view")
            return False
        if need_normal and not self.normal:
            self._drop("view_changing")
            return False
        return True

    def _vote_ok(self, msg) -> Slot | None:
        n = msg.seq
        if n <= self.h:
            self._drop("stale")
            return None
        if n <= self.executed:  # a vote that arrived after we executed: harmless
            self.counters["late_votes"] += 1
            return None
        if n > self.h + self.params.window:
            self._drop("out_of_window")
            return None
        return self._slot(n)

    def _on_prepare(self, msg: Prepare, body: bytes) -> None:
        if msg.sender == self.keys.primary(msg.view):
            return self._drop("prepare_from_primary")
        if not self._in_view(msg.view, need_normal=False):
            return
        slot = self._vote_ok(msg)
        if slot is None:
            return
        votes = slot.prepares.setdefault((msg.view, msg.digest), {})
        if msg.sender in votes:
            return self._drop("duplicate")
        if slot.pp is not None and slot.pp.view == msg.view and slot.pp.digest != msg.digest:
            self.counters["conflicting_votes"] += 1
        votes[msg.sender] = msg.sig
        self._check_prepared(slot)

    def _check_prepared(self, slot: Slot) -> None:
        pp = slot.pp
        if pp is None or pp.view != self.view or slot.commit_sent == self.view:
            return
        votes = slot.prepares.get((pp.view, pp.digest), {})
        if len(votes) < 2 * self.keys.f:
            return
        sigs = tuple(sorted(votes.items()))[: 2 * self.keys.f]
        cert = Certificate("prepared", pp.view, pp.seq, pp.t, pp.digest, sigs, pp.sig,
                           pp.requests)
        slot.prepared = cert
        self._out.prepared.append(cert)
        slot.commit_sent = self.view
        signed, body = self.signer.sign(Commit(pp.view, pp.seq, pp.digest, self.me))
        slot.commits.setdefault((pp.view, pp.digest), {})[self.me] = signed.sig
        self._out.messages.append((BROADCAST, encode_frame(signed, body)))
        self._check_committed(slot)

    def _on_commit(self, msg: Commit, body: bytes) -> None:
        if msg.view > self.view:  # lower views still certify: a commit is final
            return self._drop("wrong_view")
        slot = self._vote_ok(msg)
        if slot is None:
            return
        votes = slot.commits.setdefault((msg.view, msg.digest), {})
        if msg.sender in votes:
            return self._drop("duplicate")
        votes[msg.sender] = msg.sig
        self._check_committed(slot)

    def _check_committed(self, slot: Slot) -> None:
        if slot.committed is not None:
            return
        for (v, d), votes in slot.commits.items():
            if len(votes) < self.keys.quorum:
                continue
            batch = slot.batches.get(d)
            if batch is None:  # certified but we never saw the batch: fetch the block
                self._fetch_from(next(iter(s for s in votes if s != self.me)), slot.seq)
                return
            sigs = tuple(sorted(votes.items()))[: self.keys.quorum]
            slot.committed = Certificate("committed", v, slot.seq, batch[0], d, sigs, None,
                                         batch[1])
            self._execute_ready()
            return

    def _execute_ready(self) -> None:
        progressed = False
        while True:
            slot = self.slots.get(self.executed + 1)
            if slot is None or slot.committed is None:
                break
            self._apply_block(slot.committed)
            progressed = True
        if progressed:
            self._progress()

    def _apply_block(self, cert: Certificate) -> Block:
        """Execute a certified batch at the next height; persist, reply, checkpoint."""
        frames = cert.requests
        digests = [request_digest(f) for f in frames]
        ex = self.ledger.execute(self.executed + 1, cert.t, frames, digests)
        block = Block(ex.header, frames, cert.without_requests())
        self.recent[ex.header.height] = block
        self._out.blocks.append(CommittedBlock(block, ex.time, ex.results, ex.writes,
                                               ex.attestations))
        for d in digests:
            self.pending.pop(d, None)
            self.queue.pop(d, None)
        for client, results in ex.replies.items():
            self._send_reply(client, results)
        self.counters["executed_batches"] += 1
        self.counters["executed_requests"] += len(frames)
        n = ex.header.height
        if n == self.h and ex.header.hash != self.stable_digest:  # reached a checkpoint we
            log.error("replica %d: block %d differs from the stable checkpoint", self.me, n)
            self.counters["divergence"] += 1                     # adopted from others
        if n % self.params.checkpoint_interval == 0:
            frame_msg = Checkpoint(n, ex.header.hash, self.me)
            signed, body = self.signer.sign(frame_msg)
            self._out.messages.append((BROADCAST, encode_frame(signed, body)))
            self.checkpoints.setdefault(n, {}).setdefault(ex.header.hash, {})[self.me] = \
                signed.sig
            self._check_stable(n)
        return block

    def _send_reply(self, client: str, results) -> None:
        signed, body = self.signer.sign(Reply(self.view, self.me, client, tuple(results)))
        self._out.replies.append((client, encode_frame(signed, body)))

    def _progress(self) -> None:
        self.backoff = 0
        if self.pending:  # only gaps while there was work count as "how slow we are"
            gap = min(self.now - self.progress_mark[1], self.params.max_view_change_ms)
            self.exec_gap = 0.8 * self.exec_gap + 0.2 * gap
        self.progress_mark = (self.executed, self.now)
        self.deadline = None
        self._arm()
        self._propose()

    # -- checkpoints ---------------------------------------------------------------------------

    def _on_checkpoint(self, msg: Checkpoint, body: bytes) -> None:
        if msg.seq <= self.h:
            return self._drop("stale")
        if msg.seq % self.params.checkpoint_interval:
            return self._drop("malformed")
        if msg.seq > self.executed + 4 * self.params.window:
            return self._drop("out_of_window")
        votes = self.checkpoints.setdefault(msg.seq, {}).setdefault(msg.digest, {})
        if msg.sender in votes:
            return self._drop("duplicate")
        votes[msg.sender] = msg.sig
        self._check_stable(msg.seq)

    def _check_stable(self, seq: int) -> None:
        for digest, votes in self.checkpoints.get(seq, {}).items():
            if len(votes) >= self.keys.quorum and seq > self.h:
                proof = tuple(sorted(votes.items()))[: self.keys.quorum]
                self._make_stable(seq, digest, proof)
                return

    def _make_stable(self, seq: int, digest: bytes, proof: tuple) -> None:
        mine = self.recent.get(seq)
        if mine is not None and mine.header.hash != digest:
            log.error("replica %d: stable checkpoint %d differs from our block", self.me, seq)
            self.counters["divergence"] += 1
            return
        self.h, self.stable_digest, self.stable_proof = seq, digest, proof
        self._out.stable = (seq, digest, proof)
        for n in [n for n in self.slots if n <= seq]:
            del self.slots[n]
        for n in [n for n in self.checkpoints if n < seq]:
            del self.checkpoints[n]
        for key in [k for k in self.votes if k[1] <= seq]:
            del self.votes[key]
        keep_from = seq - self.params.checkpoint_interval
        for n in [n for n in self.recent if n <= keep_from]:
            del self.recent[n]
        self.next_seq = max(self.next_seq, seq + 1)
        if self.executed < seq:
            self._fetch_from(next(s for s, _ in proof if s != self.me), seq)
        self._propose()


# message kind -> the replica method that handles it (after the checks every message passes)
_HANDLERS = {
    PrePrepare: Replica._on_preprepare,
    Prepare: Replica._on_prepare,
    Commit: Replica._on_commit,
    Checkpoint: Replica._on_checkpoint,
    ViewChange: Replica._on_view_change,
    NewView: Replica._on_new_view,
    Status: Replica._on_status,
    Fetch: Replica._on_fetch,
    Blocks: Replica._on_blocks,
}
