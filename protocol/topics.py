"""MQTT topic names of the wire contract, in one place for server, agent and broker config.

Every device topic lives under ``{prefix}/devices/{device_id}/``; the broker's
ACL lets device X publish only to its own ``fetch``, ``status``,
``telemetry`` and ``online`` and read only its own ``notify`` and ``rx``, so
the topic itself names the sender and no device can speak for another.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgeota.protocol.identity import validate_device_id

__all__ = [
    "DEFAULT_PREFIX",
    "DEVICE_PUBLISHES",
    "DEVICE_RECEIVES",
    "DeviceTopic",
    "Topics",
]

DEFAULT_PREFIX = "edgeota/v1"


class DeviceTopic(enum.StrEnum):
    """The per-device topics and who sends on them."""

    NOTIFY = "notify"  # server -> device: your director metadata changed (QoS 1)
    FETCH = "fetch"  # device -> server: request a repository file
    RX = "rx"  # server -> device: response chunks or an error code
    STATUS = "status"  # device -> server: signed state reports (retained)
    TELEMETRY = "telemetry"  # device -> server: model metrics
    ONLINE = "online"  # device -> server: presence via last will (retained)


DEVICE_PUBLISHES = (DeviceTopic.FETCH, DeviceTopic.STATUS, DeviceTopic.TELEMETRY,
                    DeviceTopic.ONLINE)
DEVICE_RECEIVES = (DeviceTopic.NOTIFY, DeviceTopic.RX)


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (configurable per deployment of edgeota)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#\x00") or \
                self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ValueError(f"invalid MQTT topic prefix {self.prefix!r}")

    def device(self, device_id: str, kind: DeviceTopic) -> str:
        """``{prefix}/devices/{id}/{kind}`` for one device."""
        return f"{self.prefix}/devices/{validate_device_id(device_id)}/{kind}"

    def all_devices(self, kind: DeviceTopic) -> str:
        """The server's subscription filter for ``kind`` from every device."""
        return f"{self.prefix}/devices/+/{kind}"

    def shared(self, group: str, kind: DeviceTopic) -> str:
        """A shared subscription (``$share/group/...``) so server replicas split the load."""
        return f"$share/{group}/{self.all_devices(kind)}"

    def parse(self, topic: str) -> tuple[str, DeviceTopic]:
        """Split a device topic into (device id, kind); ``ValueError`` for anything else."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            raise ValueError(f"topic {topic!r} is not under {head}")
        device_id, sep, kind = topic[len(head):].partition("/")
        if not sep:
            raise ValueError(f"topic {topic!r} names no device topic")
        return validate_device_id(device_id), DeviceTopic(kind)
