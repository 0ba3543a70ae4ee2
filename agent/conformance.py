"""The device's repository client behind tuf-conformance's client-under-test CLI.

`tuf-conformance <https://github.com/theupdateframework/tuf-conformance>`_
runs a TUF client through three commands (its ``CLIENT-CLI.md``)::

    CLIENT --metadata-dir DIR init TRUSTED_ROOT
    CLIENT --metadata-dir DIR --metadata-url URL refresh
    CLIENT --metadata-dir DIR --metadata-url URL --target-name PATH [--target-name ...]
           --target-base-url URL --target-dir DIR download

This adapter answers them with what a device runs, not a bare ngclient: the
Updater the agent opens for each of its repositories
(:func:`~edgeota.agent.repository.open_updater`: a persistent cache whose
root is trusted over the bootstrap), the agent's HTTP fetcher bounded by its
:class:`~edgeota.agent.update_cycle.TransferLimits`, and its persisted clock
floor (:class:`~edgeota.agent.clock.TimeFloor`, kept in ``DIR`` under a name
that is not a ``.json`` file, so the suite does not take it for metadata):
a refresh while the clock is below the floor fails, and a successful one
raises the floor. Exit code 0 on success, 1 on any failure, with the reason on
stderr. ``make conformance`` runs the suite against it
(``scripts/tuf-conformance-client``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import Updater

from edgeota.agent.clock import TimeFloor
from edgeota.agent.repository import open_updater
from edgeota.agent.update_cycle import TransferLimits
from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import atomic_write

__all__ = ["TIME_FLOOR_FILE", "main"]

logger = logging.getLogger(__name__)

#: The clock floor's file in the metadata folder (not ``*.json``: not metadata).
TIME_FLOOR_FILE = ".edgeota-time-floor"
_MAX_ROOT_BYTES = 512 * 1024  # ngclient's own default bound for a root


class ConformanceError(EdgeotaError):
    """A command of the CLI protocol failed for a reason of its own (not ngclient's)."""


def _floor(metadata_dir: Path) -> TimeFloor:
    return TimeFloor(metadata_dir / TIME_FLOOR_FILE, clock=lambda: datetime.now(UTC))


def _updater(args: argparse.Namespace, *, targets: bool = False) -> Updater:
    if not args.metadata_url:
        raise ConformanceError("--metadata-url is required")
    floor = _floor(args.metadata_dir)
    floor.require_trusted()  # a clock set back must not revive expired metadata
    return open_updater(
        args.metadata_dir, args.metadata_url, bootstrap=None,
        fetcher=TransferLimits().http_fetcher(),
        target_dir=args.target_dir if targets else None,
        target_url=args.target_base_url if targets else None)


def init(metadata_dir: Path, trusted_root: Path) -> None:
    """Trust ``trusted_root`` (copied as is: the protocol expects no checks here)."""
    data = trusted_root.read_bytes()
    if len(data) > _MAX_ROOT_BYTES:
        raise ConformanceError(f"{trusted_root} holds {len(data)} bytes, more than a root")
    metadata_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(metadata_dir / "root.json", data)


def refresh(args: argparse.Namespace) -> None:
    """Refresh the top-level metadata as a device's check does, then raise the clock floor."""
    _updater(args).refresh()
    _floor(args.metadata_dir).advance()


def download(args: argparse.Namespace) -> None:
    """Refresh, then fetch each target in order (a cached one with matching hashes is kept)."""
    if not args.target_name or args.target_dir is None or not args.target_base_url:
        raise ConformanceError("download needs --target-name, --target-dir, --target-base-url")
    args.target_dir.mkdir(parents=True, exist_ok=True)
    updater = _updater(args, targets=True)
    updater.refresh()
    for name in args.target_name:
        info = updater.get_targetinfo(name)
        if info is None:
            raise ConformanceError(f"{name} is not a target of the repository")
        if updater.find_cached_target(info) is None:
            updater.download_target(info)
    _floor(args.metadata_dir).advance()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuf-conformance-client",
        description="edgeota's device repository client under tuf-conformance's CLI protocol")
    parser.add_argument("--metadata-dir", type=Path, required=True)
    parser.add_argument("--metadata-url")
    parser.add_argument("--target-name", action="append")
    parser.add_argument("--target-dir", type=Path)
    parser.add_argument("--target-base-url")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    commands = parser.add_subparsers(dest="command", required=True)
    init_parser = commands.add_parser("init", help="trust the given root")
    init_parser.add_argument("trusted_root", type=Path)
    commands.add_parser("refresh", help="refresh the top-level metadata")
    commands.add_parser("download", help="refresh, then download the named targets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose < 2 else logging.DEBUG)
    try:
        if args.command == "init":
            init(args.metadata_dir, args.trusted_root)
        elif args.command == "refresh":
            refresh(args)
        else:
            download(args)
    except (EdgeotaError, tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError,
            OSError, ValueError) as e:
        sys.stderr.write(f"tuf-conformance-client: {args.command}: {type(e).__name__}: {e}\n")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
