"""Read-only queries a validator answers from its own state and block store.

Each validator answers on its own; a client accepts an answer once f + 1 validators gave
the same one (at least one honest validator vouches for it). An image record — and a model
or inference record when asked with ``proof`` — also comes with its receipt
(:class:`ledger.receipts.TxReceipt`): the signed request frame and the transaction's result,
each with its RFC 6962 inclusion proof under the header's ``tx_root`` / ``results_root``,
the header and the block's commit certificate; the validator's signature on the header goes
in the attestation, and the client gathers f + 1 of them into the receipt, so anyone can
check it against the validator keys alone.

``answer`` is what clients compare; ``attestation`` carries what legitimately differs per
validator (its own signatures on audit entries, its local status).

Queries are authorized by the asker's role as the ledger holds it (the asker is the
principal whose signed ``Hello`` opened the connection and who signed the query):

* ``audit`` by user: one's own trail; anyone's for an auditor or a role that acts on behalf
  of others (the API, the custodian). ``audit_entries`` likewise, entry by entry (not the
  API: it reads the trail of the signer it serves, by user).
* a patient token's history — ``consent``, ``audit`` by patient or by image — only for a
  query naming (``read``) a granted ``AUDIT_READ`` of the asker for that subject: the read is
  on the trail *before* anything is answered, and the answer stops where the trail says the
  reader saw (:meth:`Contracts.read_upto`). Consent: registrar and auditor; audit: auditor.
* ``studies`` (metadata only) and ``principals``: listed only to the roles of
  :data:`~ledger.contracts.LISTERS`; the studies listing filtered by a patient token only
  through a granted read (``AUDIT_READ`` of query ``studies``), as it stood at that read.
"""

from __future__ import annotations

from ledger.blocks import outcome, results_tree
from ledger.contracts import AUDIT_INDEXES, MAX_LIST, Contracts, Rejected
from ledger.errors import RETRY, QueryFailed
from ledger.messages import request_digest
from ledger.pbft import Replica
from ledger.store import BlockStore
from medchain.merkle import MerkleTree

__all__ = ["answer_query", "QUERY_KINDS"]

QUERY_KINDS = ("status", "headers", "principal", "principals", "studies", "device", "audit_entries", "image", "images",
               "consent", "audit", "model", "inference", "policy")
MAX_IMAGES = 256  # most image receipts one ``images`` query answers


def _arg(args: dict, key: str, typ: type, size: int | None = None):
    value = args.get(key)
    if not isinstance(value, typ) or (size is not None and len(value) != size):
        raise QueryFailed(f"query argument {key!r} is missing or malformed")
    return value


def _proven(replica: Replica, store: BlockStore, record: dict | None) -> tuple[object, dict]:
    """``record`` with its receipt (request and result with their inclusion proofs, header,
    certificate) as the answer, and this validator's signature on the header beside it."""
    if record is None:
        return None, {}
    height, index = record["height"], record["index"]
    block, results = store.block(height), store.results(height)
    if block is None or results is None:  # executed but not yet on disk: ask again in a moment
        raise QueryFailed(RETRY + "record is not yet persisted")
    tree = results_tree([request_digest(r) for r in block.requests], results)
    answer = {"record": record, "request": block.requests[index],
              "proof": block.proof(index).to_wire(), "header": block.header.to_wire(),
              "cert": block.cert.to_wire() if block.cert else None,
              "result": outcome(results[index]), "result_proof": tree.proof(index).to_wire()}
    return answer, {"header_sig": replica.signer.sign_header(height, block.header.hash)}


def _proven_many(replica: Replica, store: BlockStore, records: list) -> tuple[object, dict]:
    """Many records' receipts at once: each block's trees are built once for all the records
    it holds (``image`` per record rebuilds them every time). The answer (compared across
    validators) holds per record its request, proofs and result, and each block's header;
    the commit certificates, which differ per validator, ride in the attestation with this
    validator's header signatures."""
    items, headers, certs, sigs, trees = [], {}, {}, {}, {}
    for record in records:
        if record is None:
            items.append(None)
            continue
        height, index = record["height"], record["index"]
        if height not in trees:
            block, results = store.block(height), store.results(height)
            if block is None or results is None:
                raise QueryFailed(RETRY + "record is not yet persisted")
            digests = [request_digest(r) for r in block.requests]
            trees[height] = (block, results, MerkleTree(block.requests), results_tree(digests, results))
            headers[height] = block.header.to_wire()
            certs[height] = block.cert.to_wire() if block.cert else None
            sigs[height] = replica.signer.sign_header(height, block.header.hash)
        block, results, tx_tree, result_tree = trees[height]
        items.append({"record": record, "request": block.requests[index],
                      "proof": tx_tree.proof(index).to_wire(), "result": outcome(results[index]),
                      "result_proof": result_tree.proof(index).to_wire()})
    return ({"items": items, "headers": [[h, w] for h, w in sorted(headers.items())]},
            {"certs": [[h, c] for h, c in sorted(certs.items())],
             "header_sigs": [[h, s] for h, s in sorted(sigs.items())]})


