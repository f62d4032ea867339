"""TCP transport for validators and clients: length-prefixed frames over asyncio streams.

A frame on the wire is a 4-byte big-endian length and that many bytes (a
:mod:`ledger.messages` frame). The validator that accepts a connection sends a
``Challenge`` (a fresh nonce) first; the caller answers with a ``Hello`` that signs it and
counts the link up when the validator's ``Welcome`` says the Hello was accepted.
With an :class:`ssl.SSLContext` (:mod:`ledger.tls`) the same frames run inside mutual TLS.
:class:`Link` is an outgoing connection that reconnects by itself with back-off and, while
the peer is unreachable or too slow, drops frames rather than queueing without bound (PBFT
tolerates lost messages; status gossip and state transfer repair the gaps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from ledger.errors import MessageInvalid
from ledger.messages import MAX_FRAME, Challenge, Welcome, decode_frame
from ledger.tls import peer_name

__all__ = ["read_frame", "write_frame", "write_frames", "Link", "FrameTooLarge"]

log = logging.getLogger(__name__)
MAX_BUFFERED = 64 * 1024 * 1024  # bytes waiting on a slow peer before we start dropping


class FrameTooLarge(ConnectionError):
    """The peer announced a frame above the size limit; the connection is closed."""


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes:
    """The next frame; raises ``asyncio.IncompleteReadError`` at end of stream."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > limit:
        raise FrameTooLarge(f"frame of {size} bytes announced (limit {limit})")
    return await reader.readexactly(size)


def write_frame(writer: asyncio.StreamWriter, frame: bytes) -> None:
    writer.write(len(frame).to_bytes(4, "big") + frame)  # one write: one syscall, one segment


def write_frames(writer: asyncio.StreamWriter, frames: list[bytes]) -> None:
    """Several frames in one write (what one event-loop turn produced for one peer)."""
    writer.write(b"".join(part for f in frames for part in (len(f).to_bytes(4, "big"), f)))


class Link:
    """An outgoing connection to one address, kept open.

    ``hello(nonce)`` returns the frame that answers the peer's challenge on each new
    connection; ``on_frame`` (if given) receives frames the peer sends back on it. With
    ``tls`` the connection is TLS and the peer's certificate must name ``peer_cn``."""

    def __init__(self, host: str, port: int, hello: Callable[[bytes], bytes],
                 on_frame: Callable[[bytes], None] | None = None, name: str = "",
                 on_connect: Callable[[], None] | None = None,
                 tls: ssl.SSLContext | None = None, peer_cn: str = ""):
        self.host, self.port, self.name = host, port, name or f"{host}:{port}"
        self._tls, self._peer_cn = tls, peer_cn
        self._hello = hello
        self._on_frame = on_frame
        self._on_connect = on_connect
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._drop_writer()

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.connected.clear()

    def send(self, frame: bytes) -> bool:
        """Queue ``frame``; False (and counted) when the peer is down or far behind."""
        return self.send_many([frame])

    def send_many(self, frames: list[bytes]) -> bool:
        w = self._writer
        if w is None or w.is_closing() or w.transport.get_write_buffer_size() > MAX_BUFFERED:
            self.dropped += len(frames)
            return False
        write_frames(w, frames)
        return True

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bytes:
        """Check the peer's certificate (under TLS) and read its challenge: the nonce."""
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None and peer_name(writer) != self._peer_cn:
                raise ssl.CertificateError(f"certificate does not name {self._peer_cn}")
            msg, _ = decode_frame(await asyncio.wait_for(read_frame(reader), 10))
            if not isinstance(msg, Challenge):
                raise MessageInvalid("expected a challenge first")
            return msg.nonce
        except BaseException:
            writer.close()
            raise

    @staticmethod
    def _welcomes(frame: bytes, nonce: bytes) -> bool:
        """Whether ``frame`` is the peer's Welcome for this connection."""
        try:
            msg, _ = decode_frame(frame)
        except MessageInvalid:
            return False
        return isinstance(msg, Welcome) and msg.nonce == nonce

    async def _run(self) -> None:
        delay = 0.05
        while True:
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self._tls,
                    server_hostname=self.host if self._tls else None)
                nonce = await self._handshake(reader, writer)
            except (OSError, asyncio.IncompleteReadError, MessageInvalid) as exc:
                if isinstance(exc, (ssl.SSLError, MessageInvalid)):
                    log.warning("%s: refused: %s", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            opened = asyncio.get_running_loop().time()
            write_frame(writer, self._hello(nonce))
            try:
                while True:
                    frame = await read_frame(reader)
                    if self._writer is None and self._welcomes(frame, nonce):
                        self._writer = writer
                        self.connected.set()
                        if self._on_connect:
                            self._on_connect()
                    elif self._on_frame:  # a refusal may come before (instead of) the Welcome
                        self._on_frame(frame)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                pass
            finally:
                if self._writer is None:
                    writer.close()
                self._drop_writer()
            # a peer that hangs up at once (refusing our hello) is retried ever more slowly
            lived = asyncio.get_running_loop().time() - opened
            delay = 0.05 if lived > 5 else min(delay * 2, 1.0)
            await asyncio.sleep(delay)
