"""Keyed pseudonyms: one patient, one token at one site; UIDs under 2.25; date shifts."""

from __future__ import annotations

import hashlib
import uuid

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.pseudonyms import (MAX_DATE_SHIFT_DAYS, Pseudonymizer, accession_pseudonym, date_shift_days,
                                   patient_token, pseudo_uid)

K1, K2 = bytes(range(32)), bytes(range(1, 33))
IDS = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20)


@given(IDS, IDS)
def test_patient_tokens_are_keyed_stable_and_separate(issuer, pid):
    token = patient_token(K1, issuer, pid)
    assert token == patient_token(K1, issuer, pid + "  ") == patient_token(K1, issuer, pid + "\x00")
    assert len(token) == 64 and int(token, 16) >= 0
    assert token != patient_token(K2, issuer, pid)  # another site, another token
    assert token != hashlib.sha256(pid.encode()).hexdigest()  # not a plain hash
    assert token != patient_token(K1, issuer + "x", pid)


def test_issuer_and_value_cannot_be_shifted_into_each_other():
    assert patient_token(K1, "a|b", "c") != patient_token(K1, "a", "b|c")
    assert patient_token(K1, "ab", "c") != patient_token(K1, "a", "bc")


@given(IDS)
def test_accession_pseudonym_fits_sh(acc):
    p = accession_pseudonym(K1, "site", acc)
    assert len(p) == 16 and p == accession_pseudonym(K1, "site", " " + acc + " ")


@given(st.lists(st.integers(0, 10**15), min_size=1, max_size=10).map(lambda p: "1.2." + ".".join(map(str, p))))
def test_uids_are_uuid_derived_and_stable(uid):
    new = pseudo_uid(K1, uid)
    assert new == pseudo_uid(K1, uid) != pseudo_uid(K2, uid)
    assert new.startswith("2.25.") and len(new) <= 64
    u = uuid.UUID(int=int(new[5:]))
    assert u.version == 8 and u.variant == uuid.RFC_4122


@given(st.text(min_size=1, max_size=70))
def test_date_shift_in_range(token):
    assert 1 <= date_shift_days(K1, token) <= MAX_DATE_SHIFT_DAYS


def test_pseudonymizer_defaults_issuer_and_hides_secret():
    pz = Pseudonymizer(K1, "site-a")
    assert pz.patient("123") == pz.patient("123", "") == pz.patient("123", "site-a") != pz.patient("123", "other")
    assert K1.hex() not in repr(pz) and "site-a" in repr(pz)
