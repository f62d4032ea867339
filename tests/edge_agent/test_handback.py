"""Shared-memory result slots: what a worker writes is what the node reads, objects that do
not fit say so, and files left by dead node processes are removed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.handback import PREFIX, Handback, write_slot


@pytest.fixture
def handback(tmp_path):
    h = Handback(3, 1024, tmp_path)
    yield h
    h.close()


@given(st.lists(st.binary(max_size=1024), min_size=3, max_size=3))
def test_each_slot_gives_back_exactly_what_was_written_into_it(tmp_path_factory, data):
    h = Handback(3, 1024, tmp_path_factory.mktemp("shm"))
    try:
        for slot, blob in zip(h.slots, data):
            assert write_slot(slot, blob)
        assert [h.take(slot, len(blob)) for slot, blob in zip(h.slots, data)] == data
    finally:
        h.close()


def test_an_object_larger_than_its_slot_is_left_to_the_pipe(handback):
    assert not write_slot(handback.slots[0], b"x" * 1025)
    with pytest.raises(ValueError, match="outside its slot"):
        handback.take(handback.slots[0], 1025)


def test_the_file_is_allocated_in_full_and_removed_on_close(tmp_path):
    h = Handback(2, 1 << 20, tmp_path)
    assert h.path.stat().st_blocks * 512 >= 2 << 20  # no holes for a write to fault on
    h.close()
    assert not h.path.exists()


def test_files_of_node_processes_that_are_gone_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f"{PREFIX}{dead}-00000000"
    live = tmp_path / f"{PREFIX}{os.getpid()}-00000000"
    other = tmp_path / "medchain-handback-notapid"
    for p in (orphan, live, other):
        p.write_bytes(b"")
    Handback(1, 4096, tmp_path).close()
    assert not orphan.exists() and live.exists() and other.exists()
