"""Generate a production Mosquitto setup from an edgeota home: config, ACL and certificates.

Mosquitto is the production single-node broker (DESIGN "Transport"). This
module writes everything it needs into one folder, from the home's fleet CA:

* ``mosquitto.conf`` -- two TLS listeners, each *requiring* a client
  certificate and taking its CN as the MQTT user name
  (``use_identity_as_username``), so what a client sends as user name never
  decides what it may touch:

  - the **device listener** (``port``) trusts the fleet CA and replaces the
    client id a client sends with that CN (``use_username_as_clientid``): a
    client id is bound to its certificate, so a device can never take over
    another device's session, nor the server's (Mosquitto drops whoever held
    a client id when someone connects with it);
  - the **server listener** (``server_port``) trusts only the *services CA*
    (:func:`service_ca`, a second CA kept beside the fleet CA that issues
    nothing but the server's own client certificates), so no device
    certificate even completes the TLS handshake there, and each server
    replica keeps a client id of its own (``_edgeota-server-{tag}``: replicas
    on one broker must not drop each other). ``edgeota serve --broker``
    connects here.

  Mosquitto 2.0 cannot *refuse* a CONNECT whose client id differs from the
  certificate's CN without a plugin of our own: the dynamic-security plugin
  it ships checks a client's ``clientid`` only in its password check, which
  ``use_identity_as_username`` skips, and ``clientid_prefixes`` is one prefix
  for every client. Replacing the id is the strongest it offers: the device
  is connected as itself, whatever id it asked for, and nobody else's
  session changes. (The embedded broker refuses such a CONNECT outright.)
* ``acl`` -- the server identity (``_edgeota-server``) may read and write every
  ``{prefix}/devices/#`` topic; every other identity X, through ``pattern``
  lines with ``%u``, may only *write* ``devices/X/{fetch,status,telemetry,online}``
  and only *read* ``devices/X/{notify,rx}``. Nothing else is granted, and
  Mosquitto denies what no line grants;
* ``ca.crt.pem`` (the fleet CA), ``services-ca.crt.pem`` (the services CA),
  ``server.crt.pem``/``server.key.pem`` (the broker's TLS certificate with the
  given host names and addresses) and ``bridge.crt.pem``/``bridge.key.pem``
  (an edgeota server client identity from the services CA, CN =
  ``SERVER_IDENTITY``; ``edgeota serve`` issues its own at start).

The embedded broker (``edgeota.server.embedded_broker``) enforces the same
rules in Python; ``tests/test_broker_acl.py`` runs one suite against both.

Paths inside ``mosquitto.conf`` are absolute (Mosquitto resolves relative paths
against its working directory, not the config file), so regenerate the folder
after moving it. Every value written into the two files is checked for
characters that could start a new config line or a ``%`` substitution, so no
host name or topic prefix can smuggle a directive or an ACL grant in.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import atomic_write, make_private_dir, write_private_file
from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.topics import DEVICE_PUBLISHES, DEVICE_RECEIVES, Topics
from edgeota.server.config import load_server_config
from edgeota.server.fleet_ca import FleetCA, FleetCAError, certificate_pem, private_key_pem

__all__ = [
    "ACL_FILE",
    "BRIDGE_CERT_FILE",
    "BRIDGE_KEY_FILE",
    "CA_FILE",
    "CONFIG_FILE",
    "MAX_INFLIGHT_MESSAGES",
    "MAX_PACKET_SIZE",
    "MAX_QUEUED_MESSAGES",
    "PERSISTENCE_DIR",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "SERVICE_CA_DIR",
    "SERVICE_CA_FILE",
    "BrokerConfigError",
    "BrokerFiles",
    "render_acl",
    "service_ca",
    "write_mosquitto_config",
    "write_mosquitto_files",
]

CONFIG_FILE = "mosquitto.conf"
ACL_FILE = "acl"
CA_FILE = "ca.crt.pem"
SERVER_CERT_FILE = "server.crt.pem"
SERVER_KEY_FILE = "server.key.pem"
BRIDGE_CERT_FILE = "bridge.crt.pem"
BRIDGE_KEY_FILE = "bridge.key.pem"
PERSISTENCE_DIR = "data"
SERVICE_CA_FILE = "services-ca.crt.pem"
SERVICE_CA_DIR = "services"  # the services CA, inside the fleet CA's folder

# A fetch response chunk carries 64 KiB of data plus a small header; 128 KiB
# leaves room for the header and refuses anything a client has no reason to send.
MAX_PACKET_SIZE = 128 * 1024  # bytes
# Per client. The windowed fetch keeps a few chunks in flight per device; a
# queue this long absorbs a slow device without letting one hog memory
# (1000 x 128 KiB at worst).
MAX_QUEUED_MESSAGES = 1000
MAX_INFLIGHT_MESSAGES = 20

# What may appear in a value written into mosquitto.conf or the ACL: printable
# ASCII without white space. Blocks new lines (a second directive), and '%'
# is refused separately in topics (Mosquitto substitutes %u and %c in patterns).
_SAFE_VALUE_RE = re.compile(r"[\x21-\x7e]+")
_SAFE_PATH_RE = re.compile(r"[^\x00-\x1f\x7f]+")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class BrokerConfigError(EdgeotaError):
    """Broker settings that cannot be written safely (bad host, port, prefix or path)."""


@dataclass(frozen=True)
class BrokerFiles:
    """Where ``write_mosquitto_config`` put each file; all paths are absolute."""

    folder: Path
    config: Path
    acl: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    bridge_cert: Path
    bridge_key: Path
    persistence_dir: Path
    host: str
    port: int  # the device listener
    server_port: int  # the server listener (services CA client certificates only)
    service_ca_cert: Path
    run_as: str | None = None

    def command(self, mosquitto: str = "mosquitto") -> list[str]:
        """The argv that runs Mosquitto with this setup in the foreground."""
        return [mosquitto, "-c", str(self.config)]

    @property
    def server_url(self) -> str:
        """What ``edgeota serve --broker`` takes: the server listener."""
        return f"mqtts://{self.host}:{self.server_port}"


def service_ca(fleet: FleetCA) -> FleetCA:
    """The services CA kept in the fleet CA's folder, created the first time it is asked for.

    It issues only the server's own broker client certificates, so a
    listener that trusts it alone is closed to every device certificate
    (see the module docstring). Whoever holds the fleet CA key holds this
    one too: it separates who may connect where, not who is trusted more.
    """
    folder = fleet.folder / SERVICE_CA_DIR
    try:
        return FleetCA.load(folder)
    except FleetCAError:
        if (folder / "ca.key.pem").exists():
            raise  # there, but unusable: never replace a CA silently
    try:
        return FleetCA.create(folder, common_name="edgeota services CA")
    except FleetCAError:
        return FleetCA.load(folder)  # another process created it first


def _check_host(host: str) -> str:
    if not host or _SAFE_VALUE_RE.fullmatch(host) is None:
        raise BrokerConfigError(f"invalid listener host {host!r}")
    return host


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise BrokerConfigError(f"invalid listener port {port!r}: must be 1..65535")
    return port


def _check_user(user: str) -> str:
    if _USER_RE.fullmatch(user) is None:
        raise BrokerConfigError(f"invalid user name {user!r} for Mosquitto's `user` setting")
    return user


def _check_ips(ips: Sequence[str]) -> list[str]:
    checked = []
    for ip in ips:
        try:
            checked.append(str(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise BrokerConfigError(f"invalid IP address {ip!r} for the broker certificate") from e
    return checked


def _check_path(path: Path) -> str:
    text = str(path)
    if _SAFE_PATH_RE.fullmatch(text) is None or text != text.strip():
        raise BrokerConfigError(
            f"path {text!r} cannot be written into mosquitto.conf (control characters or "
            "leading/trailing white space)"
        )
    return text


def _acl_prefix(topics: Topics) -> str:
    prefix = topics.prefix
    if _SAFE_VALUE_RE.fullmatch(prefix) is None or "%" in prefix:
        raise BrokerConfigError(
            f"topic prefix {prefix!r} cannot be written into a Mosquitto ACL: it must be "
            "printable ASCII without white space or '%'"
        )
    return prefix


def render_acl(topics: Topics = Topics()) -> str:  # noqa: B008 - Topics is frozen
    """The Mosquitto ACL text for ``topics`` (what ``acl`` holds).

    Mosquitto 2.x semantics relied on: with an ``acl_file`` every access no
    line grants is denied; ``user NAME`` starts lines for that user only;
    ``pattern`` lines apply to every client, ``%u`` being the user name, here
    the certificate CN; ``read`` also governs SUBSCRIBE and delivery, ``write``
    governs PUBLISH (including a last will). Device and service names come
    from disjoint alphabets (``edgeota.protocol.identity``), so no device can
    be named like the server, and a device id cannot hold ``/``, ``+`` or ``#``
    to escape its own subtree.
    """
    prefix = _acl_prefix(topics)
    lines = [
        "# edgeota broker ACL (generated by `edgeota broker-config`; regenerate, do not edit).",
        "# Identities are client certificate CNs (use_identity_as_username).",
        "# Anything not granted here is denied.",
        "",
        "# The edgeota server: every device's topics, both directions.",
        f"user {SERVER_IDENTITY}",
        f"topic readwrite {prefix}/devices/#",
        "",
        "# Every device X: publish only on its own device -> server topics ...",
    ]
    lines += [f"pattern write {prefix}/devices/%u/{kind}" for kind in DEVICE_PUBLISHES]
    lines.append("# ... and receive only its own server -> device topics.")
    lines += [f"pattern read {prefix}/devices/%u/{kind}" for kind in DEVICE_RECEIVES]
    return "\n".join(lines) + "\n"


def _render_config(files: BrokerFiles) -> str:
    host = _check_host(files.host)
    port = _check_port(files.port)
    server_port = _check_port(files.server_port)
    if server_port == port:
        raise BrokerConfigError(f"the device and server listeners cannot share port {port}")
    tls = [
        f"certfile {_check_path(files.server_cert)}",
        f"keyfile {_check_path(files.server_key)}",
        "tls_version tlsv1.2",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    return "\n".join([
        "# edgeota Mosquitto 2.x config (generated by `edgeota broker-config`).",
        f"# Run: mosquitto -c {_check_path(files.config)}",
        "",
        "# The security settings below (ACL, no anonymous clients) hold for both listeners.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {_check_path(files.acl)}",
        "",
        "# Devices: a certificate from the fleet CA, whose CN is the MQTT user name the",
        "# ACL sees (a user name the client sends is ignored) and the client id (the one",
        "# the client sends is replaced): no device can take another's session, or the",
        "# server's.",
        f"listener {port} {host}",
        "protocol mqtt",
        f"cafile {_check_path(files.ca_cert)}",
        *tls,
        "use_username_as_clientid true",
        "",
        "# The edgeota server (edgeota serve --broker): a certificate from the services CA",
        "# only, so no device certificate gets in; each replica keeps its own client id.",
        f"listener {server_port} {host}",
        "protocol mqtt",
        f"cafile {_check_path(files.service_ca_cert)}",
        *tls,
        "",
        "# Limits: a 64 KiB fetch chunk plus header fits; queues are per client.",
        f"max_packet_size {MAX_PACKET_SIZE}",
        # Fetch windows are request/response: Nagle would hold each window's last
        # small TLS record for ~40 ms (measured by bench/mqtt_fetch.py).
        "set_tcp_nodelay true",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "",
        "# Retained status and presence survive a broker restart.",
        "persistence true",
        # Mosquitto joins location and file name as strings: the slash matters.
        f"persistence_location {_check_path(files.persistence_dir)}/",
        "autosave_interval 60",
        "",
        *(
            [
                "# Started as root, Mosquitto switches to this user: it must own this folder.",
                f"user {_check_user(files.run_as)}",
                "",
            ]
            if files.run_as is not None
            else []
        ),
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "",
    ])


def write_mosquitto_files(
    ca: FleetCA,
    out: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8883,
    server_port: int | None = None,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    topics: Topics = Topics(),  # noqa: B008 - Topics is frozen
    run_as: str | None = None,
) -> BrokerFiles:
    """Write the Mosquitto setup for an already loaded fleet CA into ``out``.

    ``port`` is the device listener, ``server_port`` (default ``port + 1``)
    the server's; the services CA is created beside the fleet CA if it is
    not there yet (:func:`service_ca`). Issues a new broker server
    certificate and a new server-identity client certificate on every call
    (old ones stay valid until they expire). ``out`` is created 0700 if
    missing: it holds two private keys.

    Mosquitto started as root switches to another user (``mosquitto`` unless
    the config says otherwise) *before* it reads the ACL, and then needs to
    read the 0600 files and write ``data/``. Either start it as the user that
    owns ``out``, or ``chown -R`` ``out`` to the user it runs as and name that
    user in ``run_as`` (written as Mosquitto's ``user`` setting).

    Raises:
        BrokerConfigError: a host, port, host name, address, prefix, user or path
            that cannot be written safely.
    """
    _check_host(host)
    _check_port(port)
    if server_port is None:
        server_port = port + 1 if port < 65535 else port - 1
    _check_port(server_port)
    addresses = _check_ips(ips)
    _acl_prefix(topics)
    folder = Path(out).resolve()
    _check_path(folder)
    files = BrokerFiles(
        folder=folder,
        config=folder / CONFIG_FILE,
        acl=folder / ACL_FILE,
        ca_cert=folder / CA_FILE,
        server_cert=folder / SERVER_CERT_FILE,
        server_key=folder / SERVER_KEY_FILE,
        bridge_cert=folder / BRIDGE_CERT_FILE,
        bridge_key=folder / BRIDGE_KEY_FILE,
        persistence_dir=folder / PERSISTENCE_DIR,
        host=host,
        port=port,
        server_port=server_port,
        service_ca_cert=folder / SERVICE_CA_FILE,
        run_as=run_as,
    )
    # Render both texts before touching the disk, so a refused value leaves nothing behind.
    config_text = _render_config(files)
    acl_text = render_acl(topics)
    try:
        server_key, server_cert = ca.issue_server_certificate(list(hostnames), addresses)
    except ValueError as e:
        raise BrokerConfigError(f"cannot issue the broker certificate: {e}") from e
    services = service_ca(ca)
    bridge_key, bridge_cert = services.issue_service_client_certificate(SERVER_IDENTITY)

    make_private_dir(folder)
    make_private_dir(files.persistence_dir)
    atomic_write(files.ca_cert, ca.certificate_pem())
    atomic_write(files.service_ca_cert, services.certificate_pem())
    write_private_file(files.server_key, private_key_pem(server_key))
    atomic_write(files.server_cert, certificate_pem(server_cert))
    write_private_file(files.bridge_key, private_key_pem(bridge_key))
    atomic_write(files.bridge_cert, certificate_pem(bridge_cert))
    # 0600 like the keys: newer Mosquitto releases refuse an ACL others can read.
    write_private_file(files.acl, acl_text.encode("ascii"))
    atomic_write(files.config, config_text.encode("ascii"))
    return files


def write_mosquitto_config(
    home: Path,
    out: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8883,
    server_port: int | None = None,
    hostnames: Sequence[str] = ("localhost",),
    ips: Sequence[str] = ("127.0.0.1",),
    topics: Topics = Topics(),  # noqa: B008 - Topics is frozen
    run_as: str | None = None,
) -> BrokerFiles:
    """Write a working Mosquitto setup for the home's fleet CA into ``out``.

    ``host``/``port`` is where the device listener binds, ``server_port``
    (default ``port + 1``) the server's (``edgeota serve --broker
    mqtts://HOST:SERVER_PORT``); ``hostnames`` and ``ips``
    are the names clients use to reach it (the server certificate's SANs,
    which agents check). ``run_as`` is the user a root-started Mosquitto
    switches to (see :func:`write_mosquitto_files`). Returns the paths
    written; ``BrokerFiles.command()`` is the argv that runs it.

    Raises:
        ConfigError: ``home`` is not an edgeota home.
        FleetCAError: the home's fleet CA cannot be loaded.
        BrokerConfigError: see :func:`write_mosquitto_files`.
    """
    config = load_server_config(Path(home))
    ca = FleetCA.load(config.ca_dir)
    return write_mosquitto_files(
        ca, out, host=host, port=port, server_port=server_port, hostnames=hostnames, ips=ips,
        topics=topics, run_as=run_as,
    )
