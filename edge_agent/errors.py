"""Edge-agent exceptions, rooted in :class:`medchain.errors.MedChainError`.

Messages name the object (a file, a profile field, a spool id, a DICOM tag) and the reason;
they never carry an attribute *value*, so no PHI can leak into a log through an error.
"""

from medchain.errors import ConfigError, MedChainError

__all__ = [
    "OutboxError",
    "OutboxFull",
    "EdgeError",
    "ConfigError",
    "DeidError",
    "Quarantined",
    "QuarantineError",
    "SpoolError",
    "SpoolFull",
    "RecordsError",
]


class EdgeError(MedChainError):
    """Base of edge-agent errors."""


class DeidError(EdgeError):
    """De-identification could not be completed; the instance must not be forwarded."""


class Quarantined(EdgeError):
    """An instance was set aside with a reason (bad encoding, undecodable pixels, burned-in
    text under the quarantine policy). ``reason`` is a short machine-friendly code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class QuarantineError(EdgeError):
    """A quarantine entry cannot be found, read or acted on as asked."""


class SpoolError(EdgeError):
    """The on-disk spool cannot be read or written."""


class SpoolFull(SpoolError):
    """Accepting this object would exceed the spool's configured ``max_bytes``."""


class RecordsError(EdgeError):
    """A clinical-records file is malformed: bad row, missing key, unknown label or purpose."""


class OutboxError(EdgeError):
    """The outbox cannot do what was asked (I/O error, corrupt database)."""


class OutboxFull(OutboxError):
    """No room for another envelope; the reason says which bound was hit."""
