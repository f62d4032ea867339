"""The access API over a real 4-validator ledger and the custodian server: the same request,
status and fetch as the CLI, each call a signed request of a ledger principal; forged,
replayed, stale and unsigned calls refused with problem+json; no stack trace ever; the
OpenAPI schema served. One test runs a real uvicorn on a free loopback port."""

from __future__ import annotations

import base64
import json
import time
from functools import partial

import httpx
import pytest
from fastapi.testclient import TestClient

from cloud.access import LedgerGateway, Requester, latest_grants
from cloud.access_protocol import FetchRequest
from cloud.api import ApiServer, create_app
from cloud.api_auth import sign_request
from cloud.api_client import ApiProblem, HttpGateway
from cloud.custodian_service import ask_custodian
from medchain.errors import MedChainError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(world):
    """The app, acting on the ledger as its own principal of role ``api`` (it may file
    requests on behalf of others, nothing else), forwarding fetches to the world's custodian."""
    with world.cluster.client("api") as ledger:
        gateway = LedgerGateway(ledger, partial(ask_custodian, world.server.config.socket), world.store)
        yield create_app(gateway)


@pytest.fixture
def client(api):
    with TestClient(api, raise_server_exceptions=False) as c:
        yield c


def over_http(client, p):
    return Requester(HttpGateway(client, p.name, p.key), p.name, p.key, p.recipient)


def test_request_status_fetch_over_the_api(world, person, client, tmp_path):
    dr = person("radiologist")
    a, _, data = world.image(consent=("diagnosis",))
    b, _, _ = world.image(consent=())
    me = over_http(client, dr)
    decisions = me.request([a, b], "diagnosis")
    assert [(d.granted, d.reason) for d in decisions] == [(True, "granted"), (False, "no consent for purpose")]
    fetched = me.fetch(latest_grants(me.status(), "diagnosis"), "diagnosis", tmp_path / "out")
    assert [f.path.read_bytes() for f in fetched] == [data]
    entries = me.status()
    assert [(e["image"].hex(), e["action"], e["granted"]) for e in entries] == [
        (a, "request", True), (b, "request", False), (a, "fetch", True)]
    assert all(e["by"] == "api" for e in entries[:2]) and entries[2]["by"] == "custodian"
    assert all(e["validators"] >= world.cluster.genesis.f + 1 for e in entries)
    # the ciphertext of an image not granted is not handed out
    with pytest.raises(ApiProblem) as exc:
        HttpGateway(client, dr.name, dr.key).envelope(b)
    assert (exc.value.status, exc.value.code) == (403, "no-grant")


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status
    assert "Traceback" not in response.text and "File \"" not in response.text
    return body


def signed(p, method, path, body: bytes = b"", **kw):
    headers = sign_request(p.key, p.name, method, path, body, now_ms=kw.pop("now_ms", int(time.time() * 1000)), **kw)
    if body:
        headers["Content-Type"] = "application/json"
    return headers


def test_unsigned_forged_replayed_stale_and_revoked_calls_are_refused(world, person, client):
    alice, mallory = person("clinician"), person("clinician")
    problem(client.get("/v1/access/status"), 401, "unauthorized")
    # mallory signs a call naming alice
    headers = sign_request(mallory.key, alice.name, "GET", "/v1/access/status", b"", now_ms=int(time.time() * 1000))
    assert "signature does not verify" in problem(client.get("/v1/access/status", headers=headers),
                                                  401, "unauthorized")["detail"]
    # a body swapped under a valid signature
    a, _, _ = world.image()
    body = json.dumps({"images": [a], "purpose": "diagnosis"}).encode()
    headers = signed(alice, "POST", "/v1/access/requests", body)
    other = json.dumps({"images": [a], "purpose": "research"}).encode()
    problem(client.post("/v1/access/requests", content=other, headers=headers), 401, "unauthorized")
    # replayed: the first call decides, the same headers again are refused
    headers = signed(alice, "POST", "/v1/access/requests", body)
    assert client.post("/v1/access/requests", content=body, headers=headers).status_code == 200
    assert "replayed" in problem(client.post("/v1/access/requests", content=body, headers=headers),
                                 401, "unauthorized")["detail"]
    # stale
    headers = signed(alice, "GET", "/v1/access/status", now_ms=int(time.time() * 1000) - 300_000)
    assert "stale" in problem(client.get("/v1/access/status", headers=headers), 401, "unauthorized")["detail"]
    # a fetch of alice's forwarded by mallory's signed call
    [grant] = latest_grants(alice.requester.status(), "diagnosis")
    inner = FetchRequest.new(alice.name, "diagnosis", [grant], now_ms=int(time.time() * 1000)).signed(alice.key)
    with pytest.raises(ApiProblem) as exc:
        HttpGateway(client, mallory.name, mallory.key).call(
            "POST", "/v1/access/fetch", {"request": base64.b64encode(inner).decode()})
    assert (exc.value.status, exc.value.code) == (403, "principal-mismatch")
    # revoked: the API refuses the principal outright
    from ledger.transactions import PrincipalSet

    assert world.operator.submit(PrincipalSet(alice.name, "clinician", alice.key.public.raw, False)).committed
    assert "revoked" in problem(client.get("/v1/access/status", headers=signed(alice, "GET", "/v1/access/status")),
                                401, "unauthorized")["detail"]
    # only alice's one request reached the ledger
    assert [e["action"] for e in world.operator.audit(user=alice.name)] == ["request"]


