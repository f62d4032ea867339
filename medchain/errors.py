"""The root of every exception MedChain raises at a boundary.

Messages name the object and the reason, never a secret, a key or patient data.
"""

__all__ = ["MedChainError", "ConfigError", "KeyFileError", "ProtocolError", "EncodingError", "VerificationError",
           "SignatureInvalid", "ProofInvalid", "DecryptionError"]


class MedChainError(Exception):
    """Base of all MedChain errors, so callers can catch ours and nothing else."""


class ConfigError(MedChainError):
    """A configuration file (device profile, cloud configuration) is missing, malformed, or has
    a bad, missing or unknown field; the message names the file, section and field."""


class KeyFileError(MedChainError):
    """A key file is missing, truncated, of the wrong kind or readable by others."""


class ProtocolError(MedChainError):
    """A wire message could not be parsed: wrong version, missing or mistyped field."""


class EncodingError(ProtocolError):
    """A value has no canonical encoding (unsupported type, non-finite float, non-str key),
    or bytes are not canonical CBOR."""


class VerificationError(MedChainError):
    """Something signed, hashed or proven does not check out.

    The message says which check failed (signature, chunk digest, Merkle root); it never
    carries key material.
    """


class SignatureInvalid(VerificationError):
    """A signature does not verify. Says nothing about why (no oracle)."""


class ProofInvalid(VerificationError):
    """A Merkle inclusion proof does not lead to the expected root."""


class DecryptionError(MedChainError):
    """Authenticated decryption failed. Deliberately says no more than *that* it failed."""
