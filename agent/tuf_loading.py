"""Metadata loading for ``tuf.ngclient`` with the signed bytes computed once, in C.

ngclient verifies every metadata file it loads -- the device's cached copies
at the start of each refresh as well as the new ones: it parses the file,
serialises the signed part again as canonical JSON and checks the signatures
over those bytes. It computes those bytes twice per file (once to verify, once
to return them), with securesystemslib's pure-Python encoder. On a device that
refreshes two repositories per check that was a third of the refresh's CPU
(``bench/fleet.py``).

:func:`load_from_metadata` makes the same checks in the same order, computing
the bytes once with :func:`canonical_bytes`: the standard library's C encoder
where its output is canonical JSON byte for byte, securesystemslib's encoder
otherwise. A file this loader does not take as it is (a float, another
encoding, anything that does not parse) goes to ngclient's own loader, so its
errors are ngclient's. A wrong byte in the computed form could only make a
signature check fail, never pass: the signatures are over the canonical bytes.

:func:`install` puts the loader into one ``Updater``'s trusted metadata set
(private to ngclient: it checks that the attribute is the loader it replaces,
and leaves an Updater of another ngclient version as it is).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from securesystemslib.formats import encode_canonical
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Signature, Signed
from tuf.ngclient import Updater

try:  # private to ngclient: without it, Updaters keep their own loader
    from tuf.ngclient._internal.trusted_metadata_set import (
        _load_from_metadata as _NGCLIENT_LOADER,
    )
except ImportError:  # pragma: no cover - another ngclient
    _NGCLIENT_LOADER = None

__all__ = ["canonical_bytes", "install", "load_from_metadata"]

T = TypeVar("T", bound=Signed)


class _HasFloat(ValueError):
    """Canonical JSON has no floats: such a file is left to ngclient's loader."""


def _no_float(_text: str) -> Any:
    raise _HasFloat


def canonical_bytes(signed: dict[str, Any]) -> bytes:
    """The OLPC canonical JSON of ``signed`` (parsed from JSON: string keys, no floats).

    The C encoder with sorted keys, no spaces and no ASCII escaping writes the
    same bytes as securesystemslib's ``encode_canonical``, except where it
    escapes: both write ``\\"`` and ``\\\\``, but only the C encoder escapes
    control characters. So any backslash in its output sends the value to
    ``encode_canonical`` (rare: paths and hashes hold none).
    """
    text = json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    if "\\" in text:
        text = encode_canonical(signed)  # type: ignore[assignment]
    return text.encode("utf-8")


def load_from_metadata(
    role: type[T],
    data: bytes,
    delegator: Any = None,
    role_name: str | None = None,
) -> tuple[T, bytes, dict[str, Signature]]:
    """ngclient's ``_load_from_metadata``, with the signed bytes computed once.

    Returns the payload, its canonical bytes and its signatures; verifies
    against ``delegator`` when one is given (as ngclient does).

    Raises:
        RepositoryError: the payload is not of type ``role``.
        UnsignedMetadataError: the signatures do not meet the threshold.
        DeserializationError: (from ngclient's loader) the file does not parse.
    """
    try:
        parsed = json.loads(data.decode("utf-8"), parse_float=_no_float,
                            parse_constant=_no_float)
        md: Metadata[T] = Metadata.from_dict(parsed)
    except Exception:  # noqa: BLE001 - ngclient's loader raises its own error for it
        return _NGCLIENT_LOADER(role, data, delegator, role_name)
    if md.signed.type != role.type:
        raise exceptions.RepositoryError(f"Expected '{role.type}', got '{md.signed.type}'")
    try:
        signed_bytes = canonical_bytes(md.signed.to_dict())
    except Exception:  # noqa: BLE001 - e.g. a lone surrogate: ngclient's error for it
        return _NGCLIENT_LOADER(role, data, delegator, role_name)
    if delegator:
        delegator.verify_delegate(role_name or role.type, signed_bytes, md.signatures)
    return md.signed, signed_bytes, md.signatures


def install(updater: Updater) -> bool:
    """Load ``updater``'s metadata with :func:`load_from_metadata`; ``False`` if not possible.

    Only when the Updater's trusted set loads with the ngclient function this
    module was written against (the ``METADATA`` envelope of this ngclient).
    """
    trusted = getattr(updater, "_trusted_set", None)
    if (_NGCLIENT_LOADER is None or trusted is None
            or getattr(trusted, "_load_data", None) is not _NGCLIENT_LOADER):
        return False
    trusted._load_data = load_from_metadata
    return True