def test_errors_are_problems_and_the_schema_is_served(world, person, client):
    dr = person("clinician")
    body = json.dumps({"images": ["not-hex"], "purpose": "diagnosis"}).encode()
    problem(client.post("/v1/access/requests", content=body, headers=signed(dr, "POST", "/v1/access/requests", body)),
            422, "invalid-request")
    body = json.dumps({"images": ["0" * 32], "purpose": "looking"}).encode()
    problem(client.post("/v1/access/requests", content=body, headers=signed(dr, "POST", "/v1/access/requests", body)),
            422, "invalid-request")
    problem(client.get("/v1/nothing"), 404, "not-found")
    problem(client.delete("/v1/access/status"), 405, "method-not-allowed")
    schema = client.get("/openapi.json").json()
    assert {"/v1/access/requests", "/v1/access/status", "/v1/access/fetch", "/v1/images/{image}/envelope",
            "/v1/images/{image}/record"} <= set(schema["paths"])


def test_an_internal_error_is_a_problem_without_a_trace(world, person):
    class Broken(LedgerGateway):
        def audit(self, name):
            raise RuntimeError("secret internals /srv/medchain/keys")

    with world.cluster.client("operator") as ledger:
        app = create_app(Broken(ledger, None, world.store))
        dr = person("clinician")
        with TestClient(app, raise_server_exceptions=False) as c:
            body = problem(c.get("/v1/access/status", headers=signed(dr, "GET", "/v1/access/status")), 500, "internal")
    assert "secret" not in json.dumps(body)


def test_a_real_server_on_loopback(world, person, api, tmp_path):
    with pytest.raises(MedChainError, match="needs --tls-cert"):
        ApiServer(api, host="0.0.0.0")
    dr = person("clinician")
    a, _, data = world.image()
    with ApiServer(api) as server, httpx.Client(base_url=server.url) as http:
        assert server.url.startswith("http://127.0.0.1:")
        me = over_http(http, dr)
        assert me.request([a], "diagnosis")[0].granted
        [f] = me.fetch(latest_grants(me.status(), "diagnosis"), "diagnosis", tmp_path / "out")
    assert f.path.read_bytes() == data


