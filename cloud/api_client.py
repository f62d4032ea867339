"""The requester's side of the HTTP API: a :class:`~cloud.access.Gateway` over httpx whose
every call is signed with the principal's key (:mod:`cloud.api_auth`).

Problems come back as :class:`ApiProblem` carrying the server's stable ``code``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence

import httpx

from cloud.access import Decision
from cloud.access_protocol import FetchItem, FetchReply
from cloud.api_auth import sign_request
from cloud.errors import CloudError
from medchain.identity import SigningKey
from medchain.protocol import Envelope, decode_message

__all__ = ["ApiProblem", "HttpGateway"]


class ApiProblem(CloudError):
    """The API answered with a problem: ``status`` and its stable ``code``."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class HttpGateway:
    """Signed calls to the API as principal ``name``. ``client``: an httpx client (a
    FastAPI TestClient in tests) whose base URL is the API's."""

    def __init__(self, client: httpx.Client, name: str, key: SigningKey, *,
                 clock: Callable[[], float] = time.time, keyring=None):
        """``keyring`` (:class:`ledger.quorum.Keyring`, the genesis validator keys): verify
        each image's ledger receipt here (``/receipt``) rather than trust the API's word for
        its Merkle root (``/record``)."""
        self.client, self.name, self._key, self._clock = client, name, key, clock
        self.keyring = keyring

    def call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        data = b"" if body is None else json.dumps(body).encode()
        headers = sign_request(self._key, self.name, method, path, data, now_ms=int(self._clock() * 1000))
        if body is not None:
            headers["Content-Type"] = "application/json"
        response = self.client.request(method, path, content=data, headers=headers)
        if response.status_code >= 400:
            try:
                problem = response.json()
                raise ApiProblem(response.status_code, problem["code"], problem.get("detail", ""))
            except (ValueError, KeyError):
                raise ApiProblem(response.status_code, "unknown", response.text[:200]) from None
        return response

    def decide(self, name: str, envelope_ids: Sequence[str], purpose: str) -> list[Decision]:
        out = self.call("POST", "/v1/access/requests", {"images": list(envelope_ids), "purpose": purpose}).json()
        return [Decision(d["image"], d["granted"], d["reason"], d["audit"]) for d in out["decisions"]]

    def audit(self, name: str) -> list[dict]:
        entries = self.call("GET", "/v1/access/status").json()["entries"]
        return [{"id": e["audit"], "image": bytes.fromhex(e["image"]) if e["image"] else None, "purpose": e["purpose"],
                 "action": e["action"], "granted": e["granted"], "reason": e["reason"], "t": e["t"],
                 "by": e["by"], "validators": e["validators"]} for e in entries]

    def custodian(self, data: bytes) -> bytes:
        try:
            out = self.call("POST", "/v1/access/fetch", {"request": base64.b64encode(data).decode()}).json()
        except ApiProblem as exc:
            if exc.code != "fetch-refused":
                raise
            return FetchReply(error=exc.detail).encode()
        return FetchReply(tuple(FetchItem(i["image"], None if i["wrapped_key"] is None
                                          else base64.b64decode(i["wrapped_key"]), i["audit"], i["refused"])
                                for i in out["items"])).encode()

    def envelope(self, envelope_id: str) -> Envelope:
        return decode_message(self.call("GET", f"/v1/images/{envelope_id}/envelope").content, Envelope)

    def registered(self, envelope_id: str) -> tuple[bytes | None, bytes | None]:
        if self.keyring is not None:
            return self._proven(envelope_id)
        r = self.call("GET", f"/v1/images/{envelope_id}/record").json()
        return bytes.fromhex(r["merkle_root"]), bytes.fromhex(r["device_key"]) if r["device_key"] else None

    def _proven(self, envelope_id: str) -> tuple[bytes, bytes | None]:
        """The registered Merkle root from the image's receipt, verified against the keyring:
        the proven transaction must register this very envelope."""
        from ledger.receipts import TxReceipt
        from medchain.canonical import decode
        from medchain.errors import ProofInvalid

        answer = decode(self.call("GET", f"/v1/images/{envelope_id}/receipt").content)
        if not isinstance(answer, dict) or "receipt" not in answer:
            raise ProofInvalid("receipt: the API's answer is not a receipt")
        tx = TxReceipt.from_wire(answer["receipt"]).verify(self.keyring)
        if tx.get("type") != "IMAGE_REGISTERED" or tx.get("envelope_id") != bytes.fromhex(envelope_id):
            raise ProofInvalid("receipt: the proven transaction registers another image")
        device = answer.get("device_key")
        return tx["merkle_root"], device if isinstance(device, bytes) else None

    def registered_many(self, envelope_ids) -> dict[str, tuple[bytes | None, bytes | None]]:
        return {}  # the API answers one record per call: the requester asks per image, in its threads

    def studies(self, **filters: str) -> list[dict]:
        query = "&".join(f"{k}={v}" for k, v in sorted(filters.items()) if v is not None)
        return self.call("GET", "/v1/studies" + (f"?{query}" if query else "")).json()["studies"]
