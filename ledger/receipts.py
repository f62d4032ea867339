"""A committed transaction's receipt: checkable offline, with only the validators' keys.

A receipt proves "this request executed with this result at this height". It is the record
a contract wrote, the signed request frame that carried the transaction with its RFC 6962
inclusion proof under the header's ``tx_root``, the transaction's result (status, reason,
output) with its inclusion proof under the header's ``results_root``, the header, the block's
commit certificate (2f + 1 validator signatures over the batch) and f + 1 validators'
signatures over the header hash. The commit certificate alone covers what was ordered, not
how it executed (a transaction the contracts rejected is ordered and committed too); the
header signatures vouch for the results root, since at least one of them is honest and
execution is deterministic.

Whoever holds the genesis validator keys can check a receipt without talking to the ledger:
an edge device that must not install a model the ledger never recorded, or an auditor
proving one prediction years later. :meth:`TxReceipt.verify` accepts only a transaction that
executed successfully.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.blocks import BlockHeader, result_leaf
from ledger.errors import CertificateInvalid, MessageInvalid
from ledger.messages import SIG_PAIRS, Certificate, Request, decode_frame, request_digest
from ledger.quorum import Keyring, check_certificate, check_header_votes
from medchain.errors import ProofInvalid
from medchain.fields import BYTES, MAP, Record, schema, wire
from medchain.merkle import InclusionProof, verify_inclusion

__all__ = ["TxReceipt"]


@schema("receipt", ProofInvalid)
@dataclass(frozen=True)
class TxReceipt:
    record: dict = wire("record", MAP)
    header: BlockHeader = wire("header", Record(BlockHeader))
    request: bytes = wire("request", BYTES)
    proof: InclusionProof = wire("proof", Record(InclusionProof))
    cert: Certificate = wire("cert", Record(Certificate))
    result: dict = wire("result", MAP)                     # outcome: status, reason, output
    result_proof: InclusionProof = wire("result_proof", Record(InclusionProof))
    header_sigs: tuple[tuple[int, bytes], ...] = wire("header_sigs", SIG_PAIRS)

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls, a: object) -> TxReceipt:
        """Parse; :class:`ProofInvalid` when a part is missing or malformed."""
        if type(a) is dict and "cert" in a and a["cert"] is None:
            raise ProofInvalid("receipt: the block has no commit certificate yet")
        return cls.SCHEMA.decode(a)

    def verify(self, keyring: Keyring) -> dict:
        """The proven transaction (its fields as submitted) if it executed successfully, or
        :class:`CertificateInvalid` / :class:`ProofInvalid` naming what does not hold."""
        header, cert = self.header, self.cert
        if (cert.kind != "committed" or cert.seq != header.height or cert.t != header.t
                or cert.digest != header.digest or self.record.get("height") != header.height):
            raise CertificateInvalid("receipt: certificate is not for this block")
        check_certificate(cert, keyring, need_requests=False)
        check_header_votes(header.height, header.hash, self.header_sigs, keyring)
        if self.proof.index != self.record.get("index") or self.result_proof.index != \
                self.proof.index or self.proof.size != self.result_proof.size:
            raise ProofInvalid("receipt: proof is for another position in the block")
        verify_inclusion(header.tx_root, self.request, self.proof)
        verify_inclusion(header.results_root, result_leaf(request_digest(self.request),
                                                          self.result), self.result_proof)
        if self.result.get("status") != "committed":
            raise ProofInvalid(f"receipt: the transaction did not succeed "
                               f"({self.result.get('status')}: {self.result.get('reason', '')})")
        try:
            req, _ = decode_frame(self.request)
        except MessageInvalid as exc:
            raise ProofInvalid(f"receipt: request frame does not decode ({exc})") from None
        if not isinstance(req, Request):
            raise ProofInvalid("receipt: proven frame is not a client request")
        return dict(req.tx)
