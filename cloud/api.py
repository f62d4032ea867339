"""The people's HTTP API (FastAPI): request, status, fetch, as the CLI offers them.

Every call is a signed request (:mod:`cloud.api_auth`) of an active ledger principal. The
API holds no key that opens an image: it files ``ACCESS_REQUESTED`` on behalf of the signer
under its own ledger principal of role ``api`` (which may file requests for others and
nothing else: no principal, consent or policy, no patient-keyed read), forwards the
signer's own signed fetch to the custodian, and hands out ciphertext only to a principal the ledger granted the image.
Errors are ``application/problem+json`` with a stable ``code``, never a stack trace. The
schema is served at ``/openapi.json``.

:class:`ApiServer` runs it under uvicorn (loopback by default; TLS files required for any
other address): ``medchain cloud api --config cloud.toml [--port N]``.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud.access import LedgerGateway
from cloud.access_protocol import FETCH_KIND, FetchReply
from cloud.api_auth import PRINCIPAL, SignedBy, verify_request
from cloud.auth_failures import FailureLog
from cloud.custodian_access import REQUEST_ACTION
from cloud.custodian_protocol import ReplayGuard
from cloud.errors import ApiUnauthorized, CustodianError, ObjectStoreError
from ledger.contracts import LISTERS
from ledger.errors import LedgerError
from ledger.tls import is_loopback
from medchain.canonical import canonical_bytes
from medchain.errors import MedChainError
from medchain.protocol import encode

__all__ = ["ApiServer", "Problem", "create_app"]

log = logging.getLogger("medchain.api")
ID_PATTERN = "^[0-9a-f]{32}$"
EnvelopeId = Annotated[str, Field(pattern=ID_PATTERN, description="an envelope id: 32 lowercase hex digits")]
ImageParam = Annotated[str, PathParam(pattern=ID_PATTERN, description="an envelope id: 32 lowercase hex digits")]
Purpose = Literal["diagnosis", "research", "training", "sharing"]


class Problem(Exception):
    """An RFC 9457 problem: ``code`` is stable (clients branch on it), ``detail`` is safe."""

    def __init__(self, status: int, code: str, title: str, detail: str = ""):
        super().__init__(detail or title)
        self.status, self.code, self.title, self.detail = status, code, title, detail

    def response(self) -> JSONResponse:
        body = {"type": f"https://medchain.invalid/problems/{self.code}", "title": self.title,
                "status": self.status, "code": self.code}
        if self.detail:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=self.status, media_type="application/problem+json")


# -- bodies ---------------------------------------------------------------------------------

SeriesUid = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[0-9A-Za-z._-]+$",
                                  description="a series uid as the ledger registered it (the studies listing's)")]


class AccessRequestBody(BaseModel):
    images: list[EnvelopeId] = Field(default_factory=list, max_length=1000)
    series: list[SeriesUid] = Field(default_factory=list, max_length=100,
                                    description="every image of each series, decided one by one")
    purpose: Purpose

    @model_validator(mode="after")
    def _something(self) -> AccessRequestBody:
        if not self.images and not self.series:
            raise ValueError("name images, series or both")
        return self


class DecisionOut(BaseModel):
    image: str
    granted: bool
    reason: str
    audit: int


class DecisionsOut(BaseModel):
    decisions: list[DecisionOut]


class AuditEntryOut(BaseModel):
    audit: int
    image: str | None = Field(description="envelope id; null for a read of a patient's history")
    purpose: str | None = Field(description="null for a read of a patient's history")
    action: str
    granted: bool
    reason: str
    t: int
    by: str
    validators: int


class StatusOut(BaseModel):
    entries: list[AuditEntryOut]


class FetchBody(BaseModel):
    request: str = Field(description="the signed fetch request (cloud.access_protocol), base64")


class FetchItemOut(BaseModel):
    image: str
    wrapped_key: str | None = Field(None, description="the data key re-wrapped to the signer, base64")
    audit: int | None = None
    refused: str | None = None


class FetchOut(BaseModel):
    items: list[FetchItemOut]


class StudyOut(BaseModel):
    patient: str = Field(description="the patient's pseudonym token")
    study: str
    modalities: list[str]
    registered_t: int = Field(description="ledger block time of the first registration, ms")
    study_date: str | None = Field(None, description="the study date (YYYYMMDD) as de-identification shifted it "
                                                     "by the patient's date shift; null when the edge keeps no dates")
    policies: list[str]
    consented: list[str] = Field(description="purposes with valid consent now")
    open_to_you: list[str] = Field(description="purposes your role could be granted now")
    series: dict[str, list[str]] = Field(description="series uid -> envelope ids")


class StudiesOut(BaseModel):
    studies: list[StudyOut]


# roles that may list studies (metadata only): those who could ask for them, and who oversee
LISTING_ROLES = LISTERS["studies"] - {"api"}


class RecordOut(BaseModel):
    image: str
    merkle_root: str
    device_key: str | None


def _entry(e: dict) -> AuditEntryOut:
    return AuditEntryOut(audit=e["id"], image=e["image"].hex() if e["image"] else None, purpose=e["purpose"], action=e["action"],
                         granted=e["granted"], reason=e["reason"], t=e["t"], by=e["by"],
                         validators=len(e.get("signatures", {})))


PROBLEM = {"content": {"application/problem+json": {}}, "description": "a problem (RFC 9457)"}


def create_app(gateway: LedgerGateway, *, clock: Callable[[], float] = time.time,
               guard: ReplayGuard | None = None, failures: FailureLog | None = None) -> FastAPI:
    """The API over ``gateway`` (whose ledger client acts on behalf of the signers).
    ``failures``: where refused authentications are counted (``/metrics``) and logged
    with the principal they claimed (:mod:`cloud.auth_failures`)."""
    guard = guard or ReplayGuard()
    failures = failures if failures is not None else FailureLog()
    lock = threading.Lock()  # the guard and the ledger client are shared between workers
    app = FastAPI(title="MedChain access API", version="1",
                  description="Signed requests of ledger principals; see docs/access.md.",
                  responses={401: PROBLEM, 403: PROBLEM, 422: PROBLEM, 503: PROBLEM})

    async def signer(request: Request) -> SignedBy:
        body = await request.body()
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            with lock:
                return verify_request(request.headers, request.method, target, body,
                                      lookup=gateway.ledger.principal, now_ms=int(clock() * 1000), guard=guard)
        except ApiUnauthorized as exc:  # no principal established: counted and logged, not audited
            failures.record("api", exc.kind, request.headers.get(PRINCIPAL), method=request.method,
                            path=request.url.path)
            raise

    WHO = Depends(signer)  # the verified signer of every call

    def granted(who: SignedBy, image: str) -> None:
        if not any(e["granted"] and e["action"] == REQUEST_ACTION and e["image"].hex() == image
                   for e in gateway.audit(who.name)):
            raise Problem(403, "no-grant", "No grant", "the ledger has granted this image to you for no purpose")

    @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    def metrics() -> PlainTextResponse:
        """Refused authentications by reason (Prometheus text format); counts only."""
        return PlainTextResponse(failures.metrics(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/access/requests", response_model=DecisionsOut)
    def request_access(body: AccessRequestBody, who: SignedBy = WHO) -> DecisionsOut:
        """Ask for images — named, or every image of the named series — for a purpose: the
        ledger decides per image and audits each."""
        for image in body.images:
            _check_id(image)
        images = list(body.images)
        for uid in body.series:
            images += [e for s in gateway.studies(series=uid) for e in s["series"].get(uid, [])
                       if e not in images]
        decisions = gateway.decide(who.name, images, body.purpose) if images else []
        return DecisionsOut(decisions=[DecisionOut(image=d.envelope_id, granted=d.granted, reason=d.reason,
                                                   audit=d.audit_id) for d in decisions])

    @app.get("/v1/access/status", response_model=StatusOut)
    def status(who: SignedBy = WHO) -> StatusOut:
        """Your requests and fetches, as the ledger's audit trail holds them."""
        return StatusOut(entries=[_entry(e) for e in gateway.audit(who.name)])

    @app.post("/v1/access/fetch", response_model=FetchOut)
    def fetch(body: FetchBody, who: SignedBy = WHO) -> FetchOut:
        """Forward your signed fetch to the custodian; the data keys it re-wrapped to you."""
        try:
            inner = base64.b64decode(body.request, validate=True)
        except ValueError:
            raise Problem(422, "invalid-request", "Invalid request", "request is not base64") from None
        _same_signer(inner, who)
        reply = FetchReply.decode(gateway.custodian(inner))
        if reply.error is not None:
            raise Problem(403, "fetch-refused", "Fetch refused", reply.error)
        return FetchOut(items=[FetchItemOut(
            image=i.envelope_id, audit=i.audit_id, refused=i.refused,
            wrapped_key=None if i.wrapped_key is None else base64.b64encode(i.wrapped_key).decode())
            for i in reply.items])

    @app.get("/v1/studies", response_model=StudiesOut)
    def studies(who: SignedBy = WHO, modality: str | None = None, patient: str | None = None,
                study: str | None = None, series: str | None = None) -> StudiesOut:
        """Registered studies by pseudonymous patient and modality: metadata only, no pixels;
        for the roles of :data:`LISTING_ROLES`. Not filtered by patient token here: that is
        a read on the patient's trail, which the ledger takes only under the reader's key."""
        if who.role not in LISTING_ROLES:
            raise Problem(403, "role-not-allowed", "Role not allowed", f"role {who.role!r} may not list studies")
        if patient is not None:  # a patient-keyed read is filed under the reader's own key
            raise Problem(403, "patient-read-not-served", "Patient-keyed listing not served here",
                          "a listing by patient token is a read on the patient's trail, filed under your own "
                          "key: `medchain cloud studies --patient` or LedgerClient.studies(patient=...)")
        found = gateway.studies(modality=modality, patient=patient, study=study, series=series)
        policies = {name: gateway.ledger.policy(name) or {} for name in {p for s in found for p in s["policies"]}}
        return StudiesOut(studies=[StudyOut(**s, open_to_you=[
            p for p in s["consented"] if all(who.role in policies[name].get(p, ()) for name in s["policies"])])
            for s in found])

    @app.get("/v1/images/{image}/envelope", response_class=Response,
             responses={200: {"content": {"application/cbor": {}}, "description": "the sealed envelope"}})
    def envelope(image: ImageParam, who: SignedBy = WHO) -> Response:
        """The sealed envelope (ciphertext) of an image the ledger granted you."""
        _check_id(image)
        granted(who, image)
        return Response(encode(gateway.envelope(image)), media_type="application/cbor")

    @app.get("/v1/images/{image}/record", response_model=RecordOut)
    def record(image: ImageParam, who: SignedBy = WHO) -> RecordOut:
        """The ledger's registered Merkle root and device key for an image granted to you."""
        _check_id(image)
        granted(who, image)
        root, device = gateway.registered(image)
        if root is None:
            raise Problem(404, "unknown-image", "Unknown image")
        return RecordOut(image=image, merkle_root=root.hex(), device_key=device.hex() if device else None)

    @app.get("/v1/images/{image}/receipt", response_class=Response,
             responses={200: {"content": {"application/cbor": {}},
                              "description": "{receipt: the image's ledger receipt (TxReceipt wire form), "
                                             "device_key}, canonical CBOR"}})
    def receipt(image: ImageParam, who: SignedBy = WHO) -> Response:
        """The registration receipt of an image granted to you — the request, its result,
        their inclusion proofs, the header, the commit certificate and f + 1 header
        signatures — to verify against the genesis validator keys yourself instead of
        trusting this API for the Merkle root; and the registering device's key."""
        _check_id(image)
        granted(who, image)
        proof = gateway.ledger.image(bytes.fromhex(image))
        if proof is None:
            raise Problem(404, "unknown-image", "Unknown image")
        device = gateway.ledger.device(proof.record["device_id"]).public_key
        return Response(canonical_bytes({"receipt": proof.to_wire(), "device_key": device}, check=False),
                        media_type="application/cbor")

    _install_handlers(app)
    return app


