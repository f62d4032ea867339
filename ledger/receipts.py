"""A committed transaction's receipt: checkable offline, with only the validators' keys.

A receipt is the record a contract wrote, the signed request frame that carried the
transaction, its RFC 6962 inclusion proof under the block header's ``tx_root``, the header,
and the block's commit certificate (2f + 1 validator signatures). Whoever holds the genesis
validator keys can check it without talking to the ledger: an edge device that must not
install a model the ledger never recorded, or an auditor proving one prediction years later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ledger.blocks import BlockHeader
from ledger.errors import CertificateInvalid, MessageInvalid
from medchain.errors import ProofInvalid
from medchain.merkle import InclusionProof, verify_inclusion
from ledger.messages import Certificate, Request, decode_frame
from ledger.quorum import Keyring, check_certificate

__all__ = ["TxReceipt"]


@dataclass(frozen=True)
class TxReceipt:
    record: dict
    header: BlockHeader
    request: bytes
    proof: InclusionProof
    cert: Certificate

    def to_wire(self) -> dict:
        return {"record": self.record, "request": self.request, "proof": self.proof.to_wire(),
                "header": self.header.to_wire(), "cert": self.cert.to_wire()}

    @classmethod
    def from_wire(cls, a: Mapping) -> TxReceipt:
        """Parse; :class:`ProofInvalid` when a part is missing or malformed."""
        try:
            if a.get("cert") is None:
                raise ProofInvalid("receipt: the block has no commit certificate yet")
            return cls(dict(a["record"]), BlockHeader.from_wire(a["header"]), bytes(a["request"]),
                       InclusionProof.from_wire(a["proof"]), Certificate.from_wire(a["cert"]))
        except (KeyError, TypeError, ValueError, AttributeError, MessageInvalid) as exc:
            raise ProofInvalid(f"receipt: malformed ({type(exc).__name__}: {exc})") from None

    def verify(self, keyring: Keyring) -> dict:
        """The proven transaction (its fields as submitted), or :class:`CertificateInvalid` /
        :class:`ProofInvalid` naming what does not hold."""
        header, cert = self.header, self.cert
        if (cert.kind != "committed" or cert.seq != header.height or cert.t != header.t
                or cert.digest != header.digest or self.record.get("height") != header.height):
            raise CertificateInvalid("receipt: certificate is not for this block")
        check_certificate(cert, keyring, need_requests=False)
        if self.proof.index != self.record.get("index"):
            raise ProofInvalid("receipt: proof is for another position in the block")
        verify_inclusion(header.tx_root, self.request, self.proof)
        try:
            req, _ = decode_frame(self.request)
        except MessageInvalid as exc:
            raise ProofInvalid(f"receipt: request frame does not decode ({exc})") from None
        if not isinstance(req, Request):
            raise ProofInvalid("receipt: proven frame is not a client request")
        return dict(req.tx)
