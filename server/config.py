"""The edgeota home folder and the two config files in it.

A home holds two configs on purpose:

* ``server.toml`` -- what the server process reads: database, blob store,
  HTTP bind, expiry periods and the *online* keys (snapshot, timestamp,
  director, key-wrap). Nothing in it can sign a release.
* ``operator.toml`` -- what the operator CLI reads: the server URL, the API
  token file and the *release* keys. The server never opens it, which is what
  makes "a stolen server cannot publish a model" true even in a dev home where
  both files sit side by side.

Paths in the files are relative to the home unless absolute, so a home can
be moved. Settings are validated when loaded, with errors that name the file
and the field.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import atomic_write, write_private_file

__all__ = [
    "OPERATOR_CONFIG",
    "SERVER_CONFIG",
    "ConfigError",
    "ExpirySettings",
    "HttpLimits",
    "KeyRef",
    "OperatorConfig",
    "ServerConfig",
    "UploadLimits",
    "load_operator_config",
    "load_server_config",
]

SERVER_CONFIG = "server.toml"
OPERATOR_CONFIG = "operator.toml"
DEFAULT_HTTP = "127.0.0.1:8742"
_MAX_CONFIG_SIZE = 256 * 1024
_MAX_EXPIRY_DAYS = 100 * 366  # a century: beyond any key's life, far from datetime's end
_MAX_REFRESH_SECONDS = 30 * 86400
_Limits = TypeVar("_Limits", "HttpLimits", "UploadLimits")


class ConfigError(EdgeotaError):
    """A home folder or config file that is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class KeyRef:
    """A signing key: its securesystemslib URI and the file holding its public key."""

    uri: str
    public_key: Path

    def to_toml(self, home: Path) -> dict[str, str]:
        return {"uri": self.uri, "public": _relative(self.public_key, home)}


