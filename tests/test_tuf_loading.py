"""The agent's metadata loader for ngclient: the same answers and refusals, bytes computed once.

Real metadata signed with real keys (tuf's own API), compared with what
ngclient's own loader returns or raises for the same bytes; the end-to-end
refresh over a real repository runs in every agent test (``update_cycle``
installs the loader in each Updater it makes).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.ngclient import Updater
from tuf.ngclient._internal.trusted_metadata_set import _load_from_metadata as ngclient_loader

from edgeota.agent.tuf_loading import canonical_bytes, install, load_from_metadata

EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)


class Repo:
    """Root and targets of a one-key repository, as bytes a client would load."""

    def __init__(self) -> None:
        self.signer = CryptoSigner.generate_ed25519()
        root = Metadata(Root(expires=EXPIRES))
        for role in (Root.type, Targets.type, Snapshot.type, Timestamp.type):
            root.signed.add_key(self.signer.public_key, role)
        root.sign(self.signer)
        self.root = root

    def targets(self, custom: dict[str, Any]) -> bytes:
        targets = Metadata(Targets(expires=EXPIRES))
        targets.signed.targets["models/digits/1.0.0.eotb"] = TargetFile(
            length=5, hashes={"sha256": "ab" * 32}, path="models/digits/1.0.0.eotb",
            unrecognized_fields={"custom": custom})
        targets.sign(self.signer)
        return targets.to_bytes()


CUSTOM = {"name": "digits", "hardware": ["rpi4", "rpi5"], "counter": 7, "flag": True,
          "none": None, "nested": {"b": [1, 2, {"z": "y"}], "a": "é ü 漢字 🙂"}}


def test_canonical_bytes_are_securesystemslib_s_for_real_metadata() -> None:
    repo = Repo()
    for md in (repo.root, Metadata.from_bytes(repo.targets(CUSTOM))):
        signed = md.signed.to_dict()
        assert canonical_bytes(signed) == encode_canonical(signed).encode()


@pytest.mark.parametrize("text", ['a "quoted" word', "back\\slash", "new\nline", "tab\there",
                                  "nul\x00", "bell\x07", "del\x7f", "\u2028 separator"])
def test_canonical_bytes_match_where_the_encoders_escape_differently(text: str) -> None:
    value = {"k": text, "list": [text, {text: 1}]}
    assert canonical_bytes(value) == encode_canonical(value).encode()


def test_the_loader_returns_what_ngclient_s_returns() -> None:
    repo = Repo()
    data = repo.targets(CUSTOM)
    ours = load_from_metadata(Targets, data, repo.root.signed, Targets.type)
    theirs = ngclient_loader(Targets, data, repo.root.signed, Targets.type)
    assert ours == theirs


def refusal(loader: Any, *args: Any) -> type[BaseException]:
    with pytest.raises(Exception) as caught:  # the type is compared with ngclient's
        loader(*args)
    return type(caught.value)


def tampered(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["signed"]["targets"]["models/digits/1.0.0.eotb"]["length"] = 6
    return json.dumps(doc).encode()


def float_custom(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["signed"]["targets"]["models/digits/1.0.0.eotb"]["custom"]["accuracy"] = 0.97
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("case", "expected"), [
    (tampered, exceptions.UnsignedMetadataError),  # a changed byte: the signature fails
    (float_custom, SerializationError),  # canonical JSON has no floats
    (lambda data: data[:-5], DeserializationError),  # truncated
    (lambda data: data.decode().encode("utf-16"), DeserializationError),  # not UTF-8
    (lambda data: data.replace(b'"name"', b'"\\ud800"'), SerializationError),  # no UTF-8
])
def test_the_loader_refuses_what_ngclient_refuses_with_the_same_error(
        case: Any, expected: type[BaseException]) -> None:
    repo = Repo()
    data = case(repo.targets(CUSTOM))
    args = (Targets, data, repo.root.signed, Targets.type)
    assert refusal(load_from_metadata, *args) is expected
    assert refusal(ngclient_loader, *args) is expected


def test_the_wrong_role_and_a_foreign_key_are_refused() -> None:
    repo, other = Repo(), Repo()
    data = repo.targets(CUSTOM)
    with pytest.raises(exceptions.RepositoryError, match="Expected 'snapshot'"):
        load_from_metadata(Snapshot, data, repo.root.signed, Snapshot.type)
    with pytest.raises(exceptions.UnsignedMetadataError):
        load_from_metadata(Targets, data, other.root.signed, Targets.type)


def test_install_puts_the_loader_in_an_updater(tmp_path: Path) -> None:
    repo = Repo()
    updater = Updater(metadata_dir=str(tmp_path), metadata_base_url="https://example.invalid/",
                      bootstrap=repo.root.to_bytes())
    assert install(updater)
    assert updater._trusted_set._load_data is load_from_metadata
    # The trusted set then loads with it: a root's successor is checked over our bytes.
    new_root = Metadata(Root(version=2, expires=EXPIRES + timedelta(days=1)))
    new_root.signed.keys = repo.root.signed.keys
    new_root.signed.roles = repo.root.signed.roles
    new_root.sign(repo.signer)
    updater._trusted_set.update_root(new_root.to_bytes())
    assert updater._trusted_set.root.version == 2
