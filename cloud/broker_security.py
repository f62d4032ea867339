"""The embedded broker held to the same rules as Mosquitto: TLS, a client certificate from
the deployment's CA (not on its CRL) for a name the ACL knows, and the ACL file
(:mod:`cloud.brokerconf`) for every publish, subscribe and delivery.

Two amqtt plugins: :class:`CertificateAuth` makes the certificate's subject common name the
MQTT user (Mosquitto's ``use_identity_as_username``) and refuses anonymous clients and
revoked or unregistered certificates; :class:`FileAcl` reads the generated ACL and re-reads
it (and the CRL) when the file changes, so an enrolment or revocation takes effect for the
next connection and the next message, as SIGHUP does for Mosquitto.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["CertificateAuth", "FileAcl", "parse_acl", "topic_matches"]

log = logging.getLogger("medchain.cloud.broker")


def topic_matches(topic: str, pattern: str) -> bool:
    """MQTT topic-filter matching of ``topic`` (a name, or a filter being subscribed) against
    an ACL ``pattern`` with ``+`` and ``#``."""
    t, p = topic.split("/"), pattern.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(t) == len(p)


def parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{user: [(access, pattern), ...]}`` from a Mosquitto ACL of ``user`` and ``topic``
    lines (the form :func:`cloud.brokerconf.acl_text` writes)."""
    rules: dict[str, list[tuple[str, str]]] = {}
    user = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user" and len(words) == 2:
            user = words[1]
            rules.setdefault(user, [])
        elif words[0] == "topic" and len(words) == 3 and user is not None:
            rules[user].append((words[1], words[2]))
        else:
            raise ValueError(f"ACL line not understood: {line!r}")
    return rules


class _Watched:
    """A file parsed again whenever its modification time changes."""

    def __init__(self, path: Path, parse) -> None:
        self.path, self._parse, self._mtime, self._value = path, parse, None, None

    def get(self):
        mtime = self.path.stat().st_mtime_ns
        if mtime != self._mtime:
            self._value, self._mtime = self._parse(self.path.read_bytes()), mtime
        return self._value


def _acl_file(path: Path) -> _Watched:
    return _Watched(path, lambda data: parse_acl(data.decode()))


def _revoked_serials(path: Path) -> _Watched:
    return _Watched(path, lambda data: {r.serial_number for r in x509.load_pem_x509_crl(data)})


class CertificateAuth(BaseAuthPlugin):
    """Only a client presenting a certificate (verified against the CA by TLS), not revoked,
    whose common name the ACL names, gets in; it is known by that name from then on."""

    @dataclass
    class Config:
        crl: str = ""
        acl: str = ""

    def __init__(self, context) -> None:
        super().__init__(context)
        self._crl = _revoked_serials(Path(self.config.crl))
        self._acl = _acl_file(Path(self.config.acl))

    async def authenticate(self, *, session) -> bool:
        ssl_object = getattr(session, "ssl_object", None)
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            log.warning("embedded broker: client %s refused: no client certificate", session.client_id)
            return False
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = names[0].value if names else ""
        if cert.serial_number in self._crl.get():
            log.warning("embedded broker: %s refused: certificate revoked", name)
            return False
        if name not in self._acl.get():
            log.warning("embedded broker: %s refused: not in the ACL (not enrolled)", name)
            return False
        session.username = name
        return True


class FileAcl(BaseTopicPlugin):
    """Publish needs ``write`` (or ``readwrite``), subscribe and delivery need ``read``."""

    @dataclass
    class Config:
        acl: str = ""
        extra: dict = field(default_factory=dict)

    def __init__(self, context) -> None:
        super().__init__(context)
        self._acl = _acl_file(Path(self.config.acl))

    async def topic_filtering(self, *, session=None, topic: str | None = None, action=None) -> bool:
        user = getattr(session, "username", None)
        if not topic or user is None:
            return False
        need = "write" if action == Action.PUBLISH else "read"
        return any(need in access and topic_matches(topic, pattern)
                   for access, pattern in self._acl.get().get(user, ()))
