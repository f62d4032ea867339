"""The application the PBFT replica drives: admit requests, execute committed batches.

In CometBFT terms, :meth:`Ledger.admit` is ``CheckTx`` (is this a request from a known
principal, correctly signed?) and :meth:`Ledger.execute` is ``FinalizeBlock`` + ``Commit``
(apply every request of a batch in order, seal the state root, build the block header).

Every rule here is deterministic in the committed log:

- A request is valid iff its signature verifies under its principal's key *as the state holds
  it at execution*. Admission verifies once and remembers which key verified; execution
  re-verifies only if that key has since changed (or the batch came by state transfer).
- Requests are deduplicated by ``(principal, rid)``: a retried request returns the result of
  its first execution instead of executing again. The table keeps results for ``2 *
  request_max_age`` of block time, and a request whose own time is further than
  ``request_max_age`` from the block time is rejected as stale, so an expired entry can never
  be replayed. The table is not in the state root: it is a function of the committed blocks,
  persisted with each block's results and reloaded on restart.
- A contract that rejects a transaction has its writes rolled back; the rejection (with its
  reason) is the transaction's result and is recorded in the block like any other. Every
  result goes into the header's results root, so a receipt proves success or rejection.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ledger.blocks import BlockHeader, genesis_header, result_leaf, results_root, tx_root
from medchain.canonical import canonical_bytes
from ledger.contracts import Contracts, Rejected, TxContext, genesis_state
from ledger.errors import MessageInvalid, TransactionInvalid
from medchain.identity import ed25519_valid, encoded_message
from ledger.messages import Request, decode_frame, domain, request_digest
from ledger.state import State
from ledger.transactions import Transaction, parse

__all__ = ["Ledger", "Admitted", "Executed", "AUDIT_DOMAIN"]

log = logging.getLogger(__name__)
AUDIT_DOMAIN = "medchain/v1/ledger/audit"
ADMIT_CACHE = 200_000
# requests executed lately, by digest: under load a backup often executes a request (from the
# primary's batch) before it reaches the client's own copy in its admission queue; that copy
# must not cost a second signature check. Twice the validator's admission queue.
RECENT_CACHE = 16_384


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed admission: decoded, from a known principal, signature valid."""

    request: Request
    tx: Transaction | None
    error: str | None  # why the transaction is malformed (it will be rejected in order)
    key: bytes         # the principal key that verified the signature


@dataclass(slots=True)
class Executed:
    """One executed batch: its header, per-position results, state writes for the store,
    the replies owed to clients and this validator's signatures on new audit entries."""

    header: BlockHeader
    time: int
    results: bytes                            # canonical [[client, rid, result], ...]
    writes: list[tuple[str, bytes | None]]
    replies: dict[str, list[tuple[int, dict]]] = field(default_factory=dict)
    attestations: list[tuple[int, bytes]] = field(default_factory=list)


