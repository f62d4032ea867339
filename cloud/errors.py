"""Cloud-side exceptions, rooted in :class:`medchain.errors.MedChainError`.

Messages name the object and the reason, never a key, a secret or patient data.
"""

from medchain.errors import MedChainError

__all__ = [
    "CloudError",
    "BrokerError",
    "ObjectStoreError",
    "ObjectMissing",
    "ObjectMismatch",
    "FleetError",
    "UnknownDevice",
    "RegistrationRefused",
    "TrainingDataError",
    "KeyBackendError",
    "CustodianError",
    "CustodianRefused",
    "AccessRefused",
    "ApiUnauthorized",
]


class CloudError(MedChainError):
    """Base of cloud errors."""


class BrokerError(CloudError):
    """The embedded broker could not start."""


class ObjectStoreError(CloudError):
    """The object store failed to read or write."""


class ObjectMissing(ObjectStoreError):
    """No envelope with that id is stored (or one of its chunks is gone)."""


class ObjectMismatch(ObjectStoreError):
    """What is stored under an envelope id is another envelope (objects swapped or misfiled)."""


class FleetError(CloudError):
    """A fleet operation was refused (duplicate enrolment, bad heartbeat...)."""


class UnknownDevice(FleetError):
    """No device is enrolled under that id."""


class RegistrationRefused(CloudError):
    """The ledger refused an image registration; the reason is the contract's."""


class TrainingDataError(CloudError):
    """The stored images cannot make a training set (none granted, mixed edge chains,
    a single class...); the message says which and how many."""


class KeyBackendError(CloudError):
    """The custodian's key backend cannot be used: a missing PKCS#11 module or token, a
    wrong PIN, a wrapped key file that is not this token's (the message never carries the
    PIN or key material)."""


class CustodianError(CloudError):
    """The custodian process cannot be reached, or answered with something malformed."""


class CustodianRefused(CustodianError):
    """The custodian refused a request: bad signature, a principal it does not serve, a
    stale or replayed request. Says which, never more."""


class AccessRefused(CloudError):
    """A person's fetch was refused as a whole by the custodian (a signature that does not
    verify, a replayed or stale request, a principal without a recipient key)."""


class ApiUnauthorized(CloudError):
    """An API request is not signed by an active principal, or is stale or replayed. Says
    which check failed, never the key or the signature."""

    def __init__(self, message: str, kind: str = "unauthorized"):
        super().__init__(message)
        self.kind = kind  # unsigned, malformed, unknown-or-revoked, bad-signature, stale, replayed
