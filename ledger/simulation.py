"""A seeded, randomized simulation of pure replicas on an unreliable network.

Many :class:`ledger.pbft.Replica` objects run in one process under a discrete-event
scheduler driven by one ``random.Random(seed)``: messages are delayed (so reordered),
dropped and duplicated; replicas crash (losing everything in memory) and restart from their
own store (an in-memory SQLite :class:`ledger.store.BlockStore`, through the same restore
code as a real validator); clients submit signed transactions to every replica and retry.
After the faults stop (the network heals and every replica is back), the run continues
until every request has f + 1 matching replies and every replica holds the same chain.

Safety is checked on every block any replica persists: two replicas never hold different
headers at one height. Liveness is checked at the end. A failing seed reproduces exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections import defaultdict
from dataclasses import dataclass, field

from medchain.canonical import canonical_bytes
from ledger.byzantine import Byzantine
from ledger.genesis import Genesis, Params, PrincipalInfo, ValidatorInfo
from medchain.identity import SigningKey
from ledger.messages import Reply, Request, RequestBatch, decode_frame, encode_frame, sign_frame
from ledger.pbft import Replica
from ledger.quorum import Keyring, Signer
from ledger.ready import BROADCAST, Ready
from ledger.store import BlockStore
from ledger.transactions import ConsentSet

__all__ = ["Faults", "Simulation", "SimulationReport", "SafetyViolation", "sim_genesis", "profile",
           "run_seeds"]

TICK_MS = 10


class SafetyViolation(AssertionError):
    """Two replicas committed different blocks at one height."""


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0          # probability a message is lost
    duplicate: float = 0.0     # probability a message is delivered twice
    min_delay_ms: int = 1
    max_delay_ms: int = 30     # uniform delay: messages overtake each other
    crashes: int = 0           # crash-and-restart events during the faulty period
    crash_ms: tuple[int, int] = (200, 1500)  # how long a crashed replica stays down
    faulty_until_ms: int = 4000


@dataclass
class SimulationReport:
    seed: int
    height: int
    requests: int
    answered: int
    view: int
    crashes: int
    messages: int
    dropped: dict = field(default_factory=dict)


def sim_genesis(rng: random.Random, n: int = 4, params: Params | None = None):
    """A genesis with deterministic keys from ``rng`` (validators, then one client)."""
    vkeys = [SigningKey.from_seed(rng.randbytes(32)) for _ in range(n)]
    client = SigningKey.from_seed(rng.randbytes(32))
    genesis = Genesis(
        chain_id=f"sim-{rng.getrandbits(32):08x}", genesis_time_ms=0,
        validators=tuple(ValidatorInfo(i, k.public.hex(), "sim", i) for i, k in enumerate(vkeys)),
        principals=(PrincipalInfo("registrar", "registrar", client.public.hex()),),
        params=params or Params(checkpoint_interval=4, window=16, max_batch=8, pipeline=2,
                                view_change_ms=300, max_view_change_ms=2400, status_ms=100))
    return genesis, vkeys, client


class _Node:
    def __init__(self, sim: Simulation, i: int, key: SigningKey):
        self.sim, self.id, self.key = sim, i, key
        self.store = BlockStore(":memory:", durable=False)
        self.replica: Replica | None = None
        self.start(0)

    def start(self, now: int) -> None:
        ledger, restored = self.store.restore(self.sim.genesis, self.id)
        self.replica = Replica(Signer(self.id, self.key), self.sim.keyring, ledger,
                               self.sim.genesis.params, self.store, restored, now)

    @property
    def alive(self) -> bool:
        return self.replica is not None


class Simulation:
    def __init__(self, seed: int, *, n: int = 4, faults: Faults = Faults(), requests: int = 40,
                 params: Params | None = None, submit_every_ms: int = 15,
                 byzantine: dict[int, str] | None = None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.genesis, vkeys, self.client_key = sim_genesis(self.rng, n, params)
        self.keyring = Keyring(self.genesis.validator_keys())
        self.nodes = [_Node(self, i, k) for i, k in enumerate(vkeys)]
        # replicas that lie on purpose, exactly as a real validator does with --byzantine
        self.byzantine = {i: Byzantine(mode, Signer(i, vkeys[i]), n, seed) for i, mode in (byzantine or {}).items()}
        self.now = 0
        self._events: list = []
        self._order = 0
        self.committed: dict[int, bytes] = {}          # height -> header hash, across replicas
        self.replies: dict[int, dict[int, bytes]] = defaultdict(dict)  # rid -> replica -> digest
        self.frames: dict[int, bytes] = {}
        self.messages = 0
        self.crashes = 0
        self._submitted: set[int] = set()
        for k in range(requests):
            rid = k + 1
            tx = ConsentSet(f"patient-{self.rng.randrange(8)}", "research",
                            self.rng.random() < 0.5, k)
            _, frame = sign_frame(Request("registrar", rid, 0, tx.to_wire()), self.client_key)
            self.frames[rid] = frame
            self._at(k * submit_every_ms, "submit", rid)
        for i in range(n):
            self._at(self.rng.randrange(TICK_MS), "tick", i)
        for _ in range(faults.crashes):
            self._at(self.rng.randrange(max(1, faults.faulty_until_ms - faults.crash_ms[1])),
                     "crash", self.rng.randrange(n))

    # -- scheduling ----------------------------------------------------------------------------

    def _at(self, when: int, kind: str, *payload) -> None:
        self._order += 1
        heapq.heappush(self._events, (when, self._order, kind, payload))

    def _faulty(self) -> bool:
        return self.now < self.faults.faulty_until_ms

    def _deliver_later(self, dest: int, frame: bytes) -> None:
        copies = 1
        if self._faulty():
            if self.rng.random() < self.faults.drop:
                return
            if self.rng.random() < self.faults.duplicate:
                copies = 2
        for _ in range(copies):
            delay = self.rng.randint(self.faults.min_delay_ms, self.faults.max_delay_ms)
            self._at(self.now + delay, "deliver", dest, frame)

    def _handle(self, node: _Node, ready: Ready) -> None:
        node.store.persist(ready)  # persist, then send
        for cb in ready.blocks:
            h, digest = cb.block.header.height, cb.block.header.hash
            if self.committed.setdefault(h, digest) != digest:
                raise SafetyViolation(f"seed {self.seed}: replica {node.id} committed a "
                                      f"different block at height {h}")
        liar = self.byzantine.get(node.id)
        for dest, frame in ready.messages:
            for dest, frame in (liar.outgoing(dest, frame) if liar else [(dest, frame)]):  # noqa: PLW2901
                self.messages += 1
                targets = [i for i in range(len(self.nodes)) if i != node.id] \
                    if dest == BROADCAST else [dest]
                for t in targets:
                    self._deliver_later(t, frame)
        for _client, frame in ready.replies:
            reply, _ = decode_frame(frame)
            assert isinstance(reply, Reply)
            for rid, result in reply.results:
                digest = hashlib.sha256(canonical_bytes(result)).digest()
                self.replies[rid][reply.sender] = digest

    # -- running -------------------------------------------------------------------------------

    def _answered(self, rid: int) -> bool:
        votes = list(self.replies.get(rid, {}).values())
        return any(votes.count(d) > self.keyring.f for d in set(votes))

    def done(self) -> bool:
        if self._faulty() or not all(n.alive for n in self.nodes):
            return False
        if not all(self._answered(rid) for rid in self.frames):
            return False
        heights = {n.replica.executed for n in self.nodes}
        return len(heights) == 1

    def run(self, limit_ms: int = 60_000) -> SimulationReport:
        retry_due = 0
        while self._events and self.now <= limit_ms:
            when, _, kind, payload = heapq.heappop(self._events)
            self.now = max(self.now, when)
            if kind == "tick":
                node = self.nodes[payload[0]]
                if node.alive:
                    self._handle(node, node.replica.tick(self.now))
                self._at(self.now + TICK_MS, "tick", payload[0])
                if self.now >= retry_due:  # clients retry what is unanswered
                    retry_due = self.now + 500
                    for rid, frame in self.frames.items():
                        if rid in self._submitted and not self._answered(rid):
                            self._broadcast_request(frame)
                if payload[0] == 0 and self.done():
                    break
            elif kind == "submit":
                self._submitted.add(payload[0])
                self._broadcast_request(self.frames[payload[0]])
            elif kind == "deliver":
                dest, frame = payload
                node = self.nodes[dest]
                if node.alive:
                    self._deliver(node, frame)
            elif kind == "crash":
                node = self.nodes[payload[0]]
                if node.alive and sum(n.alive for n in self.nodes) == len(self.nodes):
                    node.replica = None
                    self.crashes += 1
                    self._at(self.now + self.rng.randint(*self.faults.crash_ms), "restart", node.id)
            elif kind == "restart":
                self.nodes[payload[0]].start(self.now)
        return self.report()

    def _broadcast_request(self, frame: bytes) -> None:
        batch = encode_frame(RequestBatch((frame,)))
        for i in range(len(self.nodes)):
            self._deliver_later(i, batch)

    def _deliver(self, node: _Node, data: bytes) -> None:
        msg, body = decode_frame(data)
        if isinstance(msg, RequestBatch):
            self._handle(node, node.replica.requests(msg.requests))
        else:
            self._handle(node, node.replica.step(msg, body))

    def report(self) -> SimulationReport:
        dropped: dict = defaultdict(int)
        for n in self.nodes:
            if n.alive:
                for k, v in n.replica.dropped.items():
                    dropped[k] += v
        alive = [n for n in self.nodes if n.alive]
        return SimulationReport(
            seed=self.seed, height=max(n.store.height() for n in self.nodes),
            requests=len(self.frames), answered=sum(self._answered(r) for r in self.frames),
            view=max((n.replica.view for n in alive), default=-1), crashes=self.crashes,
            messages=self.messages, dropped=dict(dropped))

    def check_converged(self) -> None:
        """Every replica holds the same headers (hence state roots) at every height."""
        chains = [n.store.hashes(0, 10**9) for n in self.nodes]
        if any(c != chains[0] for c in chains):
            raise SafetyViolation(f"seed {self.seed}: replicas hold different chains")
        for n in self.nodes:
            if n.alive and n.replica.counters["divergence"]:
                raise SafetyViolation(f"seed {self.seed}: replica {n.id} saw a divergent "
                                      "checkpoint or re-issued batch")


def profile(seed: int, long: bool = False) -> dict:
    """The fault profile and workload for one seed (harsher and longer with ``long``)."""
    rng = random.Random(seed * 7919 + 1)
    faults = Faults(
        drop=rng.choice([0.0, 0.05, 0.2] + ([0.3, 0.4] if long else [])),
        duplicate=rng.choice([0.0, 0.1, 0.3]),
        max_delay_ms=rng.choice([5, 50, 200]),
        crashes=rng.choice([0, 1, 3] + ([6, 10] if long else [])),
        faulty_until_ms=rng.choice([2000, 5000] + ([10_000, 20_000] if long else [])))
    return {"faults": faults, "requests": rng.choice([20, 60] + ([200, 400] if long else [])),
            "submit_every_ms": rng.choice([1, 10, 40])}


def run_seeds(start: int, count: int, *, long: bool = False, progress: bool = False,
              n: int = 4) -> list[tuple[int, str]]:
    """Run ``count`` seeds from ``start``; return ``(seed, what failed)`` for each failure."""
    import time

    failures = []
    began = time.monotonic()
    for seed in range(start, start + count):
        sim = Simulation(seed, n=n, **profile(seed, long))
        try:
            report = sim.run(limit_ms=240_000 if long else 90_000)
            sim.check_converged()
            if not sim.done():
                failures.append((seed, f"no liveness after healing: {report}"))
        except SafetyViolation as exc:
            failures.append((seed, f"safety: {exc}"))
        if progress:
            status = "FAIL" if failures and failures[-1][0] == seed else "ok"
            print(f"seed {seed}: {status} height={sim.report().height} view={sim.report().view} "
                  f"crashes={sim.crashes} sim_ms={sim.now}", flush=True)
    if progress:
        print(f"{count} seeds in {time.monotonic() - began:.1f} s, {len(failures)} failed")
        for seed, what in failures:
            print(f"  seed {seed}: {what}")
    return failures
