"""Where product code relies on a dependency's internals: still there, or a loud failure here.

* tuf (agent): see below.
* uvicorn (server): ``server.api.serving`` subclasses ``H11Protocol`` to give request heads
  a deadline (slowloris), using its ``conn``, ``transport``, ``loop`` and
  ``on_response_complete``; uvicorn is pinned to the minor series this was written for.

``edgeota.agent.repository.set_reference_time`` sets the time ngclient judges
metadata expiry by (python-tuf 7.0 offers no public way: the trusted set fixes
it when the Updater is made). ``tuf`` is pinned to the series this was written
for; an upgrade that moves the attribute breaks this test, not a device.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError, ExpiredMetadataError
from tuf.api.metadata import Metadata, Root, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from edgeota.agent.repository import set_reference_time


def test_tuf_is_the_series_the_agent_was_written_for() -> None:
    major = int(version("tuf").split(".")[0])
    assert major == 7, f"tuf {version('tuf')}: re-check set_reference_time, then the pin"


class _OnlyATimestamp(FetcherInterface):
    """A repository with no newer root and a timestamp, and nothing else (404)."""

    def __init__(self, timestamp: bytes) -> None:
        self._timestamp = timestamp

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.endswith("/timestamp.json"):
            return iter([self._timestamp])
        raise DownloadHTTPError(f"{url}: not found", 404)


@pytest.mark.parametrize(("when", "expired"), [(datetime(2031, 1, 1, tzinfo=UTC), True),
                                               (datetime(2029, 1, 1, tzinfo=UTC), False)])
def test_setting_the_reference_time_changes_what_ngclient_judges_expired(
        tmp_path: Path, when: datetime, expired: bool) -> None:
    from securesystemslib.signer import CryptoSigner

    signer = CryptoSigner.generate_ed25519()
    root = Metadata(Root(expires=datetime(2030, 1, 1, tzinfo=UTC)))
    for role in ("root", "timestamp", "snapshot", "targets"):
        root.signed.add_key(signer.public_key, role)
    root.sign(signer)
    timestamp = Metadata(Timestamp(expires=datetime(2030, 1, 1, tzinfo=UTC)))
    timestamp.sign(signer)
    updater = Updater(str(tmp_path), "http://127.0.0.1:9/metadata/", str(tmp_path),
                      fetcher=_OnlyATimestamp(timestamp.to_bytes()), bootstrap=root.to_bytes())
    set_reference_time(updater, when)
    # The timestamp arrives, and the root (expiring 2030) is judged at ``when``;
    # unexpired, ngclient goes on to a snapshot the repository does not have.
    with pytest.raises(ExpiredMetadataError if expired else DownloadHTTPError):
        updater.refresh()


def test_uvicorn_is_the_series_the_head_deadline_was_written_for() -> None:
    assert version("uvicorn").split(".")[:2] == ["0", "55"], (
        f"uvicorn {version('uvicorn')}: re-check server/api/serving.py, then the pin")


def test_h11_protocol_still_has_what_the_head_deadline_uses() -> None:
    import inspect

    from uvicorn.protocols.http.h11_impl import H11Protocol

    init = inspect.getsource(H11Protocol.__init__)
    made = inspect.getsource(H11Protocol.connection_made)
    assert "self.conn = " in init and "self.loop = " in init
    assert "self.transport = " in made
    assert callable(H11Protocol.on_response_complete)
    assert list(inspect.signature(H11Protocol.on_response_complete).parameters) == ["self"]