def test_medchain_cloud_api_serves_on_loopback(world, person, tmp_path):
    """`medchain cloud api --config cloud.toml --port 0` as an operator runs it."""
    import subprocess
    import sys

    cluster = world.cluster
    (tmp_path / "cloud.toml").write_text(
        f'[broker]\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\ningest_key = "{cluster.key_path("ingest")}"\n'
        f'operator_key = "{cluster.key_path("operator")}"\napi_key = "{cluster.key_path("api")}"\n\n'
        f'[store]\nurl = "{world.store.root}"\n\n'
        f'[database]\nurl = "sqlite:///unused.sqlite"\n\n[keys]\ncustodian = "c.pub"\nmodel = "m.key"\n\n'
        f'[custodian]\nsocket = "{world.server.config.socket}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "medchain_app.cli", "cloud", "api", "--config",
                             str(tmp_path / "cloud.toml"), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "cloud api ready: http://127.0.0.1:" in line, line + proc.stdout.read() if proc.poll() else line
        url = line.split()[3]
        dr = person("clinician")
        a, _, _ = world.image()
        with httpx.Client(base_url=url) as http:
            me = over_http(http, dr)
            assert me.request([a], "diagnosis")[0].granted
            assert [e["action"] for e in me.status()] == ["request"]
            assert http.get("/openapi.json").json()["info"]["title"] == "MedChain access API"
    finally:
        proc.terminate()
        proc.wait(10)


def test_studies_are_listed_by_role_metadata_only(world, person, client):
    import os

    study = f"1.2.826.0.2.{os.urandom(3).hex()}"
    a, patient, _ = world.image(consent=("research",), study=study, study_date="20180101")
    researcher, clinician, service = person("researcher"), person("clinician"), person("training")
    [s] = HttpGateway(client, researcher.name, researcher.key).studies(study=study)
    assert (s["patient"], s["series"], s["consented"], s["open_to_you"]) == (patient, {"se": [a]}, ["research"],
                                                                              ["research"])
    assert s["study_date"] == "20180101"  # the (shifted) study date the edge sealed
    [s] = HttpGateway(client, clinician.name, clinician.key).studies(study=study)
    assert s["open_to_you"] == []  # consented for research only; clinicians are allowed diagnosis
    with pytest.raises(ApiProblem) as exc:
        HttpGateway(client, service.name, service.key).studies()
    assert (exc.value.status, exc.value.code) == (403, "role-not-allowed")
    # by patient token: a read on the patient's trail, which the API cannot file as the signer
    with pytest.raises(ApiProblem) as exc:
        HttpGateway(client, researcher.name, researcher.key).studies(patient=patient)
    assert (exc.value.status, exc.value.code) == (403, "patient-read-not-served")
    # and a whole study requested over the API
    me = over_http(client, researcher)
    assert [(d.envelope_id, d.granted) for d in me.request_study(study, "research")] == [(a, True)]


def test_a_series_is_requested_whole_over_the_api_and_fetched(world, person, client, tmp_path):
    """`{"series": [uid]}`: every image of that series (not of its study's other series) is
    decided on its own; the granted ones fetch and decrypt; an empty request is refused."""
    import os

    dr = person("clinician")
    study, series = f"1.2.826.0.2.{os.urandom(3).hex()}", f"1.2.826.0.3.{os.urandom(3).hex()}"
    a, patient, da = world.image(consent=("diagnosis",), study=study, series=series)
    b, _, db = world.image(consent=("diagnosis",), patient=patient, study=study, series=series)
    c, _, _ = world.image(consent=("diagnosis",), patient=patient, study=study, series=series + ".9")
    body = json.dumps({"series": [series], "purpose": "diagnosis"}).encode()
    response = client.post("/v1/access/requests", content=body, headers=signed(dr, "POST", "/v1/access/requests", body))
    assert response.status_code == 200, response.text
    decisions = response.json()["decisions"]
    assert sorted((d["image"], d["granted"]) for d in decisions) == sorted([(a, True), (b, True)])
    me = over_http(client, dr)
    fetched = me.fetch(latest_grants(me.status(), "diagnosis"), "diagnosis", tmp_path / "out")
    assert sorted(f.path.read_bytes() for f in fetched) == sorted([da, db])
    assert c not in {f.envelope_id for f in fetched}
    body = json.dumps({"purpose": "diagnosis"}).encode()
    problem(client.post("/v1/access/requests", content=body, headers=signed(dr, "POST", "/v1/access/requests", body)),
            422, "invalid-request")


class _SwappingClient:
    """The requester's HTTP client, with the API's answer for one path replaced by another's
    (an API, or a proxy in front of it, that lies about an image's record)."""

    def __init__(self, client, path: str, content: bytes):
        self.client, self.path, self.content = client, path, content

    def request(self, method, path, **kw):
        response = self.client.request(method, path, **kw)
        if path == self.path:
            return httpx.Response(200, content=self.content, headers={"content-type": "application/cbor"})
        return response


def test_an_http_requester_with_the_validator_keys_verifies_receipts_itself(world, person, client, tmp_path):
    """With the genesis validator keys the requester over HTTP checks each image's ledger
    receipt (`/receipt`) instead of trusting the API's `/record`: the fetch works, and an API
    that hands out another image's receipt gets the image refused, nothing written."""
    dr = person("clinician")
    a, _, da = world.image(consent=("diagnosis",))
    b, _, _ = world.image(consent=("diagnosis",))
    keyring = world.operator.keyring
    me = Requester(HttpGateway(client, dr.name, dr.key, keyring=keyring), dr.name, dr.key, dr.recipient)
    me.request([a, b], "diagnosis")
    [fa] = me.fetch(latest_grants(me.status(), "diagnosis", [a]), "diagnosis", tmp_path / "out")
    assert fa.path.read_bytes() == da
    receipt_b = HttpGateway(client, dr.name, dr.key).call("GET", f"/v1/images/{b}/receipt").content
    lying = _SwappingClient(client, f"/v1/images/{a}/receipt", receipt_b)
    fooled = Requester(HttpGateway(lying, dr.name, dr.key, keyring=keyring), dr.name, dr.key, dr.recipient)
    [f] = fooled.fetch(latest_grants(me.status(), "diagnosis", [a]), "diagnosis", tmp_path / "out2")
    assert f.path is None and f.refused.startswith("failed verification")
    assert not (tmp_path / "out2").exists()
    # the receipt, like the record, only for a principal the image was granted to
    problem(client.get(f"/v1/images/{a}/receipt", headers=signed(person("clinician"), "GET",
                                                                  f"/v1/images/{a}/receipt")), 403, "no-grant")


def test_the_api_principal_files_requests_and_nothing_else(world, person, tmp_path):
    """The API's own ledger key (role ``api``) serves request and fetch end to end, but the
    ledger refuses it everything an operator could do — up to commit b569aac the API held
    the operator's key, so a compromised API process could register principals and set
    consent (tests/ledger/test_api_principal.py shows those calls under the operator role) —
    and `medchain cloud api` refuses to run under a key whose principal is not of role api."""
    import subprocess
    import sys

    from ledger.transactions import AccessRequested, ConsentSet, PrincipalSet
    from medchain.identity import SigningKey

    dr = person("clinician")
    a, patient, data = world.image(consent=("diagnosis",))
    with world.cluster.client("api") as api_ledger:
        for tx in (PrincipalSet("mallory", "auditor", SigningKey.generate().public.raw),
                   PrincipalSet(dr.name, dr.role, dr.key.public.raw, False),
                   ConsentSet(patient, "diagnosis", False, int(time.time() * 1000))):
            r = api_ledger.submit(tx)
            assert not r.committed and "role 'api' may not submit" in r.reason, r
        fake = api_ledger.submit(AccessRequested(dr.name, bytes.fromhex(a), "diagnosis", "fetch"))
        assert fake.output["granted"] is False and fake.output["reason"] == "the API files request only"
        with pytest.raises(Exception, match="not authorized"):
            api_ledger.principals()
        with TestClient(create_app(LedgerGateway(api_ledger, partial(ask_custodian, world.server.config.socket),
                                                 world.store)), raise_server_exceptions=False) as c:
            me = over_http(c, dr)
            assert me.request([a], "diagnosis")[0].granted
            [f] = me.fetch(latest_grants(me.status(), "diagnosis"), "diagnosis", tmp_path / "out")
    assert f.path.read_bytes() == data
    assert world.operator.principal(dr.name)["active"] and world.operator.principal("mallory") is None
    cluster = world.cluster
    (tmp_path / "cloud.toml").write_text(  # an operator key as the API's: refused
        f'[broker]\n\n[ledger]\ngenesis = "{cluster.genesis_path}"\ningest_key = "{cluster.key_path("ingest")}"\n'
        f'api_key = "{cluster.key_path("operator")}"\napi_name = "operator"\n\n[store]\nurl = "{world.store.root}"\n\n'
        f'[database]\nurl = "sqlite:///unused.sqlite"\n\n[keys]\ncustodian = "c.pub"\nmodel = "m.key"\n\n'
        f'[custodian]\nsocket = "{world.server.config.socket}"\n')
    out = subprocess.run([sys.executable, "-m", "medchain_app.cli", "cloud", "api", "--config",
                          str(tmp_path / "cloud.toml"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "has role 'operator'" in out.stderr and "ready" not in out.stdout, out
