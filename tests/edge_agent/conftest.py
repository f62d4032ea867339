"""Fixtures for the edge agent: a site secret, a profile rooted in a temporary folder, a
running node on a free port, and dcmtk (the DICOM tools a hospital already has)."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.config import load_profile, profile_path
from edge_agent.node import EdgeNode
from edge_agent.processor import Processor
from edge_agent.pseudonyms import Pseudonymizer
from edge_agent.sink import FolderSink
from edge_agent.spool import Spool

SECRET = bytes(range(32))


@pytest.fixture
def secret() -> bytes:
    return SECRET


@pytest.fixture
def pz() -> Pseudonymizer:
    return Pseudonymizer(SECRET, "site-a")


@pytest.fixture
def profile(tmp_path):
    """The x86-cpu profile with its paths under tmp_path, any calling AE title, port 0."""
    p = load_profile(profile_path("x86-cpu"), base_dir=tmp_path)
    return replace(p, dicom=replace(p.dicom, port=0, host="127.0.0.1",
                                    allowed_calling_aets=("SCANNER_CT", "STORESCU", "ECHOSCU", "SCANNER")))


@pytest.fixture
def make_node(profile, tmp_path):
    """Build (not start) nodes over the profile; every started node is stopped afterwards."""
    nodes = []

    def make(*, sink=None, backpressure=None, spool_bytes=None, burned_in=None, **kw) -> EdgeNode:
        deid = profile.deid if burned_in is None else replace(profile.deid, burned_in=burned_in)
        node = EdgeNode(profile.dicom, Spool(profile.spool.dir, spool_bytes or profile.spool.max_bytes),
                        Processor.from_config(deid, SECRET), sink or FolderSink(tmp_path / "out"),
                        backpressure=backpressure, **kw)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop(grace=5)


def _dcmtk_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = (f"dcmtk's {name} is not installed (apt-get install -y --no-install-recommends dcmtk; "
                   ".ci/run installs it)")
        if os.environ.get("MEDCHAIN_REQUIRE_SERVICES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def storescu() -> str:
    return _dcmtk_tool("storescu")


@pytest.fixture(scope="session")
def echoscu() -> str:
    return _dcmtk_tool("echoscu")


@pytest.fixture(scope="session")
def corpus() -> list[Path]:
    """Every file among pydicom's bundled test files (test_files and charset_files) and the
    pydicom-data package, read from disk only (pydicom's downloader is never called)."""
    import pydicom

    roots = [Path(pydicom.__file__).parent / "data" / "test_files",
             Path(pydicom.__file__).parent / "data" / "charset_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        if os.environ.get("MEDCHAIN_REQUIRE_SERVICES") == "1":
            pytest.fail("pydicom-data is not installed (pip install -e '.[test]')", pytrace=False)
    skip_suffixes = {".py", ".pyc", ".txt", ".md", ".json", ".dump", ".icc", ".gz"}
    return [p for root in roots if root.is_dir() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() not in skip_suffixes and "__pycache__" not in p.parts]