def _check_id(image: str) -> None:
    if len(image) != 32 or any(c not in "0123456789abcdef" for c in image):
        raise Problem(422, "invalid-request", "Invalid request", "an image id is 32 lowercase hex digits")


def _same_signer(inner: bytes, who: SignedBy) -> None:
    from medchain.canonical import decode

    try:
        outer = decode(inner)
        principal = decode(outer["body"])["principal"] if outer.get("kind") == FETCH_KIND else None
    except (MedChainError, KeyError, TypeError, AttributeError):
        principal = None
    if principal != who.name:
        raise Problem(403, "principal-mismatch", "Principal mismatch",
                      "the fetch must be a fetch request of the principal who signs the call")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem(_: Request, exc: Problem):
        return exc.response()

    @app.exception_handler(ApiUnauthorized)
    async def unauthorized(_: Request, exc: ApiUnauthorized):
        return Problem(401, "unauthorized", "Not authenticated", str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return Problem(422, "invalid-request", "Invalid request", where).response()

    @app.exception_handler(StarletteHTTPException)
    async def http(_: Request, exc: StarletteHTTPException):
        codes = {404: "not-found", 405: "method-not-allowed"}
        return Problem(exc.status_code, codes.get(exc.status_code, "http-error"), str(exc.detail)).response()

    @app.exception_handler(LedgerError)
    @app.exception_handler(CustodianError)
    @app.exception_handler(ObjectStoreError)
    @app.exception_handler(TimeoutError)
    async def unavailable(_: Request, exc: Exception):
        log.warning("api: a backend is unavailable: %s", exc)
        return Problem(503, "unavailable", "A backend is unavailable", type(exc).__name__).response()

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.exception("api: internal error")
        return Problem(500, "internal", "Internal error").response()


class ApiServer:
    """uvicorn serving :func:`create_app` in a thread; a context manager. Loopback unless
    ``tls`` (certificate and key files) is given."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[Path, Path] | None = None):
        import uvicorn

        if tls is None and not is_loopback(host):
            raise MedChainError(f"api: serving on {host} needs --tls-cert and --tls-key")
        ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     access_log=False, **ssl))
        self._thread = threading.Thread(target=self._server.run, name="api", daemon=True)
        self.scheme = "https" if tls else "http"

    @property
    def url(self) -> str:
        sock = self._server.servers[0].sockets[0].getsockname()
        return f"{self.scheme}://{sock[0]}:{sock[1]}"

    def __enter__(self) -> ApiServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise MedChainError("api: the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)

