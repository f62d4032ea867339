"""The validator process: a thin asyncio shell around one :class:`ledger.pbft.Replica`.

It listens on its genesis address, keeps a :class:`ledger.transport.Link` to every other
validator, feeds the replica what arrives (validator frames, client request batches) and a
tick every ``TICK_S`` of wall-clock time, and for each burst of work takes the replica's
``Ready``: first persists it (SQLite, one transaction, one fsync), then sends its frames and
replies. Everything received in one event-loop turn is stepped before a single flush, so the
fsync is shared by all of it (group commit).

Connections start with a ``Challenge`` this validator sends (a fresh nonce) and the caller's
signed ``Hello`` over it: a validator by its genesis key, a client by its principal key as
the ledger state holds it; a Hello recorded on one connection is refused on any other. When
the genesis records a CA, every link is mutual TLS (:mod:`ledger.tls`) and the name in the
caller's certificate must be the one its Hello claims; an accepted Hello is answered with a
``Welcome``, a refused one by hanging up. A client connection carries request
batches and queries; replies and query answers go back on it.

Consensus traffic goes first: client requests wait in an admission queue and are admitted
(signature checked, queued for ordering) ``ADMIT_CHUNK`` at a time between event-loop turns,
so validator messages are never stuck behind a flood of requests; when the queue is full the
shell stops reading from clients (TCP back-pressure). Under overload clients see latency,
not view changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sqlite3
import time
from collections import deque
from pathlib import Path

from ledger.byzantine import ENV_FLAG, Byzantine
from ledger.errors import REVOKED, GenesisError, LedgerError, MessageInvalid, QueryFailed, StoreDamaged
from ledger.execution import AUDIT_DOMAIN
from ledger.genesis import Genesis
from medchain.identity import SigningKey
from ledger.messages import (
    Challenge,
    Hello,
    Query,
    QueryResult,
    RequestBatch,
    Welcome,
    decode_frame,
    encode_frame,
    sign_frame,
)
from ledger.pbft import Replica
from ledger.queries import answer_query
from ledger.quorum import Keyring, Signer
from ledger.ready import BROADCAST, Ready
from ledger.healing import mark_suspect, open_store
from ledger.tls import client_context, peer_name, server_context, validator_cn
from ledger.transport import MAX_BUFFERED, Link, read_frame, write_frame
from medchain.durable import durable_write
from medchain.pki import Identity

__all__ = ["Validator", "run_validator", "TICK_S", "HELLO_WAIT_S", "ADMIT_CHUNK",
           "MAX_ADMISSION", "HEAL_WAIT_S"]

log = logging.getLogger(__name__)
TICK_S = 0.01
HELLO_WAIT_S = 10.0      # a caller must answer the challenge within this
ADMIT_CHUNK = 128        # client requests admitted per event-loop turn
MAX_ADMISSION = 8192     # requests waiting for admission before clients are paused
HEAL_WAIT_S = 10.0       # how long a validator rebuilding its store waits for f + 1 peers


def now_ms() -> int:
    return int(time.time() * 1000)


class Validator:
    def __init__(self, genesis: Genesis, vid: int, key: SigningKey, data_dir: str | os.PathLike,
                 byzantine: str | None = None, tls: Identity | None = None):
        if not 0 <= vid < genesis.n:
            raise LedgerError(f"validator id {vid} is not in the genesis (0..{genesis.n - 1})")
        if key.public.hex() != genesis.validators[vid].public_key:
            raise LedgerError(f"key does not match validator {vid} in the genesis")
        if genesis.tls and tls is None:
            raise LedgerError(f"validator {vid}: this chain runs mutual TLS; no TLS key given")
        self.genesis, self.id, self.key = genesis, vid, key
        # what this validator listens with, and connects to its peers with (None: plaintext)
        self.tls_server = server_context(genesis.tls_ca, tls) if genesis.tls else None
        self.tls_client = client_context(genesis.tls_ca, tls) if genesis.tls else None
        self.signer = Signer(vid, key)
        self.keyring = Keyring(genesis.validator_keys())
        self.store_path = Path(data_dir) / f"validator-{vid}.sqlite"
        opened = open_store(self.store_path, genesis, vid,
                            attest=lambda b: key.sign_encoded(AUDIT_DOMAIN, b))
        self.store, ledger, restored = opened.store, opened.ledger, opened.restored
        self.healing = opened.set_aside is not None  # rebuilt from peers: needs f + 1 of them
        self._stop: asyncio.Event | None = None
        self.replica = Replica(self.signer, self.keyring, ledger, genesis.params, self.store,
                               restored, now_ms())
        self.byz = None
        if byzantine:
            if os.environ.get(ENV_FLAG) != "1":
                raise LedgerError(f"byzantine mode needs {ENV_FLAG}=1 (test clusters only)")
            self.byz = Byzantine(byzantine, self.signer, genesis.n, seed=vid)
        self.links: dict[int, Link] = {}
        self.clients: dict[str, set[asyncio.StreamWriter]] = {}
        self._ready = Ready()
        self._flush_scheduled = False
        self._admission: deque[bytes] = deque()
        self._admit_scheduled = False
        self._room = asyncio.Event()
        self._room.set()
        self._server: asyncio.base_events.Server | None = None
        log.info("validator %d: height %d, view %d, chain %s", vid, ledger.height,
                 restored.view, genesis.chain_id)

    # -- plumbing ------------------------------------------------------------------------------

    def _hello(self, nonce: bytes) -> bytes:
        return sign_frame(Hello("validator", str(self.id), self.genesis.chain_id, nonce),
                          self.key)[1]

    def _absorb(self, ready: Ready) -> None:
        self._ready.merge(ready)
        if not self._flush_scheduled and self._ready:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _store_failed(self, exc: Exception) -> None:
        """The store failed under us: stop (fail-stop, nothing more is sent); a damaged file
        is marked so that the next start sets it aside and rebuilds from peers."""
        if isinstance(exc, StoreDamaged) or (isinstance(exc, sqlite3.DatabaseError)
                                             and not isinstance(exc, sqlite3.OperationalError)):
            mark_suspect(self.store_path, f"{type(exc).__name__}: {exc}")
        log.error("validator %d: block store failed (%s: %s); stopping", self.id,
                  type(exc).__name__, exc)
        self._ready = Ready()
        if self._stop is not None:
            self._stop.set()

    def _flush(self) -> None:
        self._flush_scheduled = False
        ready, self._ready = self._ready, Ready()
        try:
            self.store.persist(ready)  # durable first ...
        except (sqlite3.DatabaseError, StoreDamaged) as exc:
            return self._store_failed(exc)
        per_peer: dict[int, list[bytes]] = {}
        for dest, frame in ready.messages:  # ... then tell anyone
            outgoing = self.byz.outgoing(dest, frame) if self.byz else [(dest, frame)]
            for d, f in outgoing:
                for peer in (self.links if d == BROADCAST else (d,)):
                    per_peer.setdefault(peer, []).append(f)
        for peer, frames in per_peer.items():
            self.links[peer].send_many(frames)
        for client, frame in ready.replies:
            for writer in self.clients.get(client, ()):
                # a client that stops reading loses replies (it will retry), not our memory
                if not writer.is_closing() and \
                        writer.transport.get_write_buffer_size() < MAX_BUFFERED:
                    write_frame(writer, frame)

    async def _ticker(self) -> None:
        while True:
            self._absorb(self.replica.tick(now_ms()))
            await asyncio.sleep(TICK_S)

    # -- connections ---------------------------------------------------------------------------

    def _check_hello(self, frame: bytes, nonce: bytes, certified: str | None) -> Hello:
        """The caller's Hello if it answers this connection's ``nonce``, is signed by the
        identity it claims and (under TLS) that identity is the one its certificate names."""
        msg, body = decode_frame(frame)
        if not isinstance(msg, Hello) or msg.chain != self.genesis.chain_id:
            raise MessageInvalid("hello: wrong kind or chain")
        if msg.nonce != nonce:
            raise MessageInvalid("hello: does not answer this connection's challenge")
        if msg.role == "validator":
            vid = int(msg.name) if msg.name.isdigit() else -1
            if not self.keyring.valid(vid, "hello", body, msg.sig):
                raise MessageInvalid("hello: not a validator of this chain")
            claimed = validator_cn(vid)
        else:
            if not self.replica.ledger.verify_principal(msg.name, "hello", body, msg.sig):
                if self.replica.ledger.revoked_principal(msg.name, "hello", body, msg.sig) and (
                        self.tls_server is None or certified == msg.name):
                    raise _Revoked(msg.name)
                raise MessageInvalid("hello: unknown principal or bad signature")
            claimed = msg.name
        if self.tls_server is not None and certified != claimed:
            raise MessageInvalid("hello: the certificate names someone else")
        return msg

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = None
        try:
            nonce = secrets.token_bytes(32)
            write_frame(writer, encode_frame(Challenge(nonce)))
            first = await asyncio.wait_for(read_frame(reader), HELLO_WAIT_S)
            try:
                hello = self._check_hello(first, nonce, peer_name(writer))
            except _Revoked as exc:  # tell the key's holder why, signed, then hang up
                self._refuse(writer, exc.name, 0)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.drain(), 2)
                raise
            write_frame(writer, encode_frame(Welcome(nonce)))
            if hello.role == "client":
                peer = hello.name
                self.clients.setdefault(peer, set()).add(writer)
            while True:
                frame = await read_frame(reader)
                if hello.role == "validator":
                    self._on_validator_frame(frame)
                else:
                    self._on_client_frame(frame, hello.name, writer)
                    await self._room.wait()  # back-pressure while admission is full
        except (MessageInvalid, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            if not isinstance(exc, (asyncio.IncompleteReadError, ConnectionResetError)):
                log.info("validator %d: closing a connection: %s", self.id, exc)
        except asyncio.CancelledError:  # shutting down: end quietly (asyncio would log it)
            pass
        finally:
            if peer is not None:
                self.clients.get(peer, set()).discard(writer)
            writer.close()

    def _on_validator_frame(self, frame: bytes) -> None:
        try:
            msg, body = decode_frame(frame)
        except MessageInvalid:
            self.replica.dropped["malformed"] += 1
            return
        try:  # state transfer reads blocks from the store
            self._absorb(self.replica.step(msg, body))
        except (sqlite3.DatabaseError, StoreDamaged) as exc:
            self._store_failed(exc)

    def _on_client_frame(self, frame: bytes, name: str, writer: asyncio.StreamWriter) -> None:
        try:
            msg, body = decode_frame(frame)
        except MessageInvalid:
            self.replica.dropped["malformed"] += 1
            return
        if isinstance(msg, RequestBatch):
            principal = self.replica.ledger.contracts.principal(name)
            if principal is not None and not principal["active"]:
                # revoked since its Hello: admission would drop these silently; say why
                self.replica.dropped["unknown_principal"] += len(msg.requests)
                return self._refuse(writer, name, 0)
            self._admission.extend(msg.requests)
            if len(self._admission) >= MAX_ADMISSION:
                self._room.clear()
            if not self._admit_scheduled:
                self._admit_scheduled = True
                asyncio.get_running_loop().call_soon(self._admit)
        elif isinstance(msg, Query):
            self._answer(msg, body, name, writer)
        else:
            self.replica.dropped["unexpected_kind"] += 1

    def _admit(self) -> None:
        """Admit one chunk of queued client requests, then yield to the event loop."""
        chunk = [self._admission.popleft()
                 for _ in range(min(ADMIT_CHUNK, len(self._admission)))]
        self._absorb(self.replica.requests(chunk))
        if len(self._admission) < MAX_ADMISSION // 2:
            self._room.set()
        if self._admission:
            asyncio.get_running_loop().call_soon(self._admit)
        else:
            self._admit_scheduled = False

    def _refuse(self, writer: asyncio.StreamWriter, client: str, qid: int) -> None:
        """A signed refusal for a revoked principal (query id 0: its connection)."""
        signed, rbody = self.signer.sign(QueryResult(self.id, client, qid, False, REVOKED, {}))
        write_frame(writer, encode_frame(signed, rbody))

    def _answer(self, q: Query, body: bytes, name: str, writer: asyncio.StreamWriter) -> None:
        if q.client != name or not self.replica.ledger.verify_principal(
                q.client, "query", body, q.sig):
            if q.client == name and self.replica.ledger.revoked_principal(
                    q.client, "query", body, q.sig):  # revoked while connected
                return self._refuse(writer, q.client, q.qid)
            self.replica.dropped["bad_signature"] += 1
            return
        try:
            answer, attestation = answer_query(q.what, q.args, self.replica, self.store,
                                              q.client)
            result = QueryResult(self.id, q.client, q.qid, True, answer, attestation)
        except QueryFailed as exc:
            result = QueryResult(self.id, q.client, q.qid, False, str(exc), {})
        except (sqlite3.DatabaseError, StoreDamaged) as exc:
            return self._store_failed(exc)
        signed, rbody = self.signer.sign(result)
        write_frame(writer, encode_frame(signed, rbody))

    # -- lifecycle -----------------------------------------------------------------------------

    async def _wait_for_peers(self) -> None:
        """A validator rebuilding its store needs f + 1 peers (one of them honest) to learn
        the chain from; with fewer it refuses to start rather than run as a blank member."""
        need = self.keyring.f + 1
        deadline = time.monotonic() + HEAL_WAIT_S
        while len(self.replica.peer_status) < need and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        got = len(self.replica.peer_status)
        if got < need:
            raise LedgerError(f"validator {self.id}: its damaged block store was set aside and "
                              f"only {got} of {self.genesis.n - 1} peers answered within "
                              f"{HEAL_WAIT_S:.0f} s (need {need}) to rebuild it; not starting")
        log.info("validator %d: %d peers answered; rebuilding its chain from them", self.id,
                 got)

    async def run(self, stop: asyncio.Event) -> None:
        me = self.genesis.validators[self.id]
        self.genesis.check_links()  # no plaintext link off loopback
        self._server = await asyncio.start_server(self._serve, me.host, me.port,
                                                  ssl=self.tls_server)
        for v in self.genesis.validators:
            if v.id != self.id:
                link = Link(v.host, v.port, self._hello, name=validator_cn(v.id),
                            tls=self.tls_client, peer_cn=validator_cn(v.id))
                self.links[v.id] = link
                link.start()
        ticker = asyncio.get_running_loop().create_task(self._ticker())
        self._stop = stop
        log.info("validator %d listening on %s:%d", self.id, me.host, me.port)
        try:
            if self.healing:
                await self._wait_for_peers()
            print(f"validator {self.id} ready on {me.host}:{me.port}", flush=True)
            await stop.wait()
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self._server.close()
            for link in self.links.values():
                await link.close()
            for writers in self.clients.values():
                for w in writers:
                    w.close()
            if self._ready:
                self._flush()
            self.store.close()


def run_validator(genesis_path, vid: int, key_path, data_dir, byzantine: str | None = None,
                  genesis_hash: str | None = None, tls_key=None) -> int:
    """Run one validator in the foreground until SIGINT/SIGTERM. ``genesis_hash`` (hex) is
    the hash its operator agreed to: a genesis file that hashes otherwise is refused.
    ``tls_key`` is its TLS key (default: beside its key, ``<key stem>.tls.key``); its
    certificate is the one the genesis records."""
    genesis = Genesis.load(genesis_path)
    if genesis_hash is not None and genesis.hash.hex() != genesis_hash.strip().lower():
        raise GenesisError(f"{genesis_path}: genesis hash is {genesis.hash.hex()}, not the "
                           f"{genesis_hash} agreed; not starting")
    if not 0 <= vid < genesis.n:
        raise GenesisError(f"{genesis_path}: no validator {vid}; its validators are 0 to {genesis.n - 1}")
    tls = None
    if genesis.tls:
        key_path = Path(key_path)
        tls_key = Path(tls_key) if tls_key else key_path.with_name(f"{key_path.stem}.tls.key")
        if not tls_key.is_file():
            raise LedgerError(f"{tls_key}: no TLS key; this chain runs mutual TLS")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        cert = durable_write(Path(data_dir) / f"validator-{vid}.crt",
                             genesis.validators[vid].tls_cert.encode())
        tls = Identity(cert, tls_key)
    validator = Validator(genesis, vid, SigningKey.load(key_path), data_dir, byzantine, tls)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await validator.run(stop)

    asyncio.run(main())
    return 0


class _Revoked(MessageInvalid):
    """A client's Hello signed by the key of a principal no longer active."""

    def __init__(self, name: str):
        super().__init__(f"hello: principal {name!r} is revoked")
        self.name = name
