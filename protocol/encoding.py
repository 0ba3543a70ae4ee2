"""Base64 for key material and signatures in JSON, strict on the way in."""

from __future__ import annotations

import base64
import binascii

from edgeota.protocol.errors import ProtocolError

__all__ = ["b64decode_field", "b64encode"]


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode_field(value: object, field: str, error: type[ProtocolError]) -> bytes:
    """Decode a base64 field of a parsed document, raising ``error`` that names the field."""
    if not isinstance(value, str):
        raise error(f"field {field!r} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise error(f"field {field!r} is not valid base64") from e
