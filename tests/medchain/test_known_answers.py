"""Known-answer tests for every primitive the sealing recipe composes."""

import hashlib

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medchain import sealing
from medchain.identity import SigningKey

h = bytes.fromhex


def test_sha256_fips180_abc():
    assert hashlib.sha256(b"abc").hexdigest() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_aes_256_gcm_nist_vector():
    # NIST GCM test case 16 (AES-256, 96-bit IV, with AAD), from the GCM specification.
    key = h("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = h("cafebabefacedbaddecaf888")
    pt = h(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    aad = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    ct = h(
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    )
    tag = h("76fc6ece0f4e1768cddf8853bb2d551b")
    assert AESGCM(key).encrypt(iv, pt, aad) == ct + tag


def test_ed25519_rfc8032_test_1():
    seed = h("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    pub = h("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = h(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    key = Ed25519PrivateKey.from_private_bytes(seed)
    assert key.sign(b"") == sig
    assert SigningKey.from_seed(seed).public.raw == pub


def test_x25519_rfc7748_section_6_1():
    alice = X25519PrivateKey.from_private_bytes(
        h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob = X25519PrivateKey.from_private_bytes(
        h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    )
    assert alice.public_key().public_bytes_raw() == h(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert bob.public_key().public_bytes_raw() == h(
        "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    )
    shared = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert alice.exchange(bob.public_key()) == shared == bob.exchange(alice.public_key())


def test_hpke_rfc9180_a1_base_decrypts():
    # RFC 9180 A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, sequence 0.
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    sk_r = X25519PrivateKey.from_private_bytes(
        h("4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8")
    )
    enc = h("37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431")
    ct = h("f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a")
    pt = rust_openssl.hpke._decrypt_with_aad(
        suite, enc + ct, sk_r, info=h("4f6465206f6e2061204772656369616e2055726e"), aad=b"Count-0"
    )
    assert pt == b"Beauty is truth, truth beauty"


def test_hpke_vector_of_the_suite_sealing_uses():
    """The suite medchain.sealing wraps data keys with, DHKEM(X25519, HKDF-SHA256),
    HKDF-SHA256, AES-256-GCM (kem 0x20, kdf 1, aead 2), base mode, sequence 0: the CFRG's
    RFC 9180 test-vector set (the RFC's appendix prints only the AES-128-GCM one), as carried
    by BoringSSL/AWS-LC in crypto/hpke/hpke_test_vectors.txt."""
    sk_r = X25519PrivateKey.from_private_bytes(
        h("497b4502664cfea5d5af0b39934dac72242a74f8480451e1aee7d6a53320333d")
    )
    sk_e = X25519PrivateKey.from_private_bytes(
        h("179d4b53b6365c45b600c4163b61d95cbc2f4d9e36f1695558dce265ab8bab11")
    )
    assert sk_r.public_key().public_bytes_raw() == h(
        "430f4b9859665145a6b1ba274024487bd66f03a2dd577d7753c68d7d7d00c00c"
    )
    enc = sk_e.public_key().public_bytes_raw()
    assert enc == h("6c93e09869df3402d7bf231bf540fadd35cd56be14f97178f0954db94b7fc256")
    info = h("4f6465206f6e2061204772656369616e2055726e")
    ct = h("e5d84cd531cfb583096e7cfa9641bd3079cf3a91cda813c52deb5f512be9931980a41de125a925cdad859d5b7a")
    pt = rust_openssl.hpke._decrypt_with_aad(sealing._SUITE, enc + ct, sk_r, info=info, aad=b"Count-0")
    assert pt == b"Beauty is truth, truth beauty"
    # the vector pins the AEAD: the AES-128-GCM suite cannot open it
    other = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    with pytest.raises(InvalidTag):
        rust_openssl.hpke._decrypt_with_aad(other, enc + ct, sk_r, info=info, aad=b"Count-0")
