"""Exception types of the wire contract, split by what went wrong.

Every failure a reader of untrusted bytes can hit has its own type, so callers
(and attack tests) can tell a tampered byte from a truncated file from a key
meant for another device. All of them derive from ``ProtocolError``; none is
retryable: bad data stays bad.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleIntegrityError",
    "ChunkAuthenticationError",
    "ChunkOrderError",
    "EdgeotaError",
    "HeaderAuthenticationError",
    "KeyUnwrapError",
    "MalformedBundleError",
    "MalformedKeyError",
    "ManifestError",
    "PlaintextDigestError",
    "ProtocolError",
    "SealedDigestError",
    "TrailingDataError",
    "TruncatedBundleError",
    "UnsafeArchiveError",
    "UnsupportedSuiteError",
]


class EdgeotaError(Exception):
    """Base of every error edgeota raises on purpose; the CLI prints its message and exits 1."""


class ProtocolError(EdgeotaError):
    """Base of every error raised while reading or writing wire-format data."""


class UnsupportedSuiteError(ProtocolError):
    """A suite id, format version or algorithm name this build does not know."""


class MalformedKeyError(ProtocolError):
    """Key material that does not parse (wrong size, bad encoding)."""


class KeyUnwrapError(ProtocolError):
    """A wrapped content key that does not open with this device's private key."""


class BundleError(ProtocolError):
    """Base of errors about a sealed bundle."""


class MalformedBundleError(BundleError):
    """Not a sealed bundle at all: bad magic, short header, impossible sizes."""


class BundleIntegrityError(BundleError):
    """Base of authentication failures: the bytes are not what was sealed."""


class HeaderAuthenticationError(BundleIntegrityError):
    """The header's MAC does not verify: the header was edited or the key is not this bundle's."""


class ChunkAuthenticationError(BundleIntegrityError):
    """A chunk's AEAD tag does not verify: its bytes were modified."""


class ChunkOrderError(BundleIntegrityError):
    """A chunk authenticates, but at another position: chunks were reordered or duplicated."""


class TruncatedBundleError(BundleIntegrityError):
    """The stream ends before the chunk sealed as the last one."""


class TrailingDataError(BundleIntegrityError):
    """Bytes follow the chunk sealed as the last one."""


class SealedDigestError(BundleIntegrityError):
    """The sealed file does not hash to the target hash in signed metadata."""


class PlaintextDigestError(BundleIntegrityError):
    """The decrypted stream does not hash to the digest in signed metadata."""


class ManifestError(BundleError):
    """The bundle's manifest is missing, oversized or does not match the schema."""


class UnsafeArchiveError(BundleError):
    """A tar member that could escape the target folder or exhaust the disk."""
