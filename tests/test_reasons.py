"""Reasons on the wire are a closed enumeration, chosen by type, never by class name."""

from __future__ import annotations

import pytest
from tuf.api import exceptions as tuf_exceptions

from edgeota.agent import update_cycle
from edgeota.agent.failures import reason_for
from edgeota.agent.journal import (
    REASON_CORRUPT_JOURNAL,
    REASON_CRASH_IN_PROBATION,
    REASON_CRASH_IN_SWAP,
    REASON_STATE_LOOP,
)
from edgeota.agent.uptane import RefusalReason, UptaneRefusal
from edgeota.protocol import errors
from edgeota.protocol.reasons import TRANSIENT_REASONS, UPTANE_REFUSALS, VALIDATION_REASONS, Reason
from edgeota.runtime.validation import ValidationError, ValidationReason, ValidationReport


def test_the_agents_own_enumerations_are_the_wires() -> None:
    assert {str(r) for r in RefusalReason} == {str(r) for r in UPTANE_REFUSALS}
    assert {str(r) for r in ValidationReason} == {str(r) for r in VALIDATION_REASONS}
    for code in (REASON_CORRUPT_JOURNAL, REASON_CRASH_IN_PROBATION, REASON_CRASH_IN_SWAP,
                 REASON_STATE_LOOP):
        assert Reason(code)
    assert set(Reason) >= TRANSIENT_REASONS


def test_every_install_error_carries_a_wire_reason() -> None:
    kinds = [value for value in vars(update_cycle).values()
             if isinstance(value, type) and issubclass(value, update_cycle.InstallError)
             and value is not update_cycle.InstallError]
    assert len(kinds) >= 7
    reasons = [kind.reason for kind in kinds]
    assert all(isinstance(r, Reason) for r in reasons)
    assert len(set(reasons)) == len(reasons)  # one code per failure
    assert Reason.INTERNAL_ERROR not in reasons


@pytest.mark.parametrize(("error", "reason"), [
    (tuf_exceptions.ExpiredMetadataError("x"), Reason.EXPIRED_METADATA),
    (tuf_exceptions.BadVersionNumberError("x"), Reason.METADATA_ROLLBACK),
    (tuf_exceptions.UnsignedMetadataError("x"), Reason.UNSIGNED_METADATA),
    (tuf_exceptions.LengthOrHashMismatchError("x"), Reason.BAD_METADATA),
    (tuf_exceptions.SlowRetrievalError("x"), Reason.REPOSITORY_UNREACHABLE),
    (errors.KeyUnwrapError("x"), Reason.KEY_UNWRAP_FAILED),
    (errors.ChunkAuthenticationError("x"), Reason.BUNDLE_CORRUPT),
    (errors.PlaintextDigestError("x"), Reason.BUNDLE_CORRUPT),
    (errors.UnsafeArchiveError("x"), Reason.UNSAFE_ARCHIVE),
    (errors.ManifestError("x"), Reason.MANIFEST_INVALID),
    (errors.MalformedBundleError("x"), Reason.BUNDLE_MALFORMED),
    (update_cycle.BundleTooSlowError("x"), Reason.BUNDLE_TOO_SLOW),
    (update_cycle.DiskFullError("x"), Reason.DISK_FULL),
    (UptaneRefusal(RefusalReason.BELOW_FLOOR, "x"), Reason.BELOW_FLOOR),
    (ValidationError(ValidationReason.VECTORS_MISMATCH, "x",
                     ValidationReport((), None, None)),
     Reason.VECTORS_MISMATCH),
    (RuntimeError("a bug"), Reason.INTERNAL_ERROR),
])
def test_a_failure_maps_to_its_code_by_type(error: BaseException, reason: Reason) -> None:
    assert reason_for(error) is reason


def test_a_renamed_subclass_keeps_its_code() -> None:
    """The wire does not follow class names: a subclass maps as its base does."""
    renamed = type("SomethingElseEntirely", (tuf_exceptions.ExpiredMetadataError,), {})
    assert reason_for(renamed("x")) is Reason.EXPIRED_METADATA
