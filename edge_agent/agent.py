"""Wiring a profile into a running node: the one place that reads key files and signals.

``build_node`` turns a :class:`~edge_agent.config.Profile` and the site secret into an
:class:`~edge_agent.node.EdgeNode` (spool, processor, sink); ``serve`` runs it until SIGTERM
or SIGINT, then stops it cleanly (open associations finish, the object in hand finishes,
spooled work stays for the next start).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.config import Profile
from edge_agent.errors import ConfigError
from edge_agent.node import Backpressure, EdgeNode
from edge_agent.processor import Processor
from edge_agent.sink import Sink
from edge_agent.spool import Spool

if TYPE_CHECKING:
    from edge_agent.preparation import Preparer

__all__ = ["load_site_secret", "build_node", "serve"]

log = logging.getLogger("medchain.edge")


def load_site_secret(profile: Profile, override: str | Path | None = None) -> bytes:
    """The 32-byte pseudonymization secret from ``override`` or the profile's ``secret_path``."""
    from medchain.errors import KeyFileError
    from medchain.identity import load_secret

    path = Path(override) if override else profile.deid.secret_path
    if path is None:
        raise ConfigError(f"{profile.name}: no site secret: set [deid] secret_path or pass --secret "
                          "(create one with: medchain keys new secret PATH)")
    try:
        return load_secret(path)
    except KeyFileError as exc:
        raise ConfigError(f"site secret: {exc} (create one with: medchain keys new secret PATH)") from None


def build_node(profile: Profile, secret: bytes, sink: Sink, *, backpressure: Backpressure | None = None,
               port: int | None = None, host: str | None = None,
               preparer: Preparer | None = None) -> EdgeNode:
    from dataclasses import replace

    dicom = profile.dicom
    if port is not None or host is not None:
        dicom = replace(dicom, port=dicom.port if port is None else port, host=host or dicom.host)
    spool = Spool(profile.spool.dir, profile.spool.max_bytes)
    return EdgeNode(dicom, spool, Processor.from_config(profile.deid, secret), sink, backpressure=backpressure,
                    preparer=preparer)


def serve(node: EdgeNode, *, ready: Callable[[EdgeNode], None] | None = None,
          stop_event: threading.Event | None = None) -> dict:
    """Run until SIGTERM/SIGINT (or ``stop_event``), then stop cleanly; returns the stats."""
    stop = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        node.start()
        if ready is not None:
            ready(node)
        while not stop.wait(0.5):
            pass
        log.info("stop requested; finishing in-flight work")
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return node.stats.as_dict()
