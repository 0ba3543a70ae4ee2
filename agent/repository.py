"""One TUF repository as the device trusts it: ngclient over a persistent metadata cache.

Both of the device's repositories (director and image) are opened this way on
every check, and so is the repository of the tuf-conformance adapter
(:mod:`edgeota.agent.conformance`): a fresh ``tuf.ngclient.Updater`` each time,
but over a metadata folder that persists. Once a root is cached it is trusted
over the bootstrap root the device was enrolled with (it may be newer:
re-bootstrapping would forget what the device learned), and the cached
timestamp and snapshot are what stop a replayed older one.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tuf.ngclient import FetcherInterface, Updater

__all__ = ["open_updater", "set_reference_time"]


def open_updater(
    metadata_dir: Path,
    metadata_url: str,
    *,
    bootstrap: Callable[[], bytes] | None,
    fetcher: FetcherInterface,
    target_dir: Path | None = None,
    target_url: str | None = None,
    reference_time: datetime | None = None,
) -> Updater:
    """An Updater over ``metadata_dir`` (created if missing), trusting a cached root first.

    ``bootstrap`` reads the root to trust when none is cached yet (``None``:
    one must be cached already). ``reference_time``, when given, is the time
    metadata expiry is judged at instead of the system clock (a device whose
    clock is its own).
    """
    metadata_dir.mkdir(parents=True, exist_ok=True)
    cached_root = metadata_dir / "root.json"
    updater = Updater(
        metadata_dir=str(metadata_dir),
        metadata_base_url=metadata_url,
        target_dir=None if target_dir is None else str(target_dir),
        target_base_url=target_url,
        fetcher=fetcher,
        bootstrap=None if cached_root.exists() or bootstrap is None else bootstrap(),
    )
    if reference_time is not None:
        set_reference_time(updater, reference_time)
    return updater


def set_reference_time(updater: Updater, when: datetime) -> None:
    """Make ``updater`` judge metadata expiry at ``when`` instead of the system clock.

    ngclient (7.0) offers no public way: it fixes the reference time when the
    Updater is made, on its trusted metadata set. A device whose clock is its
    own (the simulator's skewed clocks) needs it, so this one private access
    lives here alone; ``tuf`` is pinned to the major series it was written for
    and ``tests/test_dependency_internals.py`` fails loudly if an upgrade moves it.
    """
    updater._trusted_set.reference_time = when
