"""Issue 18 item 4, "one person's keys": a consortium genesis from public parts only, the
genesis hash checked by each validator, mutual TLS on the links, and a client's Hello bound
to its connection. Each attack test says what it did against the code before the change."""

from __future__ import annotations

import asyncio
import json

import pytest

from ledger.cluster import LocalCluster
from ledger.genesis import Params
from ledger.messages import Reply, decode_frame
from ledger.transactions import ConsentSet
from ledger.transport import read_frame, write_frame
from medchain_app.cli import main

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


@pytest.mark.slow
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


def _consortium(tmp_path, ca=True, host="127.0.0.1"):
    """Four validators' and one operator's keys generated apart (each in its own folder, as
    on its own machine), a consortium CA, and a genesis assembled from their descriptors."""
    from ledger.genesis import free_ports
    from medchain.pki import CertificateAuthority

    ports = free_ports(4)
    parties = {f"v{i}": tmp_path / f"site-{i}" for i in range(4)}
    parties["operator"] = tmp_path / "operator-laptop"
    for i in range(4):
        assert main(["ledger", "keygen", "--out", str(parties[f"v{i}"]), "--name", f"v{i}",
                     "--address", f"{host}:{ports[i]}"]) == 0
    assert main(["ledger", "keygen", "--out", str(parties["operator"]), "--name", "operator"]) == 0
    args = ["ledger", "genesis", "--out", str(tmp_path / "chain" / "genesis.json"), "--from"]
    args += [str(parties[f"v{i}"] / f"v{i}.json") for i in range(4)]
    args += [str(parties["operator"] / "operator.json")]
    if ca:
        CertificateAuthority.create(tmp_path / "consortium-ca", "Consortium")
        args += ["--ca", str(tmp_path / "consortium-ca")]
    return parties, args