def _status(replica: Replica, store: BlockStore) -> dict:
    return {"validator": replica.me, "view": replica.view, "normal": replica.normal,
            "executed": replica.executed, "stable": replica.h,
            "state_root": replica.ledger.header.state_root,
            "header_hash": replica.ledger.header.hash, "pending": len(replica.pending),
            "dropped": dict(replica.dropped),
            "dropped_from": {f"{s}:{r}": c for (s, r), c in replica.dropped_from.items()},
            "counters": dict(replica.counters)}


def _read_upto(c: Contracts, asker: str, query: str, by: str, key, args: dict) -> int:
    read = args.get("read")
    if type(read) is int and read >= c.state.get("audit_n", 0):  # this validator is behind
        raise QueryFailed(RETRY + "the read is not yet executed here")
    try:
        return c.read_upto(asker, query, by, key, args.get("read"))
    except Rejected as exc:
        raise QueryFailed(f"not authorized: {exc.reason}") from None


def answer_query(what: str, args: dict, replica: Replica, store: BlockStore,
                 asker: str) -> tuple[object, dict]:
    """``(answer, attestation)`` for one query of the principal ``asker``;
    :class:`QueryFailed` for a bad or unauthorized one."""
    ledger = replica.ledger
    c = ledger.contracts
    if what == "status":
        return None, _status(replica, store)
    if what == "headers":
        start = _arg(args, "start", int)
        end = min(_arg(args, "end", int), start + 10_000)
        return None, {"headers": [list(h) for h in store.hashes(start, end)]}
    if what == "principal":
        p = c.principal(_arg(args, "name", str))
        return (None if p is None else {"role": p["role"], "key": p["key"],
                                        "active": p["active"],
                                        "recipient": p.get("recipient")}), {}
    if what == "principals":
        if not c.may_list(asker, "principals"):
            raise QueryFailed("not authorized: your role may not list principals")
        return c.principals(), {}
    if what == "audit_entries":
        ids = args.get("ids")
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise QueryFailed("audit_entries: 'ids' must be a list of entry ids")
        entries = c.audit_entries(ids)
        if not c.oversees(asker, by_id=True) and any(e is not None and e["user"] != asker for e in entries):
            raise QueryFailed("not authorized: audit entries of another principal")
        return entries, {}
    if what == "studies":
        filters = {k: args.get(k) for k in ("modality", "patient", "study", "series")}
        if not all(v is None or isinstance(v, str) for v in filters.values()):
            raise QueryFailed("studies: filters are text")
        if not c.may_list(asker, "studies"):
            raise QueryFailed("not authorized: your role may not list studies")
        as_of = None
        if filters["patient"] is not None:  # a patient-keyed read: through a granted read only
            _read_upto(c, asker, "studies", "patient", filters["patient"], args)
            as_of = c.read_entry(args["read"])
        return c.studies(**filters, as_of=as_of), {}
    if what == "device":
        return c.device(_arg(args, "device_id", str)), {}
    if what == "image":
        return _proven(replica, store, c.image(_arg(args, "envelope_id", bytes, 16)))
    if what == "images":
        ids = args.get("envelope_ids")
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_IMAGES or not all(
                isinstance(e, bytes) and len(e) == 16 for e in ids):
            raise QueryFailed(f"images: 'envelope_ids' must be 1 to {MAX_IMAGES} envelope ids")
        return _proven_many(replica, store, [c.image(e) for e in ids])
    if what == "consent":
        patient = _arg(args, "patient", str)
        upto = _read_upto(c, asker, "consent", "patient", patient, args)
        return c.consent(patient, int(args.get("start", 0)), int(args.get("limit", MAX_LIST)),
                         upto), {}
    if what == "audit":
        by = _arg(args, "by", str)
        if by not in AUDIT_INDEXES:
            raise QueryFailed(f"audit: 'by' must be one of {sorted(AUDIT_INDEXES)}")
        key = args.get("key")
        if not isinstance(key, (str, bytes)):
            raise QueryFailed("query argument 'key' is missing or malformed")
        if by != "user":
            upto = _read_upto(c, asker, "audit", by, key, args)
        elif key == asker or c.oversees(asker):
            upto = None
        else:
            raise QueryFailed("not authorized: another principal's audit trail")
        result = c.audit(by, key, int(args.get("start", 0)), int(args.get("limit", MAX_LIST)),
                         upto)
        sigs = store.attestations(e["id"] for e in result["entries"])
        return result, {"signatures": [[i, s] for i, s in sorted(sigs.items())]}
    if what in ("model", "inference"):
        key = "model_hash" if what == "model" else "batch_root"
        record = (c.model if what == "model" else c.inference)(_arg(args, key, bytes, 32))
        return _proven(replica, store, record) if args.get("proof") else (record, {})
    if what == "policy":
        return c.policy(_arg(args, "policy", str)), {}
    raise QueryFailed(f"unknown query {what!r}; known: {', '.join(QUERY_KINDS)}")
