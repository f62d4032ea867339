"""A committed transaction's receipt: checkable offline, with only the validators' keys.

A receipt is the record a contract wrote, the signed request frame that carried the
transaction, its RFC 6962 inclusion proof under the block header's ``tx_root``, the header,
and the block's commit certificate (2f + 1 validator signatures). Whoever holds the genesis
validator keys can check it without talking to the ledger: an edge device that must not
install a model the ledger never recorded, or an auditor proving one prediction years later.
"""

from __future__ import annotations

from dataclasses import dataclass

from ledger.blocks import BlockHeader
from ledger.errors import CertificateInvalid, MessageInvalid
from ledger.messages import Certificate, Request, decode_frame
from ledger.quorum import Keyring, check_certificate
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

    def to_wire(self) -> dict:
        return self.SCHEMA.encode(self)

    @classmethod
    def from_wire(cls, a: object) -> TxReceipt:
        """Parse; :class:`ProofInvalid` when a part is missing or malformed."""
        if type(a) is dict and "cert" in a and a["cert"] is None:
            raise ProofInvalid("receipt: the block has no commit certificate yet")
        return cls.SCHEMA.decode(a)

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
