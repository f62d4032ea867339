"""The study date in the listing is the de-identified one: the edge shifts every date by the
patient's date shift (Retain Longitudinal Temporal Information with Modified Dates), seals
the shifted study date in the envelope's metadata, ingest registers it with the image on
the ledger, and the studies listing (CLI and API) shows it — differing from the original by
exactly the patient's shift, never the original. An edge that removes dates sends none.
No services needed: the edge's processor and packager, ingest's registration, the pure
contract and the API's model."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from cloud.api import StudyOut
from cloud.registration import image_transaction
from edge_agent.config import BurnedInPolicy
from edge_agent.deid import DeidOptions
from edge_agent.outbox import Outbox
from edge_agent.packager import Packager
from edge_agent.processor import Processor
from edge_agent.pseudonyms import Pseudonymizer
from ledger.contracts import Contracts, TxContext, genesis_state
from ledger.genesis import make_local_genesis
from ledger.transactions import DeviceEnrolled, parse
from medchain.identity import RecipientKey, SigningKey
from medchain.protocol import Envelope, decode_message
from medchain.sealing import open_meta
from models.modality import config_for
from scanner_sim.studies import generate_studies, part10_bytes

SECRET = b"s" * 32
DEVICE, CUSTODIAN, META = SigningKey.generate(), RecipientKey.generate(), RecipientKey.generate()
T0 = 1_700_000_000_000


def sealed(tmp_path, shift_dates: bool):
    """(original study date, de-identified instance, the envelope, its opened metadata)."""
    study = generate_studies("CT", 1, seed=11, images_per_study=1)[0]
    ds = study.datasets[0]
    processor = Processor(Pseudonymizer(SECRET, "site-a"), DeidOptions(shift_dates, False),
                          BurnedInPolicy("blank", (), ("SC", "XA", "ES", "OT")))
    instance = processor.process(part10_bytes(ds), "spool-1")
    box = Outbox(tmp_path / "outbox.sqlite")
    Packager(box, device_id="edge-1", device_key=DEVICE, custodian=CUSTODIAN.public, meta_key=META.public,
             preprocess={"CT": config_for("CT", size=64)}).accept(instance)
    (entry,) = box.pending(10)
    env = decode_message(entry.data, expect=Envelope)
    return str(ds.StudyDate), instance, env, open_meta(env.header, META)  # what ingest reads


def listed(tmp_path, env, meta) -> dict:
    c = Contracts(genesis_state(make_local_genesis(tmp_path / "g", genesis_time_ms=T0)))
    c.apply(TxContext("operator", "operator", T0, 1, 0), DeviceEnrolled("edge-1", DEVICE.public.raw, "site", "ct"))
    tx = image_transaction(env, meta)
    assert parse(tx.to_wire()) == tx  # as the validators parse it
    c.apply(TxContext("ingest", "ingest", T0, 2, 0), tx)
    [study] = c.studies()
    return study


def test_the_listed_study_date_is_the_shifted_one(tmp_path):
    original, instance, env, meta = sealed(tmp_path, shift_dates=True)
    shift = Pseudonymizer(SECRET, "site-a").date_shift(instance.patient_token)
    expected = (dt.datetime.strptime(original, "%Y%m%d").date() - dt.timedelta(days=shift)).strftime("%Y%m%d")
    assert shift >= 1 and expected != original
    assert instance.study_date == expected and meta["study_date"] == expected
    study = listed(tmp_path, env, meta)
    assert study["study_date"] == expected
    assert original not in json.dumps(study)  # never the original
    assert StudyOut(**study, open_to_you=[]).study_date == expected  # the API's listing carries it


def test_an_edge_that_removes_dates_sends_none(tmp_path):
    original, instance, env, meta = sealed(tmp_path, shift_dates=False)
    assert instance.study_date is None and "study_date" not in meta
    assert original not in json.dumps(meta)
    study = listed(tmp_path, env, meta)
    assert study["study_date"] is None
    # and the registration keeps the wire form it had before dates were carried
    assert "study_date" not in image_transaction(env, meta).to_wire()


@pytest.mark.parametrize("value", ["2019-03-12", "201903", "1" * 9, 20190312, None])
def test_a_malformed_date_is_not_registered(tmp_path, value):
    _, _, env, meta = sealed(tmp_path, shift_dates=True)
    assert image_transaction(env, dict(meta, study_date=value)).study_date is None