def test_a_consortium_genesis_is_assembled_from_public_parts_only(tmp_path, capsys):
    """Before the change ``ledger genesis`` generated every validator's and principal's
    private key into one folder, so whoever ran it could sign as all four validators. Now
    each party's keys are generated where they are used and the genesis is assembled from
    descriptors: no private key exists anywhere in the assembler's output, and the genesis
    hash it prints is the one every party checks."""
    import stat

    from ledger.genesis import Genesis

    parties, args = _consortium(tmp_path)
    for folder in parties.values():
        for key in folder.glob("*.key"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    chain = tmp_path / "chain"
    written = [p for p in chain.rglob("*") if p.is_file()]
    assert written and not [p for p in written if p.suffix == ".key"]
    assert not [p for p in written if b"PRIVATE" in p.read_bytes()]
    g = Genesis.load(chain / "genesis.json")
    assert f"genesis hash {g.hash.hex()}" in out and g.tls and g.n == 4
    assert [v.public_key for v in g.validators] == [
        json.loads((parties[f"v{i}"] / f"v{i}.json").read_text())["public_key"] for i in range(4)]
    assert (chain / "certs" / "operator.crt").exists()
    assert main(args) == 2  # never overwrites a genesis


def test_plaintext_links_off_loopback_are_refused(tmp_path, capsys):
    """Before the change a genesis could put validators on any address with plaintext TCP
    links between them. Now a genesis whose validators leave loopback must name a CA."""
    _, args = _consortium(tmp_path, ca=False, host="10.1.2.3")
    capsys.readouterr()
    assert main(args) == 2
    assert "need TLS" in capsys.readouterr().err


def test_a_validator_refuses_a_genesis_whose_hash_it_did_not_agree(tmp_path, capsys):
    """Before the change a validator ran whatever genesis file it was given. Now its
    operator passes the hash agreed and a different file is refused with one line."""
    assert main(["ledger", "genesis", "--local", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    code = main(["ledger", "validator", "--genesis", str(tmp_path / "genesis.json"), "--id", "0",
                 "--data", str(tmp_path / "d"), "--genesis-hash", "00" * 32])
    err = capsys.readouterr().err
    assert code == 2 and "genesis hash is" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_consortium_runs_over_mutual_tls_and_refuses_another_ca(tmp_path):
    """Four separately generated validators brought up as four processes over mutual TLS
    commit a transaction. Before the change the links were plaintext TCP: anyone on the
    path read and could inject frames, and nothing but the Hello said who was talking.
    Now a validator or a client whose certificate comes from another CA is refused at the
    handshake, even holding a real validator's signing key, and a plaintext caller gets
    nothing."""
    import shutil
    import ssl

    from ledger.client import LedgerClient
    from ledger.errors import LedgerUnavailable
    from ledger.messages import Hello, sign_frame
    from medchain.identity import SigningKey
    from medchain.pki import CertificateAuthority

    parties, args = _consortium(tmp_path)
    assert main(args) == 0
    chain = tmp_path / "chain"
    shutil.copy(chain / "certs" / "operator.crt", parties["operator"] / "operator.crt")
    keys = {f"validator-{i}": parties[f"v{i}"] / f"v{i}.key" for i in range(4)}
    keys["operator"] = parties["operator"] / "operator.key"
    with LocalCluster(4, chain, keys=keys) as cluster:
        assert cluster.genesis.tls
        with cluster.client("operator") as op:
            assert op.submit(ConsentSet("tok-tls", "diagnosis", True, 1)).committed

        other = CertificateAuthority.create(tmp_path / "other-ca", "Elsewhere")
        impostor = other.issue("validator-1", tmp_path / "impostor", server=True,
                               hosts=("127.0.0.1",))
        client_as = other.issue("operator", tmp_path / "impostor")
        v0 = cluster.genesis.validators[0]

        async def handshake(ctx):
            try:
                reader, writer = await asyncio.open_connection(v0.host, v0.port, ssl=ctx,
                                                               server_hostname=v0.host)
                key = SigningKey.load(parties["v1"] / "v1.key")  # the real validator key
                write_frame(writer, sign_frame(Hello("validator", "1", cluster.genesis.chain_id,
                                                     b"\0" * 32), key)[1])
                return await asyncio.wait_for(reader.read(), 5)
            except (ssl.SSLError, ConnectionError, OSError):
                return b""

        foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        foreign.load_verify_locations(cadata=cluster.genesis.tls_ca)
        foreign.load_cert_chain(impostor.cert, impostor.key)
        assert asyncio.run(handshake(foreign)) == b""
        plain = asyncio.run(_plaintext(v0.host, v0.port))
        assert plain == b""

        stranger = LedgerClient(cluster.genesis, parties["operator"] / "operator.key",
                                "operator", tls=client_as, connect_s=2, timeout_s=2)
        with pytest.raises(LedgerUnavailable):
            stranger.start()
        stranger.close()


async def _plaintext(host: str, port: int) -> bytes:
    """What a caller without TLS receives (the validator's bytes, if any)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\0\0\0\5hello")
        return await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, OSError):
        return b""


@pytest.mark.slow
def test_a_certificate_lends_its_channel_to_no_other_identity(tmp_path):
    """Under TLS the validator checks that the caller's certificate names the identity its
    signed Hello claims: the ingest service's key cannot ride on the operator's certificate
    (before the change there was no certificate at all, so nothing tied the channel to the
    identity). Also the local genesis with ``tls`` (every link mutual TLS on loopback)."""
    from ledger.client import LedgerClient
    from ledger.errors import LedgerUnavailable
    from medchain.pki import Identity

    with LocalCluster(4, tmp_path, params=PARAMS, tls=True) as cluster:
        with cluster.client("ingest") as ingest:
            assert ingest.status(0, timeout_s=5)["normal"]
        borrowed = Identity(cluster.key_path("operator").with_suffix(".crt"),
                            cluster.key_path("operator").with_name("operator.tls.key"))
        client = LedgerClient(cluster.genesis, cluster.key_path("ingest"), "ingest",
                              tls=borrowed, connect_s=2, timeout_s=2)
        with pytest.raises(LedgerUnavailable):
            client.start()
        client.close()
