"""The deployment's certificate authority, checked by the tools that will rely on it:
OpenSSL's verifier and a real Mosquitto with the CA's CRL."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import time

import pytest

from medchain.errors import KeyFileError
from medchain.pki import CertificateAuthority, common_name, serial_of


def _verify(ca: CertificateAuthority, cert) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", "-crl_check", "-CAfile", str(ca.cert_path), "-CRLfile",
                           str(ca.crl_path), str(cert)], capture_output=True, text=True)


def test_issue_rotate_and_revoke_one_certificate_without_touching_the_others(tmp_path, need_tools):
    need_tools("openssl")
    ca = CertificateAuthority.create(tmp_path / "ca", "Hospital A")
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    a = ca.issue("edge-a", tmp_path / "a", stem="device")
    b = ca.issue("edge-b", tmp_path / "b", stem="device")
    assert common_name(a.cert) == "edge-a" and stat.S_IMODE(a.key.stat().st_mode) == 0o600
    assert _verify(ca, a.cert).returncode == 0 and _verify(ca, b.cert).returncode == 0
    old = serial_of(a.cert)
    ca.revoke(a.cert)
    refused = _verify(ca, a.cert)
    assert refused.returncode != 0 and "revoked" in (refused.stdout + refused.stderr)
    assert _verify(ca, b.cert).returncode == 0  # the other device is untouched
    rotated = ca.issue("edge-a", tmp_path / "a", stem="device")  # a new certificate, same name
    assert serial_of(rotated.cert) != old and _verify(ca, rotated.cert).returncode == 0
    again = CertificateAuthority.load(tmp_path / "ca")
    assert again.revoked().keys() == {old}
    with pytest.raises(KeyFileError, match="refusing to overwrite a CA"):
        CertificateAuthority.create(tmp_path / "ca", "Hospital A")
    other = CertificateAuthority.create(tmp_path / "other", "Elsewhere")
    foreign = other.issue("edge-x", tmp_path / "x")
    with pytest.raises(KeyFileError, match="not issued by this CA"):
        ca.revoke(foreign.cert)


def test_a_broker_loading_the_crl_refuses_only_the_revoked_device(tmp_path, need_tools):
    need_tools("mosquitto", "mosquitto_pub")
    from cloud.broker import free_port

    ca = CertificateAuthority.create(tmp_path / "ca", "Hospital A")
    server = ca.issue("broker", tmp_path / "srv", server=True, client=False, hosts=("127.0.0.1", "localhost"))
    good, bad = ca.issue("edge-good", tmp_path / "g"), ca.issue("edge-bad", tmp_path / "b")
    ca.revoke(bad.cert)
    port = free_port()
    user = "user root\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"{user}listener {port} 127.0.0.1\ncafile {ca.cert_path}\ncertfile {server.cert}\n"
                    f"keyfile {server.key}\nrequire_certificate true\ncrlfile {ca.crl_path}\n"
                    "use_identity_as_username true\nallow_anonymous false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(ca.cert_path),
                              "--cert", str(good.cert), "--key", str(good.key), "-t", "probe", "-m", "x"],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "broker did not come up"
            time.sleep(0.1)
        refused = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile",
                                  str(ca.cert_path), "--cert", str(bad.cert), "--key", str(bad.key),
                                  "-t", "probe", "-m", "x"], capture_output=True, text=True)
        assert refused.returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_signing_request_is_certified_without_the_key_leaving_its_owner(tmp_path, need_tools):
    """``certificate_request`` keeps the key (0600, never overwritten) and hands out a request;
    the CA certifies it under the name it decides, and OpenSSL accepts the result. A request
    whose signature does not match its key is refused."""
    from medchain.pki import certificate_request

    need_tools("openssl")
    ca = CertificateAuthority.create(tmp_path / "ca", "Consortium")
    csr = certificate_request("hospital-a", tmp_path / "site" / "a.tls.key")
    assert stat.S_IMODE((tmp_path / "site" / "a.tls.key").stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="already exists"):
        certificate_request("hospital-a", tmp_path / "site" / "a.tls.key")
    cert = tmp_path / "a.crt"
    cert.write_bytes(ca.sign_request(csr, cn="validator-0", server=True, hosts=("127.0.0.1",)))
    assert common_name(cert) == "validator-0"
    assert _verify(ca, cert).returncode == 0
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(Encoding.DER))
    der[-1] ^= 1  # the last byte of the signature's s value: still a request, badly signed
    forged = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der)) + \
        b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(KeyFileError, match="bad signature"):
        ca.sign_request(forged)
