"""Shared helpers for the ledger tests: signed requests, a scripted in-memory network of
pure replicas, and a real 4-process cluster on loopback."""

from __future__ import annotations

import os
import random
import time
from collections import deque
from dataclasses import dataclass

import pytest

from ledger.genesis import Params
from ledger.messages import Reply, Request, RequestBatch, decode_frame, encode_frame, sign_frame
from ledger.pbft import Replica
from ledger.quorum import Keyring, Signer
from ledger.ready import BROADCAST
from ledger.simulation import sim_genesis
from ledger.store import BlockStore
from ledger.transactions import ConsentSet, ImageRegistered

TICK = 10


class Net:
    """Replicas wired by a FIFO in-memory network that a test script controls: ``block``
    decides which (src, dest, message) are lost; time moves only with :meth:`advance`."""

    def __init__(self, n: int = 4, params: Params | None = None, seed: int = 7):
        params = params or Params(checkpoint_interval=4, window=16, max_batch=8, pipeline=2,
                                  view_change_ms=300, max_view_change_ms=2400, status_ms=100,
                                  request_max_age_ms=600_000)
        self.genesis, self.vkeys, self.client_key = sim_genesis(random.Random(seed), n, params)
        self.keyring = Keyring(self.genesis.validator_keys())
        self.stores = [BlockStore(":memory:", durable=False) for _ in range(n)]
        self.replicas: list[Replica | None] = [None] * n
        self.now = 1_000
        for i in range(n):
            self.start(i)
        self.queue: deque = deque()
        self.block = lambda src, dest, msg: False
        self.replies: dict[int, dict[int, dict]] = {}
        self.rid = 0
        self.sent: list[tuple[int, int, object]] = []

    def start(self, i: int) -> None:
        ledger, restored = self.stores[i].restore(self.genesis, i)
        self.replicas[i] = Replica(Signer(i, self.vkeys[i]), self.keyring, ledger,
                                   self.genesis.params, self.stores[i], restored, self.now)

    def crash(self, i: int) -> None:
        self.replicas[i] = None

    def handle(self, i: int, ready) -> None:
        self.stores[i].persist(ready)
        for dest, frame in ready.messages:
            targets = [j for j in range(len(self.replicas)) if j != i] if dest == BROADCAST \
                else [dest]
            for j in targets:
                self.queue.append((i, j, frame))
        for _client, frame in ready.replies:
            reply, _ = decode_frame(frame)
            assert isinstance(reply, Reply)
            for rid, result in reply.results:
                self.replies.setdefault(rid, {})[reply.sender] = result

    def request(self, tx=None, rid: int | None = None, ts: int | None = None) -> tuple[int, bytes]:
        if rid is None:
            self.rid += 1
            rid = self.rid
        tx = tx or ConsentSet(f"patient-{rid}", "research", True, rid)
        _, frame = sign_frame(Request("registrar", rid, self.now if ts is None else ts,
                                      tx.to_wire()), self.client_key)
        return rid, frame

    def submit(self, frames, to=None) -> None:
        for i in (range(len(self.replicas)) if to is None else to):
            if self.replicas[i] is not None:
                self.handle(i, self.replicas[i].requests(list(frames)))

    def deliver(self, limit: int = 100_000) -> int:
        count = 0
        while self.queue and count < limit:
            src, dest, frame = self.queue.popleft()
            msg, body = decode_frame(frame)
            self.sent.append((src, dest, msg))
            replica = self.replicas[dest]
            if replica is None or self.block(src, dest, msg):
                continue
            if isinstance(msg, RequestBatch):
                self.handle(dest, replica.requests(msg.requests))
            else:
                self.handle(dest, replica.step(msg, body))
            count += 1
        return count

    def inject(self, dest: int, msg, body: bytes | None = None) -> None:
        """Hand ``dest`` a message directly (as if from the network)."""
        frame = encode_frame(msg, body)
        msg, body = decode_frame(frame)
        self.handle(dest, self.replicas[dest].step(msg, body))

    def advance(self, ms: int) -> None:
        for _ in range(ms // TICK):
            self.now += TICK
            for i, r in enumerate(self.replicas):
                if r is not None:
                    self.handle(i, r.tick(self.now))
            self.deliver()

    def answered(self, rid: int) -> dict | None:
        votes = self.replies.get(rid, {})
        for result in votes.values():
            if sum(r == result for r in votes.values()) > self.keyring.f:
                return result
        return None

    def heights(self) -> list[int]:
        return [r.executed if r is not None else -1 for r in self.replicas]

    def chains(self, ids=None) -> list:
        ids = range(len(self.stores)) if ids is None else ids
        return [self.stores[i].hashes(0, 10**9) for i in ids]

    def assert_converged(self, ids=None) -> None:
        chains = self.chains(ids)
        assert all(c == chains[0] for c in chains), "replicas hold different chains"


@pytest.fixture
def net():
    return Net()


@pytest.fixture
def make_net():
    return Net


# -- real clusters --------------------------------------------------------------------------


@dataclass
class Fixtures:
    """Things a cluster test needs besides the cluster: a device and image factory."""

    device_id: str = "dev-fault"

    def image(self, k: int, patient: str = "tok-a", consent=("diagnosis",)) -> ImageRegistered:
        return ImageRegistered(os.urandom(16), os.urandom(32), patient, f"st-{k}", f"se-{k}",
                               f"in-{k}", "CT", tuple(consent), "default", self.device_id, k)


@pytest.fixture
def images():
    return Fixtures()


def fast_params(**overrides) -> Params:
    """Consensus parameters that keep fault tests short on a shared 2-core machine."""
    base = dict(checkpoint_interval=8, window=32, max_batch=256, pipeline=4,
                view_change_ms=1000, max_view_change_ms=4000, status_ms=200)
    base.update(overrides)
    return Params(**base)


@pytest.fixture
def cluster_params():
    return fast_params


def wait_for(predicate, timeout_s: float = 30.0, every_s: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


@pytest.fixture
def waiter():
    return wait_for
