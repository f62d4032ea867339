"""Ledger-side exceptions, rooted in :class:`medchain.errors.MedChainError`."""

from medchain.errors import MedChainError, ProtocolError, VerificationError

__all__ = [
    "LedgerError",
    "MessageInvalid",
    "TransactionInvalid",
    "GenesisError",
    "BlockStoreError",
    "StoreDamaged",
    "CertificateInvalid",
    "LedgerUnavailable",
    "SubmitTimeout",
    "QueryFailed",
    "ReadRefused",
    "PrincipalRefused",
    "REVOKED",
    "RETRY",
]

# what a validator says, signed, to a principal whose key it recognises but who is not active
REVOKED = "principal is not active on the ledger (revoked by an operator)"
# how a validator's refusal starts when it is only behind (asked about what it has not yet
# executed or persisted): the client does not count it as an answer, and asks again
RETRY = "retry: "


class LedgerError(MedChainError):
    """Base of ledger errors."""


class MessageInvalid(ProtocolError):
    """A ledger wire message is malformed: unknown kind, wrong version, missing or mistyped
    field, or over a size limit. The message names the field, never its content."""


class TransactionInvalid(LedgerError):
    """A transaction is malformed (unknown type, missing or mistyped field)."""


class GenesisError(LedgerError):
    """A genesis file is missing, malformed or inconsistent (n != 3f + 1, duplicate keys)."""


class BlockStoreError(LedgerError):
    """The block store on disk is unreadable or belongs to another chain or validator."""


class StoreDamaged(BlockStoreError):
    """The block store's file is damaged (SQLite or our encoding does not read back): the
    validator sets it aside and rebuilds from its peers (:mod:`ledger.healing`)."""


class CertificateInvalid(VerificationError):
    """A commit, prepared or checkpoint certificate lacks a quorum of valid signatures."""


class LedgerUnavailable(LedgerError):
    """Not enough validators answered (fewer than f + 1 matching replies)."""


class PrincipalRefused(LedgerUnavailable):
    """f + 1 validators said, each signing it, that this client's principal is not active
    on the ledger (revoked): they refuse its connections and queries."""


class SubmitTimeout(LedgerUnavailable):
    """A transaction was not confirmed by f + 1 validators before the deadline. It may still
    commit later; resubmitting it with the same request id is safe (deduplicated)."""


class QueryFailed(LedgerError):
    """A query was refused by the validators (unknown kind, bad arguments, not allowed)."""


class ReadRefused(QueryFailed):
    """The ledger refused (and audited) a read of a patient token's history: the reader's
    role may not read it."""
