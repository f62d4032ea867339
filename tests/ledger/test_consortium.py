"""Issue 18 item 4, "one person's keys": a consortium genesis from public parts only, the
genesis hash checked by each validator, mutual TLS on the links, and a client's Hello bound
to its connection. Each attack test says what it did against the code before the change."""

from __future__ import annotations

import asyncio
import time

import pytest

from ledger.cluster import LocalCluster
from ledger.genesis import Params
from ledger.messages import Reply, decode_frame
from ledger.transactions import ConsentSet
from ledger.transport import read_frame, write_frame

pytestmark = pytest.mark.slow

PARAMS = Params(checkpoint_interval=8, window=32, status_ms=200)


async def _listen(host: str, port: int, hello: bytes, seconds: float) -> list:
    """Open a new connection, send ``hello`` and collect every frame the validator sends."""
    reader, writer = await asyncio.open_connection(host, port)
    write_frame(writer, hello)
    frames = []
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            frames.append(decode_frame(await asyncio.wait_for(read_frame(reader), left))[0])
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
    return frames


def test_a_replayed_hello_receives_nothing(tmp_path):
    """An eavesdropper records the Hello a client sends and replays it on a connection of
    its own. Before the change the Hello was bound only to a time (five minutes of skew), so
    the replaying connection was registered as the client and received copies of every
    reply sent to it (this test saw the ``Reply`` for the client's request). Now the
    validator opens each connection with a fresh nonce that the Hello must sign: the replay
    is refused and the connection gets no reply."""
    with LocalCluster(4, tmp_path, params=PARAMS) as cluster:
        captured: list[bytes] = []
        v = cluster.genesis.validators[0]
        with cluster.client("operator") as op:
            client = op._async
            link = client.links[0]
            original = link._hello
            link._hello = lambda *a: captured.append(original(*a)) or captured[-1]

            async def attack():
                await link.close()  # reconnect so the recording sees a live connection's hello
                link.start()
                await asyncio.wait_for(link.connected.wait(), 10)
                spy = asyncio.ensure_future(_listen(v.host, v.port, captured[-1], 6.0))
                await asyncio.sleep(0.5)
                result = await client.submit(ConsentSet("tok-replay", "diagnosis", True, 1))
                return result, await spy
            result, frames = op._run(attack(), 60)
        assert result.committed and captured
        assert not [f for f in frames if isinstance(f, Reply)]
