"""The simulated scanner's sender against a real pynetdicom SCP: retries on a new association
when one is lost, and keeps a C-STORE response its own reactor thread took."""

from __future__ import annotations

import threading

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from scanner_sim import sender as sender_module
from scanner_sim.sender import _keep_stolen_responses, items_from_datasets, send
from scanner_sim.studies import generate_studies


@pytest.fixture
def items():
    studies = generate_studies("CR", 3, seed=5, images_per_study=2)
    return items_from_datasets([ds for st in studies for ds in st.datasets])


def _server(on_store):
    ae = AE(ae_title="PEER")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _aborting_once(stored: list[str]):
    """Stores everything, but aborts the association (no response) on the third object, once."""
    lock, aborted = threading.Lock(), []

    def on_store(event):
        uid = str(event.request.AffectedSOPInstanceUID)
        with lock:
            if len(stored) == 2 and not aborted:
                aborted.append(uid)
                event.assoc.abort()
                return 0x0000
            stored.append(uid)
        return 0x0000

    return on_store


def test_a_lost_association_is_opened_again_and_the_unanswered_objects_resent(items, monkeypatch):
    monkeypatch.setattr(sender_module, "RETRY_DELAY", 0.0)
    stored: list[str] = []
    server = _server(_aborting_once(stored))
    try:
        result = send("127.0.0.1", server.server_address[1], items, calling_ae="SIM", called_ae="PEER",
                      concurrency=1, progress=False, retries=1)
    finally:
        server.shutdown()
    assert result.success == result.attempted == len(items) and result.retried == 1
    assert sorted(stored) == sorted(it.name for it in items)  # the aborted one arrived on the retry
    assert "opened again" in result.summary()


def test_without_retries_a_lost_association_ends_the_share(items):
    stored: list[str] = []
    server = _server(_aborting_once(stored))
    try:
        result = send("127.0.0.1", server.server_address[1], items, calling_ae="SIM", called_ae="PEER",
                      concurrency=1, progress=False)
    finally:
        server.shutdown()
    assert result.success == 2 and result.retried == 0
    # the unanswered object and the ones never sent are counted, not dropped silently
    assert result.attempted == len(items) and result.errors["no response (association lost)"] == len(items) - 2


def test_a_response_taken_by_the_reactor_goes_back_to_the_waiting_sender():
    server = _server(lambda event: 0x0000)
    ae = AE(ae_title="SIM")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="PEER")
    try:
        assert assoc.is_established
        _keep_stolen_responses(assoc)
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 1
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        rsp.AffectedSOPInstanceUID = "1.2.3"
        rsp.Status = 0x0000
        assoc._serve_request(rsp, 1)  # what pynetdicom's reactor does with a message it took
        context_id, msg = assoc.dimse.get_msg(block=False)
        assert context_id == 1 and msg is rsp
    finally:
        assoc.release()
        server.shutdown()
