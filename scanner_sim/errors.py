"""Scanner-simulator exceptions, rooted in :class:`medchain.errors.MedChainError`."""

from medchain.errors import MedChainError

__all__ = ["ScannerError"]


class ScannerError(MedChainError):
    """The receiving node cannot be reached, or there is nothing to send."""