class Ledger:
    """Contracts + admission + deduplication + block building, as one deterministic object."""

    def __init__(self, genesis, state: State | None = None, header: BlockHeader | None = None,
                 attest: Callable[[bytes], bytes] | None = None):
        self.genesis = genesis
        self.state = state if state is not None else genesis_state(genesis)
        self.contracts = Contracts(self.state)
        self.header = header or genesis_header(genesis.chain_id, self.state.root)
        self.retain_ms = 2 * genesis.params.request_max_age_ms
        self._attest = attest
        self._admitted: OrderedDict[bytes, Admitted] = OrderedDict()
        self._recent: OrderedDict[bytes, Admitted] = OrderedDict()
        self._done: dict[tuple[str, int], dict] = {}
        self._done_by_time: deque[tuple[int, list[tuple[str, int]]]] = deque()

    @property
    def height(self) -> int:
        return self.header.height

    # -- admission -----------------------------------------------------------------------------

    def _verify(self, key: bytes, body: bytes, sig: bytes, kind: str = "request") -> bool:
        return ed25519_valid(key, sig, encoded_message(domain(kind), body))

    def verify_principal(self, name: str, kind: str, body: bytes, sig: bytes) -> bool:
        """Is ``sig`` the active principal ``name``'s signature over a ``kind`` message?"""
        principal = self.contracts.principal(name)
        return bool(principal and principal["active"]
                    and self._verify(principal["key"], body, sig, kind))

    def revoked_principal(self, name: str, kind: str, body: bytes, sig: bytes) -> bool:
        """Is ``sig`` a signature by the key of ``name``, a principal no longer active? (Only
        the holder of that key learns it is revoked.)"""
        principal = self.contracts.principal(name)
        return bool(principal and not principal["active"]
                    and self._verify(principal["key"], body, sig, kind))

    def _check(self, frame: bytes) -> Admitted | str:
        try:
            msg, body = decode_frame(frame)
        except MessageInvalid:
            return "malformed"
        if not isinstance(msg, Request):
            return "malformed"
        principal = self.contracts.principal(msg.client)
        if principal is None or not principal["active"]:
            return "unknown_principal"
        if not self._verify(principal["key"], body, msg.sig):
            return "bad_signature"
        try:
            tx, error = parse(msg.tx), None
        except TransactionInvalid as exc:
            tx, error = None, str(exc)
        return Admitted(msg, tx, error, principal["key"])

    def admit(self, frame: bytes, digest: bytes | None = None) -> Admitted | str:
        """Check a request frame; return it admitted, or the reason it must be dropped
        (``malformed``, ``unknown_principal``, ``bad_signature``)."""
        digest = digest or request_digest(frame)
        hit = self._admitted.get(digest)
        if hit is not None:
            return hit
        done = self._recent.get(digest)
        if done is not None and self._current(done):
            return done  # executed here already: the replica answers it from the stored result
        outcome = self._check(frame)
        if isinstance(outcome, Admitted):
            self._admitted[digest] = outcome
            if len(self._admitted) > ADMIT_CACHE:
                self._admitted.popitem(last=False)
        return outcome

    def result_for(self, client: str, rid: int) -> dict | None:
        """The result of an already executed request, for answering a retry."""
        return self._done.get((client, rid))

    # -- execution -----------------------------------------------------------------------------

    def _current(self, adm: Admitted) -> bool:
        """Is the key that verified ``adm`` still its active principal's key?"""
        principal = self.contracts.principal(adm.request.client)
        return bool(principal and principal["active"] and principal["key"] == adm.key)

    def _resolve(self, frame: bytes, digest: bytes) -> Admitted | str:
        adm = self._admitted.pop(digest, None)
        if adm is None or not self._current(adm):  # deactivated or re-keyed since admission:
            adm = self._check(frame)  # the principal as it is now decides
        if isinstance(adm, Admitted):
            self._recent[digest] = adm
            if len(self._recent) > RECENT_CACHE:
                self._recent.popitem(last=False)
        return adm

    def execute(self, seq: int, t: int, frames: Sequence[bytes],
                digests: Sequence[bytes] | None = None) -> Executed:
        """Apply a committed batch at height ``seq`` with agreed time ``t``."""
        if seq != self.header.height + 1:
            raise ValueError(f"execute: expected height {self.header.height + 1}, got {seq}")
        now = self.contracts.advance_time(t)
        digests = digests or [request_digest(f) for f in frames]
        results: list[list] = []
        replies: dict[str, list[tuple[int, dict]]] = {}
        audits: list[tuple[int, bytes]] = []
        fresh: list[tuple[str, int]] = []
        max_age = self.genesis.params.request_max_age_ms
        for index, (frame, digest) in enumerate(zip(frames, digests, strict=True)):
            adm = self._resolve(frame, digest)
            if isinstance(adm, str):  # no trustworthy client: recorded, nobody answered
                results.append([None, None, {"status": "rejected", "reason": adm,
                                             "height": seq, "index": index}])
                continue
            req = adm.request
            key = (req.client, req.rid)
            earlier = self._done.get(key)
            if earlier is not None:
                results.append([req.client, req.rid, {
                    "status": "duplicate", "height": seq, "index": index,
                    "of": [earlier["height"], earlier["index"]]}])
                replies.setdefault(req.client, []).append((req.rid, earlier))
                continue
            result = {"status": "committed", "reason": "", "height": seq, "index": index}
            if adm.error is not None:
                result.update(status="rejected", reason=adm.error)
            elif abs(req.ts - now) > max_age:
                result.update(status="rejected", reason="stale request (client clock or replay)")
            else:
                principal = self.contracts.principal(req.client)
                ctx = TxContext(req.client, principal["role"], now, seq, index)
                mark = self.state.mark()
                try:
                    result["output"] = self.contracts.apply(ctx, adm.tx)
                except Rejected as exc:
                    self.state.rollback(mark)
                    result.update(status="rejected", reason=exc.reason)
                except Exception as exc:  # a contract bug must not split the validators
                    self.state.rollback(mark)
                    log.exception("contract error at height %d index %d", seq, index)
                    result.update(status="rejected", reason=f"contract error: {type(exc).__name__}")
            results.append([req.client, req.rid, result])
            self._done[key] = result
            fresh.append(key)
            replies.setdefault(req.client, []).append((req.rid, result))
        state_root, writes = self.state.seal(seq)
        encoded = canonical_bytes(results, check=False)
        outcomes = results_root([result_leaf(d, r[2]) for d, r in zip(digests, results)])
        header = BlockHeader(self.genesis.chain_id, seq, t, tx_root(frames), len(frames),
                             self.header.hash, state_root, outcomes)
        self.header = header
        for _client, _rid, result in results:
            result["state_root"] = state_root
            audit = result.get("output", {}).get("audit") if result["status"] == "committed" \
                else None
            if audit is not None and self._attest is not None:
                # this validator's own signature on the audit entry: differs per validator,
                # so it rides beside the result (clients compare results without it)
                result["attestation"] = self._attest(canonical_bytes(audit))
                audits.append((audit["id"], result["attestation"]))
        self._remember(now, fresh)
        return Executed(header, now, encoded, writes, replies, audits)

    def _remember(self, now: int, keys: list[tuple[str, int]]) -> None:
        if keys:
            self._done_by_time.append((now, keys))
        while self._done_by_time and self._done_by_time[0][0] < now - self.retain_ms:
            for key in self._done_by_time.popleft()[1]:
                self._done.pop(key, None)

    def restore_results(self, blocks: Iterable[tuple[int, list[list], bytes]]) -> None:
        """Reload the deduplication table from stored ``(block time, results, state root)``,
        oldest first (the store passes the blocks within the retention window)."""
        for now, results, state_root in blocks:
            keys = []
            for client, rid, result in results:
                if client is not None and result["status"] != "duplicate":
                    result["state_root"] = state_root
                    self._done[(client, rid)] = result
                    keys.append((client, rid))
            self._remember(now, keys)
