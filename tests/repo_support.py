"""Network-free TUF plumbing shared by the repository tests (like python-tuf's simulator)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import unquote

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface

from edgeota.server.repo.storage import RepoFileNotFoundError, RepoStore

BASE = "http://repo.test/"


class StoreFetcher(FetcherInterface):
    """Serves ``http://repo.test/{repository path}`` from the store, 404 for anything else."""

    def __init__(self, store: RepoStore) -> None:
        self.store = store

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(BASE):
            raise DownloadHTTPError(f"unknown host in {url}", 404)
        try:
            path = self.store.file_for_request(unquote(url[len(BASE):]))
        except RepoFileNotFoundError as e:
            raise DownloadHTTPError(str(e), 404) from e
        return iter([path.read_bytes()])


class Clock:
    """An injectable clock the test moves by hand."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now
