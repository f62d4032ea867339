"""The heartbeat monitor: keeps the fleet registry's view of each device current.

Subscribes to every device's retained heartbeat topic; a beat is stored only when it is
signed by the device's enrolled key and newer than the last (see
:meth:`cloud.fleet.FleetRegistry.record_heartbeat`). Anything else is counted and logged.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from medchain.errors import MedChainError
from medchain.mqtt import MqttEndpoint, MqttLink
from medchain.protocol import Heartbeat, decode_message, device_from_topic, heartbeat_subscription

from cloud.fleet import FleetRegistry

__all__ = ["HeartbeatMonitor", "MonitorStats"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MonitorStats:
    recorded: int = 0
    stale: int = 0
    refused: int = 0


class HeartbeatMonitor:
    def __init__(self, endpoint: MqttEndpoint, fleet: FleetRegistry, client_id: str | None = None):
        self.fleet = fleet
        self.stats = MonitorStats()
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.link = MqttLink(endpoint, client_id=client_id,
                             subscriptions=[(heartbeat_subscription(), 1)], persistent_session=False,
                             on_message=lambda t, p: self._inbox.put((t, p)))

    def __enter__(self) -> HeartbeatMonitor:
        self._thread = threading.Thread(target=self._run, name="heartbeat-monitor", daemon=True)
        self._thread.start()
        self.link.start()
        return self

    def __exit__(self, *exc) -> None:
        self.link.close()
        self._inbox.put(None)
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, payload = item
            if not payload:  # an emptied retained topic
                continue
            try:
                beat = decode_message(payload, expect=Heartbeat)
                if beat.device_id != device_from_topic(topic):
                    raise MedChainError(f"heartbeat of {beat.device_id!r} on another device's topic")
                if self.fleet.record_heartbeat(beat):
                    self.stats.recorded += 1
                else:
                    self.stats.stale += 1
            except MedChainError as exc:
                self.stats.refused += 1
                log.warning("heartbeat refused on %s: %s", topic, exc)
