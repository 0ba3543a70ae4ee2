"""A ``tuf.ngclient`` fetcher over HTTP(S) that carries the device's credentials.

ngclient's own ``Urllib3Fetcher`` sends no credentials, but a device's
director metadata is served only to that device. This fetcher adds the
device's bearer token (and, over HTTPS, can present its client certificate),
keeps ngclient's error contract (``DownloadHTTPError`` with the status for
4xx/5xx, ``SlowRetrievalError`` on a stalled socket, ``DownloadError``
otherwise), and bounds every wait: a socket silent for ``read_timeout``, and a
server that trickles bytes just fast enough to dodge it (slow retrieval), which
fails once the transfer's average rate stays below ``min_rate`` after
``grace`` seconds.

Devices fetch their repositories with it; ``release publish`` refreshes the
image repository through it (without a token) before signing on top of it, so
it lives in ``edgeota.runtime``, below the agent and the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import urllib3
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

__all__ = ["HttpFetcher", "HttpFetcherConfig"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpFetcherConfig:
    """Limits and credentials; every wait is bounded."""

    token: str | None = None
    connect_timeout: float = 10.0  # seconds
    read_timeout: float = 30.0  # seconds between bytes
    chunk_size: int = 64 * 1024  # bytes
    min_rate: float = 1024.0  # bytes per second, averaged since the transfer began
    grace: float = 120.0  # seconds before the rate counts
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    user_agent: str = "edgeota-agent"

    def __repr__(self) -> str:  # the token is a secret
        return f"HttpFetcherConfig(token={'<set>' if self.token else None}, ...)"


class HttpFetcher(FetcherInterface):
    """Fetch repository files over HTTP(S) with the device's credentials."""

    def __init__(self, config: HttpFetcherConfig | None = None) -> None:
        self._config = config or HttpFetcherConfig()
        headers = {"User-Agent": self._config.user_agent}
        if self._config.token:
            headers["Authorization"] = f"Bearer {self._config.token}"
        self._pool = urllib3.PoolManager(
            headers=headers,
            ca_certs=str(self._config.ca_file) if self._config.ca_file else None,
            cert_file=str(self._config.client_cert) if self._config.client_cert else None,
            key_file=str(self._config.client_key) if self._config.client_key else None,
            retries=False,
        )

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._pool.request(
                "GET",
                url,
                preload_content=False,
                timeout=urllib3.Timeout(
                    connect=self._config.connect_timeout, read=self._config.read_timeout
                ),
            )
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.TimeoutError):
                raise exceptions.SlowRetrievalError from e
            raise exceptions.DownloadError(f"cannot reach {url}: {e.reason}") from e
        if response.status >= 400:
            # Drain (bounded by urllib3) before the connection goes back to the
            # pool: an unread error body would be parsed as the next response.
            response.drain_conn()
            response.release_conn()
            raise exceptions.DownloadHTTPError(f"HTTP {response.status} for {url}",
                                               response.status)
        return self._chunks(response)

    def _chunks(self, response: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
        config = self._config
        started = time.monotonic()
        received = 0
        try:
            # read1, not stream(): stream() blocks until a whole chunk arrived, so a
            # trickle of a few bytes per read_timeout would never be looked at.
            while data := response.read1(config.chunk_size):
                received += len(data)
                elapsed = time.monotonic() - started
                if elapsed > config.grace + received / config.min_rate:
                    raise exceptions.SlowRetrievalError(
                        f"{received} bytes in {elapsed:.1f}s, below {config.min_rate:g} B/s "
                        f"after the {config.grace:g}s grace")
                yield data
        except urllib3.exceptions.ReadTimeoutError as e:
            raise exceptions.SlowRetrievalError from e
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"transfer failed: {e}") from e
        finally:
            response.release_conn()
