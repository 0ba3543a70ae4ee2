"""Why an update failed or was refused: the codes a device puts on the wire.

A device's signed status report carries one of these in ``error`` (and the
journal keeps it as the outcome's ``reason``); the server stores it, counts it
in rollout gates and shows it on the dashboard. They are a closed, documented
enumeration rather than exception class names, so renaming a class can never
change what the wire says, and the server can rely on every value below.

=================================  ==========================================================
code                               meaning
=================================  ==========================================================
``clock_untrusted``                the system clock is below the persisted time floor; no check
``repository_unreachable``         the repositories could not be reached (not reported: retried)
``expired_metadata``               TUF metadata has expired (or the clock is past it)
``metadata_rollback``              TUF metadata older than what the device already trusts
``unsigned_metadata``              TUF metadata without the threshold of valid signatures
``bad_metadata``                   any other TUF metadata refusal (length, hash, format)
``malformed_custom`` …             Uptane refusals, see :class:`UPTANE_REFUSALS`
``key_unwrap_failed``              the content key is not wrapped for this device
``bundle_mismatch``                the bundle's bytes are not the ones both repositories signed
``bundle_too_large``               the server sent more than the signed length (endless data)
``bundle_too_slow``                the transfer stalled or stayed below the minimum rate
``bundle_unavailable``             the bundle could not be fetched (network, broker, refusal)
``bundle_missing``                 a finished download was gone when a restart wanted to open it
``install_metadata_refused``       the image metadata was refused while installing
``target_changed``                 the target changed between the check and the install
``disk_full``                      the state folder has no room for the install
``bundle_corrupt``                 a chunk, the header or the plaintext digest did not verify
``bundle_malformed``               the bundle is not a bundle this device can read
``unsafe_archive``                 the bundle's tar holds a link, an absolute path, ``..``, …
``manifest_invalid``               the manifest is malformed or disagrees with signed metadata
``load_failed`` … ``nan_output``   the validation gate refused the model (see ``ValidationReason``)
``error_rate``                     probation: too many failed inferences
``latency_regression``             probation: p95 latency above the factor of the previous model
``swap_failed``                    the new session could not be put in service
``superseded``                     the director assigned something else while this was under way
``crash_during_swap``              the agent died while swapping; reverted
``crash_during_probation``         the agent died during probation; reverted
``crash_during_swap_repeated``     … for the third time: this target is refused from now on
``crash_during_probation_repeated`` likewise
``state_loop``                     the update hit its save cap (a crash loop): forced to fail
``corrupt_journal``                the journal on disk was unreadable; reset
``model_integrity``                an installed model's files no longer match their pins
``internal_error``                 anything else the agent did not expect (a bug: see its log)
=================================  ==========================================================
"""

from __future__ import annotations

import enum

__all__ = ["TRANSIENT_REASONS", "UPTANE_REFUSALS", "VALIDATION_REASONS", "Reason"]


class Reason(enum.StrEnum):
    """Every failure or refusal code a device reports (see the module table)."""

    CLOCK_UNTRUSTED = "clock_untrusted"
    REPOSITORY_UNREACHABLE = "repository_unreachable"
    # TUF metadata refused while checking
    EXPIRED_METADATA = "expired_metadata"
    METADATA_ROLLBACK = "metadata_rollback"
    UNSIGNED_METADATA = "unsigned_metadata"
    BAD_METADATA = "bad_metadata"
    # Uptane full verification (edgeota.agent.uptane.RefusalReason)
    MALFORMED_CUSTOM = "malformed_custom"
    WRONG_DEVICE = "wrong_device"
    WRONG_HARDWARE = "wrong_hardware"
    NOT_IN_IMAGE_REPOSITORY = "not_in_image_repository"
    IMAGE_MISMATCH = "image_mismatch"
    HARDWARE_NOT_IN_RELEASE = "hardware_not_in_release"
    COUNTER_MISMATCH = "counter_mismatch"
    BELOW_FLOOR = "below_floor"
    # Download and install
    KEY_UNWRAP_FAILED = "key_unwrap_failed"
    BUNDLE_MISMATCH = "bundle_mismatch"
    BUNDLE_TOO_LARGE = "bundle_too_large"
    BUNDLE_TOO_SLOW = "bundle_too_slow"
    BUNDLE_UNAVAILABLE = "bundle_unavailable"
    BUNDLE_MISSING = "bundle_missing"
    INSTALL_METADATA_REFUSED = "install_metadata_refused"
    TARGET_CHANGED = "target_changed"
    DISK_FULL = "disk_full"
    BUNDLE_CORRUPT = "bundle_corrupt"
    BUNDLE_MALFORMED = "bundle_malformed"
    UNSAFE_ARCHIVE = "unsafe_archive"
    MANIFEST_INVALID = "manifest_invalid"
    # Validation gate (edgeota validation's ValidationReason)
    LOAD_FAILED = "load_failed"
    IO_MISMATCH = "io_mismatch"
    VECTORS_MISMATCH = "vectors_mismatch"
    ACCURACY_BELOW_FLOOR = "accuracy_below_floor"
    LATENCY_OVER_BUDGET = "latency_over_budget"
    MEMORY_INSUFFICIENT = "memory_insufficient"
    NAN_OUTPUT = "nan_output"
    # Swap and probation
    ERROR_RATE = "error_rate"
    LATENCY_REGRESSION = "latency_regression"
    SWAP_FAILED = "swap_failed"
    SUPERSEDED = "superseded"
    # Journal and recovery
    CRASH_DURING_SWAP = "crash_during_swap"
    CRASH_DURING_PROBATION = "crash_during_probation"
    CRASH_DURING_SWAP_REPEATED = "crash_during_swap_repeated"
    CRASH_DURING_PROBATION_REPEATED = "crash_during_probation_repeated"
    STATE_LOOP = "state_loop"
    CORRUPT_JOURNAL = "corrupt_journal"
    MODEL_INTEGRITY = "model_integrity"
    INTERNAL_ERROR = "internal_error"


UPTANE_REFUSALS: frozenset[Reason] = frozenset({
    Reason.MALFORMED_CUSTOM, Reason.WRONG_DEVICE, Reason.WRONG_HARDWARE,
    Reason.NOT_IN_IMAGE_REPOSITORY, Reason.IMAGE_MISMATCH, Reason.HARDWARE_NOT_IN_RELEASE,
    Reason.COUNTER_MISMATCH, Reason.BELOW_FLOOR,
})

VALIDATION_REASONS: frozenset[Reason] = frozenset({
    Reason.LOAD_FAILED, Reason.IO_MISMATCH, Reason.VECTORS_MISMATCH,
    Reason.ACCURACY_BELOW_FLOOR, Reason.LATENCY_OVER_BUDGET, Reason.MEMORY_INSUFFICIENT,
    Reason.NAN_OUTPUT,
})

#: Failures that may pass by themselves: the agent retries them with backoff
#: sooner than its next poll (the transfer or the disk, not the release, was the problem).
TRANSIENT_REASONS: frozenset[Reason] = frozenset({
    Reason.REPOSITORY_UNREACHABLE, Reason.BUNDLE_UNAVAILABLE, Reason.BUNDLE_TOO_SLOW,
    Reason.BUNDLE_MISSING, Reason.DISK_FULL,
})
