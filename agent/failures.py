"""The wire's reason code for whatever ended an update: an explicit table, by type.

The agent reports every failure with a code of
:class:`~edgeota.protocol.reasons.Reason`. The code comes from this table of
exception types (the first that matches, most specific first) or from the
reason an error carries itself (Uptane refusals, the validation gate, the
install errors); never from a class name, so renaming a class cannot change
what the server sees. An exception nobody listed is ``internal_error``: a bug
to look for in the agent's log, not a verdict on the release.
"""

from __future__ import annotations

from tuf.api import exceptions as tuf_exceptions

from edgeota.agent.update_cycle import InstallError
from edgeota.agent.uptane import UptaneRefusal
from edgeota.protocol import errors
from edgeota.protocol.reasons import Reason
from edgeota.runtime.validation import ValidationError

__all__ = ["REASONS_BY_TYPE", "reason_for"]

#: Exception types without a reason of their own, most specific first.
REASONS_BY_TYPE: tuple[tuple[type[BaseException], Reason], ...] = (
    (errors.KeyUnwrapError, Reason.KEY_UNWRAP_FAILED),
    (errors.ManifestError, Reason.MANIFEST_INVALID),
    (errors.UnsafeArchiveError, Reason.UNSAFE_ARCHIVE),
    (errors.BundleIntegrityError, Reason.BUNDLE_CORRUPT),
    (errors.BundleError, Reason.BUNDLE_MALFORMED),
    (errors.UnsupportedSuiteError, Reason.BUNDLE_MALFORMED),
    (tuf_exceptions.ExpiredMetadataError, Reason.EXPIRED_METADATA),
    (tuf_exceptions.BadVersionNumberError, Reason.METADATA_ROLLBACK),
    (tuf_exceptions.UnsignedMetadataError, Reason.UNSIGNED_METADATA),
    (tuf_exceptions.RepositoryError, Reason.BAD_METADATA),
    (tuf_exceptions.DownloadError, Reason.REPOSITORY_UNREACHABLE),
)


def reason_for(error: BaseException) -> Reason:
    """The code the agent reports for ``error``."""
    if isinstance(error, UptaneRefusal):
        return Reason(error.reason)
    if isinstance(error, ValidationError):
        return Reason(error.reason)
    if isinstance(error, InstallError):
        return error.reason
    for kind, reason in REASONS_BY_TYPE:
        if isinstance(error, kind):
            return reason
    return Reason.INTERNAL_ERROR
