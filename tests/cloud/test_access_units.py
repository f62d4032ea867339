"""The pure parts of access for people: the re-wrapped key's binding (object id and
principal), the API's signed requests, the fetch request's wire form, PRINCIPAL_SET's
recipient key."""

from __future__ import annotations

import os

import pytest

from cloud.access import latest_grants
from cloud.access_protocol import FetchItem, FetchReply, FetchRequest, parse_fetch
from cloud.api_auth import sign_request, verify_request
from cloud.custodian_protocol import ReplayGuard
from cloud.errors import ApiUnauthorized, CustodianRefused
from ledger.errors import TransactionInvalid
from ledger.transactions import PrincipalSet, parse
from medchain.canonical import decode
from medchain.errors import DecryptionError
from medchain.identity import RecipientKey, SigningKey
from medchain.sealing import (
    new_object_key,
    open_with_data_key,
    package,
    unwrap_key_for_principal,
    wrap_key_for_principal,
)

NOW = 1_800_000_000_000


def test_a_rewrapped_key_opens_only_for_its_object_and_principal():
    alice = RecipientKey.generate()
    data_key, obj = os.urandom(32), os.urandom(16)
    wrapped = wrap_key_for_principal(data_key, obj, "alice", alice.public)
    assert unwrap_key_for_principal(wrapped, obj, "alice", alice) == data_key
    for other_obj, name, key in ((os.urandom(16), "alice", alice), (obj, "bob", alice),
                                 (obj, "alice", RecipientKey.generate())):
        with pytest.raises(DecryptionError):
            unwrap_key_for_principal(wrapped, other_obj, name, key)


def test_open_with_a_data_key_decrypts_what_package_sealed():
    device, custodian = SigningKey.generate(), RecipientKey.generate()
    key = new_object_key(custodian.public)
    env = package({"dicom": b"pixels"}, key, device_id="d", sequence=1, signer=device, created_ms=0)
    assert open_with_data_key(env, key.data_key, device.public) == {"dicom": b"pixels"}
    with pytest.raises(DecryptionError):
        open_with_data_key(env, os.urandom(32), device.public)


def record(key: SigningKey, active=True) -> dict:
    return {"key": key.public.raw, "active": active, "role": "clinician"}


@pytest.mark.parametrize("change", ["method", "path", "body", "time", "nonce", "principal"])
def test_a_signed_api_request_binds_method_path_body_time_nonce(change):
    key = SigningKey.generate()
    headers = sign_request(key, "dr", "POST", "/v1/x?a=1", b"{}", now_ms=NOW)
    args = {"method": "POST", "target": "/v1/x?a=1", "body": b"{}"}
    lookup = {"dr": record(key), "other": record(key)}.get
    if change == "method":
        args["method"] = "GET"
    elif change == "path":
        args["target"] = "/v1/x?a=2"
    elif change == "body":
        args["body"] = b'{"a": 1}'
    elif change == "time":
        headers["X-MedChain-Time"] = str(NOW + 1)
    elif change == "nonce":
        headers["X-MedChain-Nonce"] = os.urandom(16).hex()
    else:
        headers["X-MedChain-Principal"] = "other"
    with pytest.raises(ApiUnauthorized, match="signature does not verify"):
        verify_request(headers, args["method"], args["target"], args["body"], lookup=lookup, now_ms=NOW,
                       guard=ReplayGuard())


def test_api_requests_unsigned_unknown_revoked_stale_or_replayed_are_refused():
    key = SigningKey.generate()
    guard = ReplayGuard()

    def check(headers, lookup=None, now=NOW):
        return verify_request(headers, "GET", "/v1/s", b"", lookup=lookup or {"dr": record(key)}.get, now_ms=now,
                              guard=guard)

    headers = sign_request(key, "dr", "GET", "/v1/s", b"", now_ms=NOW)
    assert check(headers).name == "dr"
    with pytest.raises(ApiUnauthorized, match="replayed"):
        check(headers)
    with pytest.raises(ApiUnauthorized, match="missing"):
        check({})
    with pytest.raises(ApiUnauthorized, match="unknown or revoked"):
        check(sign_request(key, "dr", "GET", "/v1/s", b"", now_ms=NOW), {"dr": record(key, False)}.get)
    with pytest.raises(ApiUnauthorized, match="unknown or revoked"):
        check(sign_request(key, "nobody", "GET", "/v1/s", b"", now_ms=NOW))
    with pytest.raises(ApiUnauthorized, match="stale"):
        check(sign_request(key, "dr", "GET", "/v1/s", b"", now_ms=NOW - 120_000))
    with pytest.raises(ApiUnauthorized, match="malformed"):
        check({**sign_request(key, "dr", "GET", "/v1/s", b"", now_ms=NOW), "X-MedChain-Time": "soon"})


def test_fetch_request_and_reply_round_trip_and_malformed_ones_are_refused():
    key = SigningKey.generate()
    request = FetchRequest.new("dr", "diagnosis", [("ab" * 16, 7)], now_ms=NOW)
    parsed, body, sig = parse_fetch(decode(request.signed(key)))
    assert parsed == request
    key.public.verify_encoded("medchain/v1/access-fetch", body, sig)
    with pytest.raises(CustodianRefused, match="malformed"):
        parse_fetch({"kind": "fetch", "body": b"\xa0", "sig": b""})
    for bad in ([("zz" * 16, 1)], [("ab" * 16, -1)], [("ab", 1)]):
        with pytest.raises(CustodianRefused, match="malformed"):
            parse_fetch(decode(FetchRequest.new("dr", "diagnosis", bad, now_ms=NOW).signed(key)))
    empty = FetchRequest.new("dr", "diagnosis", [], now_ms=NOW)
    with pytest.raises(CustodianRefused, match="1 to"):
        parse_fetch(decode(empty.signed(key)))
    reply = FetchReply((FetchItem("ab" * 16, b"k", 3), FetchItem("cd" * 16, refused="no")))
    assert FetchReply.decode(reply.encode()) == reply


def test_principal_set_carries_an_optional_recipient_key():
    old = PrincipalSet("dr", "clinician", b"\x01" * 32)
    assert parse(old.to_wire()) == old and old.recipient_key is None
    new = PrincipalSet("dr", "clinician", b"\x01" * 32, True, b"\x02" * 32)
    assert parse(new.to_wire()) == new
    with pytest.raises(TransactionInvalid, match="recipient_key"):
        parse({**new.to_wire(), "recipient_key": b"short"})


def test_latest_grants_picks_the_last_granted_request_per_image():
    a, b = bytes(16), bytes([1]) * 16
    entries = [{"id": 1, "action": "request", "purpose": "diagnosis", "granted": True, "image": a},
               {"id": 2, "action": "request", "purpose": "research", "granted": True, "image": b},
               {"id": 3, "action": "fetch", "purpose": "diagnosis", "granted": True, "image": a},
               {"id": 4, "action": "request", "purpose": "diagnosis", "granted": False, "image": b},
               {"id": 5, "action": "request", "purpose": "diagnosis", "granted": True, "image": a}]
    assert latest_grants(entries, "diagnosis") == [(a.hex(), 5)]
    assert latest_grants(entries, "research", [b.hex(), a.hex()]) == [(b.hex(), 2)]
