"""Scanner -> edge -> broker -> cloud -> ledger, for real: every instance that got DICOM
Success is stored exactly once, decrypts with the custodian key to the de-identified DICOM
the edge produced, and has a ledger record whose Merkle root matches."""

import io
import json

import numpy as np
import pytest

from edge_agent.processor import Processor
from medchain.merkle import verify_inclusion
from medchain.sealing import open_envelope, open_meta
from scanner_sim.studies import part10_bytes

pytestmark = pytest.mark.slow


def expected_deid(site, sims) -> dict[str, bytes]:
    """What the edge must have produced: de-identification is deterministic per site."""
    processor = Processor.from_config(site.profile.deid, site.secret)
    out = {}
    for st in sims:
        for ds in st.datasets:
            inst = processor.process(part10_bytes(ds), "check")
            out[inst.sop_instance_uid] = inst.dicom
    return out


def test_studies_arrive_once_decrypt_to_the_edge_output_and_are_on_the_ledger(make_site):
    site = make_site()
    site.enroll()
    with site.coordinator:
        site.start_edge()
        sims, result = site.send("CT", studies=2, seed=11, per_study=3)
        assert result.success == 6, result.summary()
        assert site.settled(), site.agent.stats()
        store, catalog, ledger = site.coordinator.store, site.coordinator.catalog, site.coordinator.ledger

        ids = sorted(store.ids())
        assert len(ids) == 6 and catalog.count() == 6
        expected = expected_deid(site, sims)
        device = site.device_key.public
        for envelope_id in ids:
            env = store.get(envelope_id)
            parts = open_envelope(env, site.custodian, device)
            sop = open_meta(env.header, site.coordinator.meta_key)["sop_instance_uid"]
            assert parts["dicom"] == expected[sop]
            tensor = np.load(io.BytesIO(parts["tensor"]))
            assert tensor.shape == (1, 1, 128, 128)
            assert json.loads(parts["meta"])["modality"] == "CT"
            proof = ledger.image(env.header.object_id)
            assert proof.record["merkle_root"] == env.header.merkle_root
            assert proof.record["device_id"] == site.device_id
            verify_inclusion(proof.header.tx_root, proof.request, proof.proof)
        stats = site.coordinator.ingest.stats
        assert (stats.stored, stats.rejected, stats.malformed) == (6, 0, 0)