@dataclass(frozen=True)
class ExpirySettings:
    """How long each role's metadata stays valid; online roles are re-signed before that."""

    root_days: float = 365
    targets_days: float = 365
    bins_days: float = 365
    snapshot_days: float = 7
    timestamp_days: float = 1
    director_targets_days: float = 30
    director_snapshot_days: float = 7
    director_timestamp_days: float = 1
    refresh_interval_seconds: float = 300

    def as_timedeltas(self) -> dict[str, timedelta]:
        return {
            name.removesuffix("_days"): timedelta(days=value)
            for name, value in self.__dict__.items()
            if name.endswith("_days")
        }


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may make the server hold or wait for (``[http]`` in server.toml).

    Every byte of a request is the client's to choose: a request head must be
    complete within ``head_timeout_seconds`` of its first byte (or of the
    connection, or of the previous response: slowloris), and a body must keep
    coming, at no less than ``body_min_bytes_per_second`` on average once
    ``body_grace_seconds`` have passed and with no pause longer than
    ``body_idle_seconds``. Bodies are capped per route while they stream
    (``max_json_bytes`` for the JSON routes; bundles by ``[uploads]``).
    """

    head_timeout_seconds: float = 10.0
    body_idle_seconds: float = 15.0
    body_grace_seconds: float = 10.0
    body_min_bytes_per_second: int = 1024
    max_head_bytes: int = 16 * 1024  # request line + headers (h11's incomplete-event cap)
    max_json_bytes: int = 1024 * 1024  # a JSON request body (a deployment's device list: 8x)
    max_connections: int = 1024  # past this uvicorn answers 503
    keep_alive_seconds: int = 5
    session_hours: float = 12.0  # how long a dashboard sign-in lasts


@dataclass(frozen=True)
class UploadLimits:
    """Bundles uploaded before their release is submitted (``[uploads]`` in server.toml).

    An upload that no pending release holds is removed once the release is
    refused or published, or after ``stale_hours`` if it is never submitted;
    all uploads together (partial ones included) stay under ``quota_bytes``.
    """

    max_bundle_bytes: int = 4 * 1024**3
    quota_bytes: int = 16 * 1024**3
    stale_hours: float = 24.0


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs; holds no release key by construction."""

    home: Path
    database_url: str
    blob_dir: Path
    http_host: str
    http_port: int
    public_url: str
    image_snapshot_key: KeyRef
    image_timestamp_key: KeyRef
    director_key: KeyRef
    keywrap_key: Path
    ca_dir: Path
    expiry: ExpirySettings = field(default_factory=ExpirySettings)
    # "embedded" runs the in-process broker on mqtt_bind; a mqtts:// URL names an
    # external broker. Devices are told mqtt_device_url either way.
    mqtt_broker: str = "embedded"
    mqtt_bind: str = "127.0.0.1:8883"
    mqtt_device_url: str = "mqtts://127.0.0.1:8883"
    # How often the rollout engine looks at active deployments (seconds).
    rollout_interval_seconds: float = 5.0
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    uploads: UploadLimits = field(default_factory=UploadLimits)

    def to_toml(self) -> dict[str, Any]:
        return {
            "server": {
                "database": self.database_url,
                "blobs": _relative(self.blob_dir, self.home),
                "http": f"{self.http_host}:{self.http_port}",
                "public_url": self.public_url,
                "ca": _relative(self.ca_dir, self.home),
            },
            "online_keys": {
                "image_snapshot": self.image_snapshot_key.to_toml(self.home),
                "image_timestamp": self.image_timestamp_key.to_toml(self.home),
                "director": self.director_key.to_toml(self.home),
                "keywrap": _relative(self.keywrap_key, self.home),
            },
            "expiry": dict(self.expiry.__dict__),
            "mqtt": {"broker": self.mqtt_broker, "bind": self.mqtt_bind,
                     "device_url": self.mqtt_device_url},
            "rollouts": {"interval_seconds": self.rollout_interval_seconds},
            "http": dict(self.http_limits.__dict__),
            "uploads": dict(self.uploads.__dict__),
        }

    def save(self) -> None:
        atomic_write(self.home / SERVER_CONFIG, tomli_w.dumps(self.to_toml()).encode())


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator CLI needs: where the server is, how to log in, how to sign releases."""

    home: Path
    server_url: str
    token_file: Path
    release_keys: tuple[KeyRef, ...]
    root_keys: tuple[KeyRef, ...] = ()
    director_root_keys: tuple[KeyRef, ...] = ()
    # Pinned at init: release content keys are wrapped to this key only, and
    # new devices bootstrap from these roots, never from what a server says.
    keywrap_public: Path | None = None
    trusted_image_root: Path | None = None
    trusted_director_root: Path | None = None

    def token(self) -> str:
        from edgeota.protocol.files import read_private_file

        try:
            return read_private_file(self.token_file, 4096).decode("ascii").strip()
        except FileNotFoundError as e:
            raise ConfigError(f"API token file {self.token_file} does not exist") from e

    def to_toml(self) -> dict[str, Any]:
        operator = {
            "server_url": self.server_url,
            "token_file": _relative(self.token_file, self.home),
        }
        for name in ("keywrap_public", "trusted_image_root", "trusted_director_root"):
            value = getattr(self, name)
            if value is not None:
                operator[name] = _relative(value, self.home)
        return {
            "operator": operator,
            "release_keys": [k.to_toml(self.home) for k in self.release_keys],
            "root_keys": [k.to_toml(self.home) for k in self.root_keys],
            "director_root_keys": [k.to_toml(self.home) for k in self.director_root_keys],
        }

    def save(self) -> None:
        # 0600: it names the token file and the key URIs an attacker would look for.
        write_private_file(self.home / OPERATOR_CONFIG, tomli_w.dumps(self.to_toml()).encode())


def _relative(path: Path, home: Path) -> str:
    try:
        return str(path.relative_to(home))
    except ValueError:
        return str(path)


def _read(home: Path, name: str) -> dict[str, Any]:
    path = home / name
    if not path.is_file():
        raise ConfigError(f"{path} not found: is {home} an edgeota home? (create one with "
                          "`edgeota init --home DIR`)")
    with path.open("rb") as source:  # at most one byte past the bound, whatever the size
        raw = source.read(_MAX_CONFIG_SIZE + 1)
    if len(raw) > _MAX_CONFIG_SIZE:
        raise ConfigError(f"{path} is larger than {_MAX_CONFIG_SIZE} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    # ValueError: bad UTF-8 or TOML (both subclass it) and integers past CPython's
    # 4300-digit limit; RecursionError: arrays or tables nested past the parser's stack.
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def _field(data: dict[str, Any], dotted: str, kind: type, where: Path) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{where}: missing {dotted}")
        value = value[part]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {dotted} must be a {kind.__name__}")
    return value


def _path(home: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else home / path


def _key(home: Path, data: dict[str, Any], dotted: str, where: Path) -> KeyRef:
    table = _field(data, dotted, dict, where)
    uri, public = table.get("uri"), table.get("public")
    if not isinstance(uri, str) or not isinstance(public, str):
        raise ConfigError(f"{where}: {dotted} needs string fields uri and public")
    return KeyRef(uri=uri, public_key=_path(home, public))


def parse_http(value: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    host, sep, port = value.rpartition(":")
    # isascii: str.isdigit also accepts digits int() cannot read ("²").
    if (not sep or not host or not port.isascii() or not port.isdigit()
            or not 0 <= int(port) < 65536):
        raise ConfigError(f"{where}: HTTP address {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def load_server_config(home: Path) -> ServerConfig:
    home = home.resolve()
    where = home / SERVER_CONFIG
    data = _read(home, SERVER_CONFIG)
    host, port = parse_http(_field(data, "server.http", str, where), str(where))
    expiry_table = data.get("expiry", {})
    if not isinstance(expiry_table, dict):
        raise ConfigError(f"{where}: [expiry] must be a table")
    known = set(ExpirySettings.__dataclass_fields__)
    unknown = set(expiry_table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown expiry settings {sorted(unknown)}")
    for name, value in expiry_table.items():
        # Bounded, so every period is a timedelta that dates can add (no inf, NaN, or
        # a root expiring past the year 9999): the server converts them on start.
        limit = _MAX_REFRESH_SECONDS if name == "refresh_interval_seconds" else _MAX_EXPIRY_DAYS
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not 0 < value <= limit):
            raise ConfigError(f"{where}: expiry.{name} must be a number in (0, {limit}]")
    return ServerConfig(
        home=home,
        database_url=_field(data, "server.database", str, where),
        blob_dir=_path(home, _field(data, "server.blobs", str, where)),
        http_host=host,
        http_port=port,
        public_url=_field(data, "server.public_url", str, where).rstrip("/"),
        image_snapshot_key=_key(home, data, "online_keys.image_snapshot", where),
        image_timestamp_key=_key(home, data, "online_keys.image_timestamp", where),
        director_key=_key(home, data, "online_keys.director", where),
        keywrap_key=_path(home, _field(data, "online_keys.keywrap", str, where)),
        ca_dir=_path(home, _field(data, "server.ca", str, where)),
        expiry=ExpirySettings(**expiry_table),
        rollout_interval_seconds=_rollout_interval(data, where),
        http_limits=_limits(HttpLimits, data, "http", where),
        uploads=_limits(UploadLimits, data, "uploads", where),
        **_mqtt_settings(data, where),
    )


def _limits(kind: type[_Limits], data: dict[str, Any], section: str, where: Path) -> _Limits:
    """A limits dataclass from its table: known names only, each a positive number.

    A limit of the wrong type or sign would silently switch a protection off,
    so it is an error that names the field rather than a default.
    """
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(table) - set(fields)
    if unknown:
        raise ConfigError(f"{where}: unknown {section} settings {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, value in table.items():
        want_int = fields[name].type in ("int", int)
        if (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
                or value != value or value == float("inf")
                or (want_int and not isinstance(value, int))):
            raise ConfigError(f"{where}: {section}.{name} must be a positive "
                              f"{'integer' if want_int else 'number'}")
        values[name] = value
    return kind(**values)


def _rollout_interval(data: dict[str, Any], where: Path) -> float:
    table = data.get("rollouts", {})
    if not isinstance(table, dict) or set(table) - {"interval_seconds"}:
        raise ConfigError(f"{where}: [rollouts] takes only interval_seconds")
    value = table.get("interval_seconds", ServerConfig.rollout_interval_seconds)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 3600:
        raise ConfigError(f"{where}: rollouts.interval_seconds must be a number in (0, 3600]")
    return float(value)


def _mqtt_settings(data: dict[str, Any], where: Path) -> dict[str, str]:
    table = data.get("mqtt", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [mqtt] must be a table")
    settings = {}
    for key, name in (("broker", "mqtt_broker"), ("bind", "mqtt_bind"),
                      ("device_url", "mqtt_device_url")):
        if key in table:
            if not isinstance(table[key], str):
                raise ConfigError(f"{where}: mqtt.{key} must be a string")
            settings[name] = table[key]
    return settings


def load_operator_config(home: Path) -> OperatorConfig:
    home = home.resolve()
    where = home / OPERATOR_CONFIG
    data = _read(home, OPERATOR_CONFIG)

    def keys(section: str) -> tuple[KeyRef, ...]:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{where}: {section} must be an array of tables")
        return tuple(_key(home, {"k": entry}, "k", where) for entry in entries)

    def optional_path(name: str) -> Path | None:
        value = data.get("operator", {}).get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{where}: operator.{name} must be a string")
        return _path(home, value)

    return OperatorConfig(
        home=home,
        server_url=_field(data, "operator.server_url", str, where).rstrip("/"),
        token_file=_path(home, _field(data, "operator.token_file", str, where)),
        release_keys=keys("release_keys"),
        root_keys=keys("root_keys"),
        director_root_keys=keys("director_root_keys"),
        keywrap_public=optional_path("keywrap_public"),
        trusted_image_root=optional_path("trusted_image_root"),
        trusted_director_root=optional_path("trusted_director_root"),
    )
