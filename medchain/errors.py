"""The root of every exception MedChain raises at a boundary.

Messages name the object and the reason, never a secret, a key or patient data.
"""

__all__ = ["MedChainError", "ConfigError", "ProtocolError", "VerificationError", "DecryptionError"]


class MedChainError(Exception):
    """Base of all MedChain errors, so callers can catch ours and nothing else."""


class ConfigError(MedChainError):
    """A configuration file (device profile, cloud configuration) is missing, malformed, or has
    a bad, missing or unknown field; the message names the file, section and field."""


class ProtocolError(MedChainError):
    """A wire message could not be parsed: wrong version, missing or mistyped field."""


class VerificationError(MedChainError):
    """Something signed, hashed or proven does not check out.

    The message says which check failed (signature, chunk digest, Merkle root); it never
    carries key material.
    """


class DecryptionError(MedChainError):
    """Authenticated decryption failed. Deliberately says no more than *that* it failed."""
