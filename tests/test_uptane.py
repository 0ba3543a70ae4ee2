"""Uptane full verification as a pure function: each attack has its own refusal."""

from __future__ import annotations

import dataclasses

import pytest
from tuf.api.metadata import TargetFile

from edgeota.agent.uptane import DeviceFacts, RefusalReason, UptaneRefusal, decide
from edgeota.protocol.manifest import TensorSpec
from edgeota.protocol.targets_custom import DirectorTargetCustom, ImageTargetCustom

PATH = "models/digits/2.0.0.eotb"
SHA = "ab" * 32
FACTS = DeviceFacts("pi-1", "rpi4", release_floor=3)
IMAGE = ImageTargetCustom(
    name="digits", version="2.0.0", hardware=("rpi4", "rpi5"), release_counter=3,
    plaintext_sha256="cd" * 32, plaintext_size=100,
    inputs=(TensorSpec("input", "FP32", (None, 64)),),
    outputs=(TensorSpec("label", "INT64", (None,)),),
)
DIRECTOR = DirectorTargetCustom(device_id="pi-1", hardware_id="rpi4", release_counter=3,
                                wrapped_key=b"\x01" * 80)


def target(custom: dict, length: int = 1000, sha: str = SHA) -> TargetFile:
    return TargetFile(length, {"sha256": sha}, PATH, unrecognized_fields={"custom": custom})


def test_a_target_both_repositories_sign_is_installed() -> None:
    decision = decide(PATH, target(DIRECTOR.to_custom()), target(IMAGE.to_custom()), FACTS)
    assert (decision.image.version, decision.length, decision.sha256) == ("2.0.0", 1000, SHA)


@pytest.mark.parametrize(
    ("director", "image", "facts", "reason"),
    [
        (target(DIRECTOR.to_custom()), None, FACTS, RefusalReason.NOT_IN_IMAGE_REPOSITORY),
        (target(DIRECTOR.to_custom(), sha="ef" * 32), target(IMAGE.to_custom()), FACTS,
         RefusalReason.IMAGE_MISMATCH),
        (target(DIRECTOR.to_custom(), length=999), target(IMAGE.to_custom()), FACTS,
         RefusalReason.IMAGE_MISMATCH),
        (target(dataclasses.replace(DIRECTOR, hardware_id="jetson").to_custom()),
         target(IMAGE.to_custom()), FACTS, RefusalReason.WRONG_HARDWARE),
        (target(DIRECTOR.to_custom()), target(IMAGE.to_custom()),
         DeviceFacts("pi-1", "jetson", 0), RefusalReason.WRONG_HARDWARE),
        (target(dataclasses.replace(DIRECTOR, hardware_id="jetson").to_custom()),
         target(IMAGE.to_custom()), DeviceFacts("pi-1", "jetson", 0),
         RefusalReason.HARDWARE_NOT_IN_RELEASE),
        (target(dataclasses.replace(DIRECTOR, device_id="pi-2").to_custom()),
         target(IMAGE.to_custom()), FACTS, RefusalReason.WRONG_DEVICE),
        (target(dataclasses.replace(DIRECTOR, release_counter=2).to_custom()),
         target(dataclasses.replace(IMAGE, release_counter=2).to_custom()), FACTS,
         RefusalReason.BELOW_FLOOR),
        (target(dataclasses.replace(DIRECTOR, release_counter=9).to_custom()),
         target(IMAGE.to_custom()), FACTS, RefusalReason.COUNTER_MISMATCH),
        (target({"edgeota": {"device_id": "pi-1"}}), target(IMAGE.to_custom()), FACTS,
         RefusalReason.MALFORMED_CUSTOM),
        (target(DIRECTOR.to_custom()), target({}), FACTS, RefusalReason.MALFORMED_CUSTOM),
    ],
    ids=["only-in-director", "hash-differs", "length-differs", "director-wrong-hardware",
         "device-wrong-hardware", "release-not-for-hardware", "other-device", "below-floor",
         "counter-mismatch", "malformed-director", "malformed-image"],
)
def test_attacks_are_refused_with_their_reason(
    director: TargetFile, image: TargetFile | None, facts: DeviceFacts, reason: RefusalReason
) -> None:
    with pytest.raises(UptaneRefusal) as caught:
        decide(PATH, director, image, facts)
    assert caught.value.reason is reason
    assert str(caught.value).startswith(str(reason))


def test_rolling_back_to_an_older_version_is_allowed_at_the_same_counter() -> None:
    older = dataclasses.replace(IMAGE, version="1.0.0")
    decision = decide(PATH, target(DIRECTOR.to_custom()), target(older.to_custom()), FACTS)
    assert decision.image.version == "1.0.0"
