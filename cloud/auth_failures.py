"""Failed authentications: API calls and custodian fetches whose signature does not verify
(or that name no active principal, or are unsigned, stale or replayed).

Each is counted by where and why (a ``prometheus_client`` counter in the log's own
registry, :meth:`FailureLog.metrics`, served at ``/metrics`` by the API and, with
``metrics`` set, by the custodian) and, with a path, appended as one JSON line to a local
log (``O_APPEND``, mode 0600, fsynced): time, where, why, the method and path, and the
principal the request *claimed* — a claim, never an identity, kept printable and short.

Why these are not ledger audit entries: an audit entry says "principal U did X", signed by
the validators that executed it, and the ledger admits a transaction only under a key it
knows. A request whose signature does not verify proves nothing about who sent it — anyone
can put any name in ``X-MedChain-Principal`` — so an entry attributed to the claimed
principal would be false attribution, and an entry "unverified, claimed U" filed by the
API's own key would let anyone on the network make the API write to the ledger at will
(trail pollution and an unauthenticated write amplifier: every forged call a block
transaction, kept forever) without telling an auditor anything the local log does not.
Every attempt of an *authenticated* principal is audited on the ledger as before.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest

__all__ = ["FailureLog"]

METRIC = "medchain_auth_failures_total"


def _claim(value: str | None) -> str | None:
    if value is None:
        return None
    text = "".join(c if c.isprintable() else "?" for c in str(value)[:128])
    return text


class FailureLog:
    """Counts failed authentications; with ``path``, appends each to that file."""

    def __init__(self, path: str | Path | None = None, *, clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None):
        self.path = None if path is None else Path(path)
        # a registry of its own unless the process serves more metrics beside these
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._counter = Counter(METRIC.removesuffix("_total"), "Requests refused before any principal "
                                "was established (signature not verified, unknown or revoked, "
                                "unsigned, stale, replayed).", ("where", "reason"), registry=self.registry)
        self._clock, self._lock = clock, threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, where: str, reason: str, claimed: str | None, **detail: str) -> None:
        line = json.dumps({"t": int(self._clock() * 1000), "where": where, "reason": reason,
                           "claimed": _claim(claimed), **{k: _claim(v) for k, v in detail.items()}},
                          sort_keys=True) + "\n"
        with self._lock:
            self._counter.labels(where=where, reason=reason).inc()
            if self.path is None:
                return
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def metrics(self) -> str:
        """The counts in the Prometheus text exposition format."""
        return generate_latest(self.registry).decode()
