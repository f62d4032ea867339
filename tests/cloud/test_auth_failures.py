"""Refused authentications (no principal established): an API call or a custodian fetch
whose signature does not verify, that names no active principal, or is unsigned, stale or
replayed is counted by reason (the API's ``/metrics``, Prometheus text) and appended to a
local log with the principal it *claimed* — and an authenticated call is not. Before this,
the API logged nothing of them and counted nothing; the custodian only counted "fetches
refused" together with refusals of authenticated principals."""

from __future__ import annotations

import json
import stat
import time
from types import SimpleNamespace

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cloud.access_protocol import FetchRequest
from cloud.api import create_app
from cloud.api_auth import sign_request
from cloud.auth_failures import FailureLog
from cloud.custodian_access import AccessGate
from cloud.custodian_protocol import ReplayGuard
from medchain.canonical import decode
from medchain.identity import SigningKey

ALICE, MALLORY = SigningKey.generate(), SigningKey.generate()
PRINCIPALS = {"alice": {"role": "clinician", "key": ALICE.public.raw, "active": True, "recipient": b"\x01" * 32}}


def count(text: str, where: str, reason: str) -> float:
    """The counter's value for (where, reason), read back with the client's own parser."""
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "medchain_auth_failures_total" and s.labels == {"where": where, "reason": reason})


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_log_appends_sanitized_claims_and_the_metrics_count_them(tmp_path):
    log = FailureLog(tmp_path / "f.jsonl", clock=lambda: 1.5)
    log.record("api", "bad-signature", "alice", method="GET", path="/v1/access/status")
    log.record("api", "bad-signature", "eve\n{\"forged\": 1}" + "x" * 500)
    log.record("custodian", "unknown-or-revoked", None)
    first, second, third = lines(tmp_path / "f.jsonl")
    assert first == {"t": 1500, "where": "api", "reason": "bad-signature", "claimed": "alice", "method": "GET",
                     "path": "/v1/access/status"}
    assert second["claimed"].startswith("eve?{") and len(second["claimed"]) == 128  # one line, bounded
    assert third["claimed"] is None
    assert stat.S_IMODE((tmp_path / "f.jsonl").stat().st_mode) == 0o600
    text = log.metrics()
    assert '# TYPE medchain_auth_failures_total counter' in text
    assert count(text, "api", "bad-signature") == 2
    assert count(text, "custodian", "unknown-or-revoked") == 1
    FailureLog(tmp_path / "f.jsonl").record("api", "stale", "bob")  # a restarted process appends
    assert len(lines(tmp_path / "f.jsonl")) == 4


def test_the_api_counts_and_logs_calls_that_establish_no_principal(tmp_path):
    gateway = SimpleNamespace(ledger=SimpleNamespace(principal=PRINCIPALS.get), audit=lambda name: [])
    log = FailureLog(tmp_path / "api.jsonl")
    now = int(time.time() * 1000)
    with TestClient(create_app(gateway, failures=log), raise_server_exceptions=False) as client:
        forged = sign_request(MALLORY, "alice", "GET", "/v1/access/status", b"", now_ms=now)
        assert client.get("/v1/access/status", headers=forged).status_code == 401
        assert client.get("/v1/access/status").status_code == 401  # unsigned
        ghost = sign_request(MALLORY, "ghost", "GET", "/v1/access/status", b"", now_ms=now)
        assert client.get("/v1/access/status", headers=ghost).status_code == 401
        good = sign_request(ALICE, "alice", "GET", "/v1/access/status", b"", now_ms=now)
        assert client.get("/v1/access/status", headers=good).status_code == 200  # not a failure
        assert client.get("/v1/access/status", headers=good).status_code == 401  # replayed
        metrics = client.get("/metrics")
    assert [(e["reason"], e["claimed"], e["path"]) for e in lines(tmp_path / "api.jsonl")] == [
        ("bad-signature", "alice", "/v1/access/status"), ("unsigned", None, "/v1/access/status"),
        ("unknown-or-revoked", "ghost", "/v1/access/status"), ("replayed", "alice", "/v1/access/status")]
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert count(metrics.text, "api", "bad-signature") == 1


def test_the_custodian_logs_a_fetch_whose_signature_does_not_verify(tmp_path):
    ledger = SimpleNamespace(principal=PRINCIPALS.get)
    log = FailureLog(tmp_path / "custodian.jsonl")
    gate = AccessGate(ledger, store=None, key=None, guard=ReplayGuard(), failures=log)
    now = int(time.time() * 1000)
    forged = FetchRequest.new("alice", "diagnosis", [("0" * 32, 1)], now_ms=now).signed(MALLORY)
    reply = gate.answer(decode(forged), now)
    assert reply.items == () and "signature does not verify" in reply.error
    ghost = FetchRequest.new("ghost", "diagnosis", [("0" * 32, 1)], now_ms=now).signed(MALLORY)
    assert "not on the ledger" in gate.answer(decode(ghost), now).error
    assert [(e["where"], e["reason"], e["claimed"]) for e in lines(tmp_path / "custodian.jsonl")] == [
        ("custodian", "bad-signature", "alice"), ("custodian", "unknown-or-revoked", "ghost")]
