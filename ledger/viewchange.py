"""View change, as pure functions over signed messages (Castro & Liskov, PBFT with signatures).

A replica that gives up on the primary of view ``v`` sends ``VIEW-CHANGE(v + 1)`` with its
stable checkpoint (and its 2f + 1 signatures) and, for every sequence number above it, the
strongest certificate it holds: a commit certificate if it has one, otherwise a prepared
certificate. The new primary gathers 2f + 1 valid view changes and re-issues, for every
sequence number between the highest stable checkpoint among them (``min_s``) and the highest
certified sequence number (``max_s``), the batch of the certificate with the highest view,
or an empty "null" batch where none exists. Every replica recomputes that choice from the
same view changes, so a faulty new primary cannot slip in anything else.

Why nothing committed is lost: a batch committed at some honest replica was prepared by
2f + 1 replicas, so any 2f + 1 view changes include at least one honest replica that
certified it, and no other batch can hold a certificate of a higher view for that sequence
number (quorum intersection, by induction over views).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ledger.blocks import batch_digest
from ledger.errors import CertificateInvalid, MessageInvalid
from medchain.merkle import EMPTY_ROOT
from ledger.messages import (
    Certificate,
    Commit,
    NewView,
    Prepare,
    PrePrepare,
    ViewChange,
    decode_frame,
    encode_frame,
    request_digest,
)
from ledger.quorum import Keyring, check_certificate, check_checkpoint_proof
from ledger.ready import BROADCAST

__all__ = ["NewViewEntry", "NewViewPlan", "ViewChanges", "check_view_change", "plan_new_view",
           "null_digest"]

log = logging.getLogger("ledger.pbft")


def null_digest(seq: int) -> bytes:
    return batch_digest(seq, 0, EMPTY_ROOT)


def check_view_change(vc: ViewChange, keyring: Keyring, *, genesis_digest: bytes,
                      checkpoint_interval: int, window: int) -> None:
    """Raise :class:`CertificateInvalid` unless every proof inside ``vc`` holds."""
    if vc.stable_seq == 0:
        if vc.stable_digest != genesis_digest:
            raise CertificateInvalid("view change: checkpoint 0 must be the genesis block")
    else:
        if vc.stable_seq % checkpoint_interval:
            raise CertificateInvalid("view change: stable seq is not a checkpoint")
        check_checkpoint_proof(vc.stable_seq, vc.stable_digest, vc.stable_proof, keyring)
    seen: set[int] = set()
    for cert in vc.certs:
        if cert.seq in seen:
            raise CertificateInvalid(f"view change: two certificates for seq {cert.seq}")
        seen.add(cert.seq)
        if not vc.stable_seq < cert.seq <= vc.stable_seq + window:
            raise CertificateInvalid(f"view change: seq {cert.seq} outside its window")
        if cert.view >= vc.view:
            raise CertificateInvalid("view change: certificate from a view not before it")
        check_certificate(cert, keyring)


@dataclass(frozen=True, slots=True)
class NewViewEntry:
    seq: int
    t: int
    digest: bytes
    requests: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class NewViewPlan:
    """What a new view starts from: the stable checkpoint it adopts and the batches it
    re-issues for ``min_s < seq <= max_s``."""

    min_s: int
    stable_digest: bytes
    stable_proof: tuple[tuple[int, bytes], ...]
    entries: tuple[NewViewEntry, ...]

    @property
    def max_s(self) -> int:
        return self.entries[-1].seq if self.entries else self.min_s


def _stronger(a: Certificate, b: Certificate) -> bool:
    """Is ``a`` a better choice than ``b`` for the same seq (commit beats prepared, then the
    higher view wins; ties keep the first, they certify the same batch)."""
    if (a.kind == "committed") != (b.kind == "committed"):
        return a.kind == "committed"
    return a.view > b.view


def plan_new_view(vcs: Sequence[ViewChange]) -> NewViewPlan:
    """The deterministic choice every replica makes from the same 2f + 1 view changes."""
    base = max(vcs, key=lambda vc: (vc.stable_seq, -vc.sender))
    min_s = base.stable_seq
    best: dict[int, Certificate] = {}
    for vc in sorted(vcs, key=lambda vc: vc.sender):
        for cert in vc.certs:
            if cert.seq <= min_s:
                continue
            held = best.get(cert.seq)
            if held is None or _stronger(cert, held):
                best[cert.seq] = cert
    max_s = max(best, default=min_s)
    entries = []
    for seq in range(min_s + 1, max_s + 1):
        cert = best.get(seq)
        if cert is None:
            entries.append(NewViewEntry(seq, 0, null_digest(seq), ()))
        else:
            entries.append(NewViewEntry(seq, cert.t, cert.digest, cert.requests))
    return NewViewPlan(min_s, base.stable_digest, base.stable_proof, tuple(entries))


class ViewChanges:
    """The replica's side of view changes (a mixin of :class:`ledger.pbft.Replica`, split out
    to keep modules small; it uses the replica's fields and helpers).

    Timer discipline, as in PBFT: the timer runs while requests are outstanding and restarts
    on progress; once it fires a replica moves to ``v + 1`` and starts the timer again only
    when 2f + 1 replicas want ``v + 1`` (a lone replica never races ahead), doubling it each
    time up to a cap. A replica joins a higher view as soon as f + 1 others want it. A replica
    in view change re-sends its view change periodically, so one that restarts late still
    gets it."""

    def _certificates(self) -> tuple[Certificate, ...]:
        """Our strongest certificate for every seq above the stable checkpoint."""
        certs = []
        top = max([self.executed] + list(self.slots))
        for n in range(self.h + 1, top + 1):
            block = self.recent.get(n) if n <= self.executed else None
            if block is not None and block.cert is not None:
                certs.append(Certificate("committed", block.cert.view, n, block.header.t,
                                         block.header.digest, block.cert.sigs, None,
                                         block.requests))
                continue
            slot = self.slots.get(n)
            if slot is not None and (slot.committed or slot.prepared):
                certs.append(slot.committed or slot.prepared)
        return tuple(certs)

    def _start_view_change(self, view: int, rebuild: bool = False) -> None:
        if not rebuild and view <= self.view and not self.normal:
            return
        self.view, self.normal = view, False
        self._out.view = (view, False)
        self.backoff += 0 if rebuild else 1
        self.deadline = None  # re-armed once 2f + 1 replicas want this view
        self.queue.clear()
        vc = ViewChange(view, self.me, self.h, self.stable_digest, self.stable_proof,
                        self._certificates())
        signed, body = self.signer.sign(vc)
        self.my_vc = encode_frame(signed, body)
        self._out.messages.append((BROADCAST, self.my_vc))
        self.vc_resend_due = self.now + 4 * self.params.status_ms
        self.view_changes.setdefault(view, {})[self.me] = (signed, self.my_vc)
        self.counters["view_changes_started"] += 1
        self._after_view_change_vote(view)

    def _on_view_change(self, vc: ViewChange, body: bytes) -> None:
        if vc.view < self.view or (vc.view == self.view and self.normal):
            if vc.view == self.view and self.newview_frame is not None:
                self._out.messages.append((vc.sender, self.newview_frame))
            return self._drop("stale")
        held = self.view_changes.get(vc.view, {})
        if vc.sender in held:
            return self._drop("duplicate")
        try:
            check_view_change(vc, self.keys, genesis_digest=self.genesis_digest,
                              checkpoint_interval=self.params.checkpoint_interval,
                              window=self.params.window)
        except CertificateInvalid:
            return self._drop("bad_viewchange")
        # keep only each sender's highest pending view change (bounds memory)
        for v, senders in list(self.view_changes.items()):
            if v < vc.view and vc.sender in senders and v > self.view:
                del senders[vc.sender]
        signed_frame = encode_frame(vc, body)
        self.view_changes.setdefault(vc.view, {})[vc.sender] = (vc, signed_frame)
        # join rule: when f + 1 replicas (so at least one honest) want a view above ours, move
        # to the highest view that f + 1 of them want at least
        wants: dict[int, int] = {}
        for v, senders in self.view_changes.items():
            if v > self.view:
                for s in senders:
                    if s != self.me:
                        wants[s] = max(wants.get(s, v), v)
        if len(wants) > self.keys.f:
            self._start_view_change(sorted(wants.values(), reverse=True)[self.keys.f])
        self._after_view_change_vote(vc.view)

    def _after_view_change_vote(self, view: int) -> None:
        if view != self.view or self.normal:
            return
        held = self.view_changes.get(view, {})
        if len(held) >= self.keys.quorum and self.deadline is None:
            self.deadline = self.now + self._timeout()  # give the new primary time, then move on
        if self.keys.primary(view) == self.me and self.me in held and len(held) >= self.keys.quorum:
            self._send_new_view(view)

    def _send_new_view(self, view: int) -> None:
        held = self.view_changes[view]
        chosen = [held[self.me]] + [held[s] for s in sorted(held) if s != self.me]
        chosen = chosen[: self.keys.quorum]
        plan = plan_new_view([vc for vc, _ in chosen])
        pps = []
        for e in plan.entries:
            signed, _ = self.signer.sign(PrePrepare(view, e.seq, e.t, e.digest, self.me))
            pps.append((e.seq, e.t, e.digest, signed.sig))
        nv, body = self.signer.sign(NewView(view, self.me, tuple(f for _, f in chosen),
                                            tuple(pps)))
        frame = encode_frame(nv, body)
        self._out.messages.append((BROADCAST, frame))
        self._enter_view(view, plan, pps, frame)

    def _on_new_view(self, nv: NewView, body: bytes) -> None:
        if nv.sender != self.keys.primary(nv.view):
            return self._drop("not_primary")
        if nv.view < self.view or (nv.view == self.view and self.normal):
            return self._drop("stale")
        vcs, senders = [], set()
        try:
            for frame in nv.view_changes:
                vc, vc_body = decode_frame(frame)
                if (not isinstance(vc, ViewChange) or vc.view != nv.view or vc.sender in senders
                        or not self.keys.valid(vc.sender, vc.KIND, vc_body, vc.sig)):
                    raise CertificateInvalid("new view: bad view change inside")
                check_view_change(vc, self.keys, genesis_digest=self.genesis_digest,
                                  checkpoint_interval=self.params.checkpoint_interval,
                                  window=self.params.window)
                senders.add(vc.sender)
                vcs.append(vc)
            if len(vcs) < self.keys.quorum:
                raise CertificateInvalid("new view: fewer than 2f + 1 view changes")
            plan = plan_new_view(vcs)
            expected = [(e.seq, e.t, e.digest) for e in plan.entries]
            if [tuple(p[:3]) for p in nv.preprepares] != expected:
                raise CertificateInvalid("new view: pre-prepares do not follow the view changes")
            for seq, t, digest, sig in nv.preprepares:
                if not self.keys.valid(nv.sender, "preprepare",
                                       PrePrepare(nv.view, seq, t, digest, nv.sender).body(), sig):
                    raise CertificateInvalid("new view: bad pre-prepare signature")
        except (CertificateInvalid, MessageInvalid):
            return self._drop("bad_newview")
        self._enter_view(nv.view, plan, list(nv.preprepares), encode_frame(nv, body))

    def _enter_view(self, view: int, plan, pps, frame: bytes) -> None:
        self.view, self.normal = view, True
        self._out.view = (view, True)
        self.newview_frame = frame
        self.my_vc = None
        self.deadline = None
        for v in [v for v in self.view_changes if v <= view]:
            del self.view_changes[v]
        self.counters["views_entered"] += 1
        if plan.min_s > self.h:
            self._make_stable(plan.min_s, plan.stable_digest, plan.stable_proof)
        primary = self.keys.primary(view)
        in_plan: set[bytes] = set()
        for e, (_seq, _t, _d, sig) in zip(plan.entries, pps, strict=True):
            in_plan.update(request_digest(f) for f in e.requests)
            if e.seq <= self.h:
                continue
            pp = PrePrepare(view, e.seq, e.t, e.digest, primary, sig, e.requests)
            if e.seq <= self.executed:  # we hold its commit certificate: vote it through
                mine = self._block(e.seq)
                if mine is not None and mine.header.digest != e.digest:
                    log.error("replica %d: new view re-issues seq %d differently", self.me, e.seq)
                    self.counters["divergence"] += 1
                    continue
                if primary != self.me:
                    self._send(BROADCAST, Prepare(view, e.seq, e.digest, self.me))
                self._send(BROADCAST, Commit(view, e.seq, e.digest, self.me))
                continue
            self._accept(self._slot(e.seq), pp)
        self.next_seq = max(self.executed, self.h, plan.max_s) + 1
        self.queue = OrderedDict((d, f) for d, f in self.pending.items() if d not in in_plan)
        self._arm()
        self._propose()
