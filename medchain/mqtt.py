"""A small MQTT link over paho-mqtt, shared by the edge uplink and cloud ingest.

paho's client is one large class with integer return codes and callbacks on its own thread.
This wrapper keeps the useful part: automatic reconnect with back-off, (re)subscribing on
every connect, QoS 1 publishes, TLS from files. Return codes become :class:`LinkError`;
incoming messages go to a callback the owner supplies (usually a queue's ``put``).

paho retries a failed connection quietly: the exception of a refused TLS handshake is
swallowed, and a broker that rejects our client certificate after the handshake (TLS 1.3)
shows up as an "unspecified" disconnect. The link keeps the reason (:attr:`MqttLink.last_error`,
in words an operator can act on), logs it once, and names it in the :class:`LinkError` of a
publish attempted while it is not connected.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from medchain.errors import MedChainError

__all__ = ["MqttEndpoint", "MqttLink", "LinkError", "explain_failure"]

log = logging.getLogger(__name__)


class LinkError(MedChainError):
    """The broker link cannot take the message now (not connected, queue full, too large)."""


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str = "127.0.0.1"
    port: int = 1883
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 30
    max_message_bytes: int = 1024 * 1024
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    def describe(self) -> str:
        return f"{'mqtts' if self.tls_ca else 'mqtt'}://{self.host}:{self.port}"


OnMessage = Callable[[str, bytes], None]

# OpenSSL reason codes (as they appear in the error text) and what they mean for us
_TLS_REASONS = (
    ("CERTIFICATE_REQUIRED", "the broker requires a client certificate and none was presented "
                             "(set the TLS cert and key)"),
    ("UNKNOWN_CA", "the broker refused our client certificate: it is not signed by a CA the "
                   "broker trusts"),
    ("BAD_CERTIFICATE", "the broker refused our client certificate"),
    ("CERTIFICATE_UNKNOWN", "the broker refused our client certificate"),
    ("CERTIFICATE_EXPIRED", "a certificate has expired"),
    ("CERTIFICATE_REVOKED", "our client certificate is revoked"),
    ("CERTIFICATE_VERIFY_FAILED", "the broker's certificate is not trusted by our CA file "
                                  "(or does not name the host we connect to)"),
    ("WRONG_VERSION_NUMBER", "the port does not speak TLS (or speaks another TLS version)"),
)


def explain_failure(endpoint: MqttEndpoint, error: BaseException | str) -> str:
    """Why a connection to ``endpoint`` failed, in words that say what to fix."""
    text = str(error)
    upper = text.upper()
    if isinstance(error, ssl.SSLError) or "SSL" in upper or "TLS" in upper:
        for code, meaning in _TLS_REASONS:
            if code in upper:
                return f"TLS handshake with {endpoint.describe()} failed: {meaning} ({text})"
        return f"TLS error with {endpoint.describe()}: {text}"
    return f"cannot connect to {endpoint.describe()}: {text}"


class _Client(mqtt.Client):
    """paho's client, keeping the exception of the last failed connection attempt (paho's
    background loop catches it and only calls ``on_connect_fail``, without it)."""

    on_connect_error: Callable[[OSError], None] | None = None

    def reconnect(self):
        try:
            return super().reconnect()
        except OSError as exc:
            if self.on_connect_error is not None:
                self.on_connect_error(exc)
            raise


class MqttLink:
    """One client connection; a context manager that connects in the background.

    ``subscriptions`` are (topic filter, qos) pairs, subscribed again after every reconnect.
    ``clean_start=False`` with a stable ``client_id`` asks the broker to keep QoS 1 messages
    for us while we are away.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        client_id: str | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: OnMessage | None = None,
        persistent_session: bool = True,
        max_inflight: int = 32,
    ):
        self.endpoint = endpoint
        self.client_id = client_id or f"medchain-{uuid.uuid4().hex[:12]}"
        self._subscriptions = list(subscriptions)
        self._on_message = on_message
        self._connected = threading.Event()
        self._closed = False
        self.connects = 0
        self.last_error = ""  # why the last connection attempt failed; "" once connected
        self._client = _Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=not persistent_session,
            protocol=mqtt.MQTTv311,
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.reconnect_delay_set(
            min_delay=max(1, int(endpoint.reconnect_min_s)), max_delay=int(endpoint.reconnect_max_s)
        )
        if endpoint.tls_ca:
            self._client.tls_set(
                ca_certs=endpoint.tls_ca,
                certfile=endpoint.tls_cert,
                keyfile=endpoint.tls_key,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_connect_error = self._failed
        self._client.on_log = self._handle_log

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Connect in the background; reconnects forever with back-off until closed."""
        self._client.connect_async(self.endpoint.host, self.endpoint.port, self.endpoint.keepalive)
        self._client.loop_start()

    def close(self) -> None:
        self._closed = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- traffic --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Hand a message to the client; :class:`LinkError` if it cannot take it now."""
        if len(payload) > self.endpoint.max_message_bytes:
            raise LinkError(
                f"{len(payload)}-byte message exceeds the {self.endpoint.max_message_bytes}-byte limit"
            )
        if not self.connected:
            why = self.last_error
            raise LinkError(f"not connected to {self.endpoint.describe()}" + (f": {why}" if why else ""))
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"publish to {topic} refused: {mqtt.error_string(info.rc)}")
        return info

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now (when connected) and after every reconnect."""
        if (topic, qos) not in self._subscriptions:
            self._subscriptions.append((topic, qos))
        if self.connected:
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        self._subscriptions = [(t, q) for t, q in self._subscriptions if t != topic]
        if self.connected:
            self._client.unsubscribe(topic)

    # -- paho callbacks (paho's network thread) -------------------------------------------

    def _failed(self, error: BaseException | str) -> None:
        """Remember why connecting failed; log it when the reason changes (not every retry)."""
        why = explain_failure(self.endpoint, error)
        if why != self.last_error:
            log.warning("%s (client %s); retrying", why, self.client_id)
        self.last_error = why

    def _handle_log(self, client, userdata, level, text) -> None:
        # a TLS alert after the handshake (TLS 1.3: client certificate refused) is only logged
        if level == mqtt.MQTT_LOG_ERR and not self.connected and "SSL" in text.upper():
            self._failed(text)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._failed(f"broker refused the connection: {reason_code}")
            return
        self.last_error = ""
        self.connects += 1
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
        self._connected.set()
        log.info("connected to %s as %s", self.endpoint.describe(), self.client_id)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._closed:
            return
        if was_connected:
            log.warning("lost %s (%s); reconnecting", self.endpoint.describe(), reason_code)
        elif not self.last_error:
            self._failed(f"the broker closed the connection before accepting it ({reason_code})")

    def _handle_message(self, client, userdata, message) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(message.topic, message.payload)
        except Exception:  # a bad message must not kill paho's network thread
            log.exception("handler failed for a message on %s", message.topic)
