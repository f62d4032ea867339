"""A link counts up only when the validator welcomes its Hello.

Before the Welcome frame a link set ``connected`` as soon as it had *sent* its Hello, so a
caller whose Hello the validator refuses (by hanging up) looked connected until the hang-up
arrived; with enough such links a refused principal's client started. Here a scripted peer
plays the validator: it challenges, reads the Hello and then either welcomes it or holds the
connection open without a word, so the old behaviour would show ``connected`` at once.
"""

from __future__ import annotations

import asyncio

from ledger.messages import Challenge, Welcome, encode_frame
from ledger.transport import Link, read_frame, write_frame

NONCE = b"\x07" * 32


async def _peer(welcome: bytes | None, hellos: list[bytes]):
    async def serve(reader, writer):
        write_frame(writer, encode_frame(Challenge(NONCE)))
        hellos.append(await read_frame(reader))
        if welcome is not None:
            write_frame(writer, welcome)
        await asyncio.sleep(5)
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _connected_within(welcome: bytes | None, seconds: float) -> tuple[bool, list[bytes]]:
    hellos: list[bytes] = []
    server = await _peer(welcome, hellos)
    port = server.sockets[0].getsockname()[1]
    link = Link("127.0.0.1", port, lambda nonce: b"hello over " + nonce)
    link.start()
    try:
        await asyncio.wait_for(link.connected.wait(), seconds)
        up = True
    except TimeoutError:
        up = False
    sent = link.send(b"x")
    await link.close()
    server.close()
    await server.wait_closed()
    return up and sent, hellos


def test_a_link_is_up_only_after_the_welcome_for_its_own_nonce():
    up, hellos = asyncio.run(_connected_within(encode_frame(Welcome(NONCE)), 5))
    assert up and hellos == [b"hello over " + NONCE]
    silent, hellos = asyncio.run(_connected_within(None, 1))  # Hello read, never accepted
    assert not silent and hellos  # the old link was up here, and sent frames nobody accepted
    stale, _ = asyncio.run(_connected_within(encode_frame(Welcome(b"\x08" * 32)), 1))
    assert not stale  # a Welcome for another connection's nonce does not count
