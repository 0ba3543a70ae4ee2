"""Uptane full verification: may this device install this target?

A pure function of verified metadata and device facts -- no I/O, no clock --
in the spirit of python-tuf's ``TrustedMetadataSet``: both repositories have
already been refreshed and verified by ``tuf.ngclient``; this module decides
whether what the director (online key) asks for is backed by what the release
managers signed in the image repository (offline keys). A stolen director key
can therefore only choose among releases the release managers signed, for the
hardware they signed them for, never below the device's release-counter floor.

The checks, in order (each failure has its own reason code):

1. the director target's ``custom`` names this device and its hardware;
2. the image repository has a target at the same path;
3. both entries have identical length and sha256;
4. the image target lists this device's hardware;
5. the release counter is the same in both and not below the device's floor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tuf.api.metadata import TargetFile

from edgeota.protocol.errors import EdgeotaError, ProtocolError
from edgeota.protocol.targets_custom import DirectorTargetCustom, ImageTargetCustom

__all__ = ["DeviceFacts", "InstallDecision", "RefusalReason", "UptaneRefusal", "decide"]


class RefusalReason(enum.StrEnum):
    MALFORMED_CUSTOM = "malformed_custom"
    WRONG_DEVICE = "wrong_device"
    WRONG_HARDWARE = "wrong_hardware"
    NOT_IN_IMAGE_REPOSITORY = "not_in_image_repository"
    IMAGE_MISMATCH = "image_mismatch"
    HARDWARE_NOT_IN_RELEASE = "hardware_not_in_release"
    COUNTER_MISMATCH = "counter_mismatch"
    BELOW_FLOOR = "below_floor"


class UptaneRefusal(EdgeotaError):
    """The director asked for something the image repository does not back."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class DeviceFacts:
    """What the device knows about itself; the floor is persisted by the agent."""

    device_id: str
    hardware_id: str
    release_floor: int = 0


@dataclass(frozen=True)
class InstallDecision:
    """A target both repositories agree this device may install."""

    target_path: str
    length: int
    sha256: str
    image: ImageTargetCustom
    director: DirectorTargetCustom


def decide(
    target_path: str,
    director_target: TargetFile,
    image_target: TargetFile | None,
    facts: DeviceFacts,
) -> InstallDecision:
    """Return the install decision or raise ``UptaneRefusal`` naming the failed check."""
    try:
        director = DirectorTargetCustom.from_custom(director_target.custom)
    except ProtocolError as e:
        raise UptaneRefusal(RefusalReason.MALFORMED_CUSTOM, str(e)) from e
    if director.device_id != facts.device_id:
        raise UptaneRefusal(
            RefusalReason.WRONG_DEVICE,
            f"director target {target_path} is for device {director.device_id!r}, "
            f"this is {facts.device_id!r}",
        )
    if director.hardware_id != facts.hardware_id:
        raise UptaneRefusal(
            RefusalReason.WRONG_HARDWARE,
            f"director target {target_path} is for hardware {director.hardware_id!r}, "
            f"this device is {facts.hardware_id!r}",
        )
    if image_target is None:
        raise UptaneRefusal(
            RefusalReason.NOT_IN_IMAGE_REPOSITORY,
            f"{target_path} is in the director but not signed in the image repository",
        )
    sha256 = director_target.hashes.get("sha256")
    if (
        director_target.length != image_target.length
        or sha256 is None
        or director_target.hashes != image_target.hashes
    ):
        raise UptaneRefusal(
            RefusalReason.IMAGE_MISMATCH,
            f"{target_path}: director says {director_target.length} bytes "
            f"{director_target.hashes}, the image repository {image_target.length} bytes "
            f"{image_target.hashes}",
        )
    try:
        image = ImageTargetCustom.from_custom(image_target.custom)
    except ProtocolError as e:
        raise UptaneRefusal(RefusalReason.MALFORMED_CUSTOM, str(e)) from e
    if facts.hardware_id not in image.hardware:
        raise UptaneRefusal(
            RefusalReason.HARDWARE_NOT_IN_RELEASE,
            f"{image.name} {image.version} is signed for {list(image.hardware)}, not "
            f"{facts.hardware_id!r}",
        )
    if director.release_counter != image.release_counter:
        raise UptaneRefusal(
            RefusalReason.COUNTER_MISMATCH,
            f"director release counter {director.release_counter} differs from the signed "
            f"{image.release_counter}",
        )
    if image.release_counter < facts.release_floor:
        raise UptaneRefusal(
            RefusalReason.BELOW_FLOOR,
            f"{image.name} {image.version} has release counter {image.release_counter}, "
            f"below this device's floor {facts.release_floor}",
        )
    return InstallDecision(target_path, image_target.length, sha256, image, director)
