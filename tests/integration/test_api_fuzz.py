"""The access API fuzzed against its own OpenAPI schema (schemathesis): every generated call
is signed by a registered principal, sent to the app over a real ledger and custodian, and
its response checked: no 5xx, status codes and bodies as the schema declares them."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from functools import partial
from urllib.parse import urlencode

import pytest

schemathesis = pytest.importorskip("schemathesis")

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi import checks

from cloud.access import LedgerGateway
from cloud.api import create_app
from cloud.api_auth import sign_request
from cloud.custodian_service import ask_custodian
from ledger.transactions import PrincipalSet
from medchain.identity import RecipientKey, SigningKey

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzzed(world):
    """The app, its test client and one registered clinician to sign with."""
    name, key = f"fuzz-{os.urandom(3).hex()}", SigningKey.generate()
    assert world.operator.submit(PrincipalSet(name, "clinician", key.public.raw, True,
                                              RecipientKey.generate().public.raw)).committed
    with world.cluster.client("api") as ledger:
        app = create_app(LedgerGateway(ledger, partial(ask_custodian, world.server.config.socket), world.store))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield app, client, name, key


def test_the_api_keeps_to_its_schema(fuzzed):
    app, client, name, key = fuzzed
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 7
    seen: Counter = Counter()

    def check(case) -> None:
        body = b"" if case.body is NOT_SET else json.dumps(case.body).encode()
        query = dict(case.query or {})
        target = case.formatted_path + (f"?{urlencode(query, doseq=True)}" if query else "")
        headers = sign_request(key, name, case.method, target, body, now_ms=int(time.time() * 1000))
        if body:
            headers["Content-Type"] = "application/json"
        response = client.request(case.method, target, content=body, headers=headers)
        seen[(case.method, case.path, response.status_code)] += 1
        assert response.status_code < 500, response.text
        assert "Traceback" not in response.text
        case.validate_response(response, checks=[checks.status_code_conformance,
                                                 checks.content_type_conformance,
                                                 checks.response_schema_conformance])

    for operation in operations:
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            check(case)

        fuzz()
    # the calls were signed well enough to reach every operation's own logic
    reached = {(m, p) for (m, p, status), n in seen.items() if status != 401}
    assert len(reached) == 7, seen
