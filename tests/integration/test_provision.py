"""A deployment set up as a new operator would, with the commands only: ``cloud init`` makes
the CA, the broker's files and a TLS configuration; ``cloud enroll`` writes a device's kit;
a real Mosquitto started from the generated configuration lets the kit's certificate use its
own topics; ``cloud revoke`` and ``cloud rotate`` act on one device and no other."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest

from cloud.broker import free_port
from cloud.config import load_config
from edge_agent.config import load_profile
from medchain.identity import SigningKey
from medchain.protocol import heartbeat_topic
from medchain_app.cli import main

pytestmark = pytest.mark.slow


def _pub(port, ca, cert, key, topic) -> subprocess.CompletedProcess:
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca),
                           "--cert", str(cert), "--key", str(key), "-q", "1", "-t", topic, "-m", "beat"],
                          capture_output=True, text=True, timeout=20)


def _received(port, ca, cert, key, topic, publish) -> str:
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca),
                            "--cert", str(cert), "--key", str(key), "-t", topic, "-C", "1", "-W", "3"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    publish()
    out, _ = sub.communicate(timeout=20)
    return out.strip()


def test_init_enroll_revoke_rotate_with_the_commands_only(tmp_path, ledger_cluster, need_tools, new_device_id):
    need_tools("mosquitto", "mosquitto_pub", "mosquitto_sub")
    ledger_dir = ledger_cluster.genesis_path.parent
    port = free_port()
    cloud = tmp_path / "cloud"
    assert main(["cloud", "init", "--dir", str(cloud), "--ledger-dir", str(ledger_dir), "--port", str(port),
                 "--organization", "Hospital A"]) == 0
    config = load_config(cloud / "cloud.toml")
    assert config.endpoint.port == port and config.endpoint.tls_ca and config.endpoint.tls_cert
    assert stat.S_IMODE((cloud / "pki" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((cloud / "keys" / "coordinator-tls.key").stat().st_mode) == 0o600

    devices = {}
    for name in ("a", "b"):
        device_id = new_device_id(f"kit{name}")
        key = tmp_path / f"{name}.key"
        SigningKey.generate().save(key)
        kit = tmp_path / f"kit-{name}"
        assert main(["cloud", "enroll", "--config", str(cloud / "cloud.toml"), "--device-id", device_id,
                     "--key-file", str(key), "--site", "site-a", "--group", "x86-cpu", "--out", str(kit)]) == 0
        profile = load_profile(kit / "profile.toml", base_dir=kit)
        assert profile.device.id == device_id and (profile.mqtt.host, profile.mqtt.port) == ("127.0.0.1", port)
        tls = profile.mqtt.tls
        assert (tls.ca, tls.cert, tls.key) == (kit / "keys/ca.pem", kit / "keys/device.crt", kit / "keys/device-tls.key")
        assert all(p.exists() for p in (tls.ca, tls.cert, tls.key, profile.cloud.enrollment))
        assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600
        devices[name] = (device_id, tls)
    (a, ta), (b, tb) = devices["a"], devices["b"]

    conf = cloud / "mosquitto" / "mosquitto.conf"
    if os.geteuid() == 0:
        assert "user root" in conf.read_text()
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while _pub(port, ta.ca, ta.cert, ta.key, heartbeat_topic(a)).returncode != 0:
            assert time.monotonic() < deadline and broker.poll() is None
            time.sleep(0.1)
        coordinator = (config.endpoint.tls_ca, config.endpoint.tls_cert, config.endpoint.tls_key)
        watch = heartbeat_topic("+")
        assert _received(port, *coordinator, watch, lambda: _pub(port, ta.ca, ta.cert, ta.key, heartbeat_topic(a))) == "beat"
        assert _received(port, *coordinator, watch, lambda: _pub(port, ta.ca, ta.cert, ta.key, heartbeat_topic(b))) == ""

        assert main(["cloud", "revoke", "--config", str(cloud / "cloud.toml"), "--device-id", a,
                     "--reason", "stolen"]) == 0
        broker.send_signal(signal.SIGHUP)  # the re-written ACL
        time.sleep(1.0)
        assert _received(port, *coordinator, watch, lambda: _pub(port, ta.ca, ta.cert, ta.key, heartbeat_topic(a))) == ""
        assert _received(port, *coordinator, watch, lambda: _pub(port, tb.ca, tb.cert, tb.key, heartbeat_topic(b))) == "beat"

        old = tb.cert.read_bytes()
        assert main(["cloud", "rotate", "--config", str(cloud / "cloud.toml"), "--device-id", b,
                     "--kit", str(tmp_path / "kit-b")]) == 0
        assert tb.cert.read_bytes() != old
    finally:
        broker.terminate()
        broker.wait(10)
    broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # restarted, it reads the CRL: the revoked certificate cannot even connect
        deadline = time.monotonic() + 10
        while _pub(port, tb.ca, tb.cert, tb.key, heartbeat_topic(b)).returncode != 0:
            assert time.monotonic() < deadline and broker.poll() is None
            time.sleep(0.1)
        assert _pub(port, ta.ca, ta.cert, ta.key, heartbeat_topic(a)).returncode != 0
    finally:
        broker.terminate()
        broker.wait(10)
