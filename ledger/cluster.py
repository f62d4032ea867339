"""A local cluster of validator OS processes on loopback, for tests, the demo and development.

::

    with LocalCluster(n=4, workdir=tmp) as cluster:
        with cluster.client("ingest") as ledger:
            ledger.submit(...)
        cluster.kill(0)          # SIGKILL the primary
        cluster.restart(0)       # same data directory: it recovers from its own SQLite
        cluster.wait_converged()

It writes the all-in-one local genesis with fresh keys (mode 0600) and free ports under
``workdir`` (with ``tls``, a CA there too and every link mutual TLS), or uses the genesis
already there with keys from ``keys`` (a consortium's, generated apart), spawns each
validator as ``python -m ledger ledger validator ...`` with the genesis hash to check (logs
in ``workdir/logs``), waits until every validator answers, and stops them all on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ledger.client import LedgerClient
from ledger.errors import LedgerError, LedgerUnavailable
from ledger.genesis import Genesis, Params, make_local_genesis

__all__ = ["LocalCluster"]


class LocalCluster:
    def __init__(self, n: int = 4, workdir: str | os.PathLike | None = None, *,
                 params: Params | None = None, byzantine: dict[int, str] | None = None,
                 log_level: str = "WARNING", ready_timeout_s: float = 60.0,
                 tls: bool = False, keys: dict[str, str | os.PathLike] | None = None):
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="medchain-ledger-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.n, self.params, self.byzantine = n, params, dict(byzantine or {})
        self.log_level, self.ready_timeout_s = log_level, ready_timeout_s
        self.tls, self.keys = tls, {k: Path(v) for k, v in (keys or {}).items()}
        self.procs: dict[int, subprocess.Popen] = {}
        self.genesis: Genesis | None = None
        self._admin: LedgerClient | None = None

    @property
    def genesis_path(self) -> Path:
        return self.workdir / "genesis.json"

    def key_path(self, name: str) -> Path:
        return self.keys.get(name, self.workdir / "keys" / f"{name}.key")

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.genesis_path.exists():
            self.genesis = Genesis.load(self.genesis_path)
        else:
            self.genesis = make_local_genesis(self.workdir, self.n, params=self.params,
                                              genesis_time_ms=int(time.time() * 1000),
                                              tls=self.tls)
        (self.workdir / "logs").mkdir(exist_ok=True)
        for i in range(self.genesis.n):
            self.spawn(i)
        self.wait_ready()

    def spawn(self, i: int) -> None:
        if i in self.procs and self.procs[i].poll() is None:
            raise LedgerError(f"validator {i} is already running")
        cmd = [sys.executable, "-m", "ledger", "--log-level", self.log_level, "ledger",
               "validator", "--genesis", str(self.genesis_path), "--id", str(i),
               "--key", str(self.key_path(f"validator-{i}")), "--data", str(self.workdir / "data"),
               "--genesis-hash", self.genesis.hash.hex()]
        env = dict(os.environ)
        if i in self.byzantine:
            cmd += ["--byzantine", self.byzantine[i]]
            env["MEDCHAIN_ALLOW_BYZANTINE"] = "1"
        log = open(self.workdir / "logs" / f"validator-{i}.log", "ab")  # noqa: SIM115
        try:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        finally:
            log.close()

    def kill(self, i: int) -> None:
        """SIGKILL validator ``i`` (a crash: nothing is flushed or closed cleanly)."""
        proc = self.procs.get(i)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self, i: int) -> None:
        proc = self.procs.get(i)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def restart(self, i: int, wait: bool = True) -> None:
        self.kill(i)
        self.spawn(i)
        if wait:
            self.wait_ready([i])

    def alive(self, i: int) -> bool:
        return i in self.procs and self.procs[i].poll() is None

    def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        for i in list(self.procs):
            self.stop(i)
        self.procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- clients and checks --------------------------------------------------------------------

    def client(self, name: str = "operator", **options) -> LedgerClient:
        """A started blocking client for principal ``name`` (close it, or use ``with``)."""
        c = LedgerClient(self.genesis, self.key_path(name), name, **options)
        c.start()
        return c

    @property
    def admin(self) -> LedgerClient:
        if self._admin is None:
            self._admin = self.client("operator", retry_s=0.5)
        return self._admin

    def status(self, i: int, timeout_s: float = 5.0) -> dict:
        return self.admin.status(i, timeout_s=timeout_s)

    def wait_ready(self, ids=None, timeout_s: float | None = None) -> None:
        """Wait until every validator in ``ids`` answers a status query."""
        ids = list(range(self.genesis.n)) if ids is None else list(ids)
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        for i in ids:
            while True:
                if not self.alive(i):
                    raise LedgerError(f"validator {i} exited; see {self.workdir}/logs")
                try:
                    self.status(i, timeout_s=1.0)
                    break
                except (LedgerUnavailable, OSError):
                    if time.monotonic() > deadline:
                        raise LedgerUnavailable(f"validator {i} not ready in time") from None

    def heads(self, ids=None) -> dict[int, list]:
        ids = list(range(self.genesis.n)) if ids is None else list(ids)
        return {i: self.admin.headers(i) for i in ids}

    def wait_converged(self, ids=None, timeout_s: float = 60.0, min_height: int = 0) -> list:
        """Wait until validators ``ids`` hold identical chains (every header, hence every
        state root) of at least ``min_height``; return that chain's
        ``[height, hash, state root]`` rows. Raises if they do not converge in time."""
        ids = [i for i in (range(self.genesis.n) if ids is None else ids)]
        deadline = time.monotonic() + timeout_s
        last = None
        while True:
            try:
                chains = self.heads(ids)
                last = chains
                first = chains[ids[0]]
                if len(first) - 1 >= min_height and all(chains[i] == first for i in ids):
                    return first
            except LedgerUnavailable:
                pass
            if time.monotonic() > deadline:
                summary = {i: (len(c) - 1, c[-1][1].hex()[:12]) for i, c in (last or {}).items()}
                raise LedgerError(f"validators {ids} did not converge: {summary}")
            time.sleep(0.2)
