"""Hostile HTTP clients against a real ``edgeota serve`` process (issue 21, items 2, 6, 7, 3).

Each test is an attack over loopback sockets on a child ``edgeota serve``
(no MQTT) whose ``[http]`` limits are short so the attacks end fast, and each
asserts the exact refusal (status and code), that the server's resident
memory (psutil, the child process alone) stayed within :data:`RSS_BOUND` of
where it started, that other clients were served meanwhile, and that nothing
changed. Huge bodies are generated lazily and sent only as fast as the server
reads them: a server that refuses early stops the client early. Every loop
is bounded in time (:data:`ATTACK_SECONDS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import tomli_w
from server_support import run_cli, wait_for

from edgeota.runtime.agent_config import AgentConfig
from edgeota.server.api.app import redact_paths
from edgeota.server.config import (
    ConfigError,
    HttpLimits,
    UploadLimits,
    load_operator_config,
    load_server_config,
)
from edgeota.server.embedded import bind_loopback
from edgeota.server.home import HomeOptions, init_home
from edgeota.server.services.errors import ErrorCode

MiB = 1024 * 1024
RSS_BOUND = 64 * MiB  # growth of the server's RSS any one attack may cause
ATTACK_SECONDS = 20.0  # no attack runs longer
START_TIMEOUT = 60.0
LIMITS = HttpLimits(head_timeout_seconds=1.0, body_idle_seconds=1.5, body_grace_seconds=1.0,
                    body_min_bytes_per_second=1024)
UPLOADS = UploadLimits(max_bundle_bytes=8 * MiB, quota_bytes=12 * MiB, stale_hours=1.0)
CODES = {str(code) for code in ErrorCode}


@dataclass
class Served:
    """The child server and the credentials the attacks use."""

    url: str
    port: int
    home: Path
    process: subprocess.Popen[bytes]
    admin: str
    viewer: str
    device_id: str
    device_token: str

    def rss(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    @property
    def uploads(self) -> Path:
        return load_server_config(self.home).blob_dir / "uploads"

    def api(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def healthy_within(self, seconds: float) -> float:
        """Time one ordinary request takes; fails if it is not answered 200 in ``seconds``."""
        started = time.monotonic()
        response = httpx.get(f"{self.url}/healthz", timeout=seconds)
        assert response.status_code == 200
        return time.monotonic() - started

    def audit_entries(self) -> int:
        with self.api(self.admin) as http:
            verified = http.get("/api/v1/audit/verify").json()
        assert verified["ok"], verified
        return int(verified["entries"])


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hostile")
    probe = bind_loopback()
    port = probe.getsockname()[1]
    probe.close()  # the child binds it next
    home = root / "home"
    init_home(home, HomeOptions(http=f"127.0.0.1:{port}", bin_bits=4))
    config = dataclasses.replace(load_server_config(home), http_limits=LIMITS, uploads=UPLOADS)
    config.save()
    log = root / "serve.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgeota.cli", "serve", "--home", str(home), "--no-mqtt"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or _healthy(url), START_TIMEOUT,
                 "edgeota serve to answer /healthz")
        assert process.poll() is None, log.read_text()
        admin = load_operator_config(home).token()
        enrolled = run_cli("device", "enroll", "pi-1", "--hardware", "rpi4",
                           "--out", str(root / "pi-1"), "--home", str(home))
        assert enrolled.code == 0, enrolled.err
        device_token = AgentConfig.load(root / "pi-1" / "agent.toml").token()
        with httpx.Client(base_url=url, timeout=10,
                          headers={"Authorization": f"Bearer {admin}"}) as http:
            viewer = http.post("/api/v1/tokens", json={"name": "viewer", "role": "viewer"})
        assert viewer.status_code == 201, viewer.text
        yield Served(url, port, home, process, admin, viewer.json()["token"], "pi-1",
                     device_token)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


# -- a raw client: what a hostile one writes, byte for byte ------------------------------


@dataclass
class Answer:
    """What the server said (``status`` None: it closed without answering)."""

    status: int | None
    headers: dict[str, str]
    body: bytes
    sent: int  # bytes of the request body that got onto the wire
    seconds: float

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    def code(self) -> object:
        return self.json().get("code")


@dataclass
class PeakRss:
    """The server's resident memory: where it started and the most it reached."""

    served: Served
    baseline: int = 0
    peak: int = 0

    def __post_init__(self) -> None:
        self.baseline = self.peak = self.served.rss()

    def sample(self) -> None:
        self.peak = max(self.peak, self.served.rss())

    @property
    def growth(self) -> int:
        self.sample()
        print(f"server RSS {self.baseline / MiB:.1f} MiB, peak {self.peak / MiB:.1f} MiB "
              f"(+{(self.peak - self.baseline) / MiB:.1f} MiB)")
        return self.peak - self.baseline


def chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked body of ``total`` bytes, made as it is sent (never held whole)."""
    block = b"%x\r\n" % size + b"x" * size + b"\r\n"
    for _ in range(total // size):
        yield block
    yield b"0\r\n\r\n"


def _head(method: str, path: str, token: str | None = None, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_answer(sock: socket.socket, deadline: float) -> tuple[int | None, dict[str, str],
                                                                bytes]:
    data = b""
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            more = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not more:
            break
        data += more
    if b"\r\n\r\n" not in data:
        return None, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length and time.monotonic() < deadline:
        try:
            more = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not more:
            break
        body += more
    return int(status_line.split()[1]), headers, body


def send_attack(served: Served, head: bytes, body: Iterator[bytes] | None = None, *,
                on_progress: Callable[[], None] = lambda: None,
                seconds: float = ATTACK_SECONDS) -> Answer:
    """Send ``head``, then ``body`` as fast as the server reads it, until it answers."""
    body = body if body is not None else iter(())
    started = time.monotonic()
    deadline = started + seconds
    sent = 0
    next_sample = MiB
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(head)
        pending: bytes | None = b""
        while time.monotonic() < deadline:
            if not pending:
                pending = next(body, None)
                if pending is None:
                    break
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:  # the server answered, or closed: a refusal stops the client
                break
            if writable:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    break
                pending, sent = pending[n:], sent + n
                if sent >= next_sample:
                    on_progress()
                    next_sample += MiB
        status, headers, answer = _read_answer(sock, deadline)
    return Answer(status, headers, answer, sent, time.monotonic() - started)


def assert_refused(answer: Answer, status: int, code: ErrorCode, served: Served) -> None:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.code() == str(code), answer.body[:300]
    assert str(served.home) not in answer.body.decode("utf-8", "replace")


# -- item 2: authentication first, every body capped while it streams --------------------


def test_chunked_800mb_post_without_a_token_is_refused_unread(served: Served) -> None:
    entries = served.audit_entries()
    rss = PeakRss(served)
    answer = send_attack(
        served, _head("POST", "/api/v1/tokens", Content_Type="application/json",
                      Transfer_Encoding="chunked"),
        chunked(800 * MiB), on_progress=rss.sample)
    assert_refused(answer, 401, ErrorCode.UNAUTHENTICATED, served)
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.headers["connection"] == "close"
    # Refused on its head: what left the client is what the sockets' buffers held.
    assert answer.sent < 64 * MiB, answer.sent
    assert rss.growth < RSS_BOUND, rss.growth
    # A wrong token is refused the same way; a valid viewer's body stops at the JSON cap.
    wrong = send_attack(served, _head("POST", "/api/v1/tokens", "eot_not-a-token",
                                      Transfer_Encoding="chunked"), chunked(800 * MiB))
    assert_refused(wrong, 401, ErrorCode.UNAUTHENTICATED, served)
    viewer = send_attack(served, _head("POST", "/api/v1/tokens", served.viewer,
                                       Content_Type="application/json",
                                       Transfer_Encoding="chunked"),
                         chunked(800 * MiB), on_progress=rss.sample)
    assert_refused(viewer, 413, ErrorCode.TOO_LARGE, served)
    assert viewer.sent < 64 * MiB
    assert rss.growth < RSS_BOUND, rss.growth
    assert served.audit_entries() == entries  # nothing was issued or recorded
    served.healthy_within(2.0)


def test_device_report_stops_reading_at_its_16kib_cap(served: Served) -> None:
    path = f"/api/v1/devices/{served.device_id}/reports"
    rss = PeakRss(served)
    streamed = send_attack(served, _head("POST", path, served.device_token,
                                         Transfer_Encoding="chunked"),
                           chunked(400 * MiB), on_progress=rss.sample)
    assert_refused(streamed, 413, ErrorCode.TOO_LARGE, served)
    assert streamed.headers["connection"] == "close"
    assert streamed.sent < 64 * MiB
    assert rss.growth < RSS_BOUND, rss.growth
    # A declared length above the cap is refused before a byte of the body is sent.
    declared = send_attack(served, _head("POST", path, served.device_token,
                                         Content_Length=str(100 * MiB)))
    assert_refused(declared, 413, ErrorCode.TOO_LARGE, served)
    assert declared.sent == 0
    # Just over the cap, sent whole: the same refusal.
    over = 16 * 1024 + 1
    whole = send_attack(served, _head("POST", path, served.device_token,
                                      Content_Length=str(over)), iter([b"{" * over]))
    assert_refused(whole, 413, ErrorCode.TOO_LARGE, served)
    # No token at all: 401 before the body.
    anonymous = send_attack(served, _head("POST", path, Transfer_Encoding="chunked"),
                            chunked(400 * MiB))
    assert_refused(anonymous, 401, ErrorCode.UNAUTHENTICATED, served)


def test_blob_uploads_are_capped_while_they_stream(served: Served) -> None:
    path = f"/api/v1/blobs/{'ab' * 32}"
    rss = PeakRss(served)
    streamed = send_attack(served, _head("PUT", path, served.admin, Transfer_Encoding="chunked"),
                           chunked(400 * MiB), on_progress=rss.sample)
    assert_refused(streamed, 413, ErrorCode.TOO_LARGE, served)
    assert UPLOADS.max_bundle_bytes < streamed.sent < 64 * MiB
    assert rss.growth < RSS_BOUND, rss.growth
    assert list(served.uploads.iterdir()) == []  # the partial file is gone
    declared = send_attack(served, _head("PUT", path, served.admin,
                                         Content_Length=str(UPLOADS.max_bundle_bytes + 1)))
    assert_refused(declared, 413, ErrorCode.TOO_LARGE, served)
    assert declared.sent == 0
    # A viewer may not upload: refused before the body is read, the connection closed.
    viewer = send_attack(served, _head("PUT", path, served.viewer, Transfer_Encoding="chunked"),
                         chunked(400 * MiB), on_progress=rss.sample)
    assert_refused(viewer, 403, ErrorCode.FORBIDDEN, served)
    assert viewer.headers["connection"] == "close"
    assert viewer.sent < 64 * MiB
    assert rss.growth < RSS_BOUND, rss.growth


def _upload(served: Served, content: bytes) -> httpx.Response:
    sha = hashlib.sha256(content).hexdigest()
    with served.api(served.admin) as http:
        return http.put(f"/api/v1/blobs/{sha}", content=content)


def test_uploads_have_a_quota_and_stale_ones_are_swept(served: Served) -> None:
    first = os.urandom(7 * MiB)
    assert _upload(served, first).status_code == 200
    kept = served.uploads / hashlib.sha256(first).hexdigest()
    assert kept.stat().st_size == len(first)
    # 7 MiB held; 7 MiB more passes the 12 MiB quota, declared or streamed.
    second = os.urandom(7 * MiB)
    refused = _upload(served, second)
    assert refused.status_code == 413 and refused.json()["code"] == "quota_exceeded"
    streamed = send_attack(served, _head("PUT", f"/api/v1/blobs/{'cd' * 32}", served.admin,
                                         Transfer_Encoding="chunked"), chunked(7 * MiB))
    assert_refused(streamed, 413, ErrorCode.QUOTA_EXCEEDED, served)
    assert [p.name for p in served.uploads.iterdir()] == [kept.name]
    # Never submitted: once older than [uploads] stale_hours, the next upload sweeps it.
    old = time.time() - UPLOADS.stale_hours * 3600 - 60
    os.utime(kept, (old, old))
    assert _upload(served, second).status_code == 200
    assert not kept.exists()
    for leftover in served.uploads.iterdir():
        leftover.unlink()


# -- slowloris: heads and bodies trickled byte by byte -----------------------------------


def _trickle(served: Served, sock: socket.socket, byte: bytes, interval: float,
             deadline: float) -> tuple[float | None, list[float]]:
    """Send ``byte`` every ``interval`` until the server closes or answers.

    Between two bytes another client's request is timed. Returns when the
    server cut this connection (None: it never did before ``deadline``) and
    the other requests' durations.
    """
    others: list[float] = []
    while time.monotonic() < deadline:
        try:
            sock.send(byte)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic(), others
        readable, _, _ = select.select([sock], [], [], interval)
        if readable:
            return time.monotonic(), others
        others.append(served.healthy_within(2.0))
    return None, others


def test_slowloris_head_is_cut_while_others_are_served(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        opened = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        cut, others = _trickle(served, sock, b"a", 0.1, opened + ATTACK_SECONDS)
        assert cut is not None, "a trickled request head was never cut"
        assert LIMITS.head_timeout_seconds * 0.8 <= cut - opened
        assert cut - opened < LIMITS.head_timeout_seconds + 3
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1024) == b""  # closed: half a request gets no answer
    assert len(others) >= 3 and max(others) < 1.0, others
    # A connection that sends nothing at all is cut the same way.
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as idle:
        opened = time.monotonic()
        idle.settimeout(LIMITS.head_timeout_seconds + 3)
        with contextlib.suppress(ConnectionResetError):
            assert idle.recv(1024) == b""
        assert time.monotonic() - opened < LIMITS.head_timeout_seconds + 3
    # A head larger than [http] max_head_bytes: refused whole (431) or, trickled in
    # pieces, by the parser (h11 caps what it buffers of an incomplete head).
    huge = send_attack(served, _head("GET", "/healthz", X_Big="a" * LIMITS.max_head_bytes))
    assert_refused(huge, 431, ErrorCode.TOO_LARGE, served)
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(2 * LIMITS.max_head_bytes // 1024):
                sock.sendall(b"a" * 1024)
        status, _, _ = _read_answer(sock, time.monotonic() + 5)
    assert status == 400  # uvicorn's plain "Invalid HTTP request received."
    # A Content-Length no integer could hold: the parser refuses it before the app.
    absurd = send_attack(served, _head("POST", "/api/v1/deployments", served.admin,
                                       Content_Length="9" * 30))
    assert absurd.status == 400


def test_slowloris_body_is_cut_while_others_are_served(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        opened = time.monotonic()
        sock.sendall(_head("POST", "/api/v1/tokens", served.admin,
                           Content_Type="application/json", Content_Length="4000"))
        cut, others = _trickle(served, sock, b" ", 0.1, opened + ATTACK_SECONDS)
        assert cut is not None, "a trickled body was never cut"
        status, headers, body = _read_answer(sock, time.monotonic() + 5)
    answer = Answer(status, headers, body, 0, cut - opened)
    assert_refused(answer, 408, ErrorCode.REQUEST_TIMEOUT, served)
    assert headers["connection"] == "close"
    assert b"below 1024" in body
    assert answer.seconds < LIMITS.body_grace_seconds + 3
    assert len(others) >= 3 and max(others) < 1.0, others
    # A body that stops: refused after [http] body_idle_seconds without a byte.
    stalled = send_attack(served, _head("POST", "/api/v1/tokens", served.admin,
                                        Content_Type="application/json",
                                        Content_Length="4000"), iter([b"{" * 10]))
    assert_refused(stalled, 408, ErrorCode.REQUEST_TIMEOUT, served)
    assert LIMITS.body_idle_seconds * 0.8 <= stalled.seconds < LIMITS.body_idle_seconds + 3


# -- item 6: 4xx, never 500, for what the client got wrong -------------------------------


@dataclass(frozen=True)
class Case:
    what: str
    method: str
    path: str
    token: str  # "admin", "device" or "" (none)
    body: bytes = b""
    status: tuple[int, ...] = (422,)
    codes: tuple[str, ...] = (str(ErrorCode.INVALID_BODY),)
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


HUGE_ID = "99999999999999999999999"
DEEP = b"[" * 100_000 + b"]" * 100_000
# The report parser (protocol/reports) refuses these as a malformed report, rejected and
# audited like any other (422 refused); were json to raise past it, the route's own guard
# would answer 400 bad_data, never a 500.
REPORT_REFUSAL = {"status": (422,), "codes": (str(ErrorCode.REFUSED),)}
CASES = [
    Case("a deployment id past 64 bits", "GET", f"/api/v1/deployments/{HUGE_ID}", "admin"),
    Case("a release id past 64 bits", "GET", f"/api/v1/releases/{HUGE_ID}", "admin"),
    Case("pausing an id past 64 bits", "POST", f"/api/v1/deployments/{HUGE_ID}/pause", "admin"),
    Case("signing an id past 64 bits", "POST", f"/api/v1/releases/{HUGE_ID}/signatures",
         "admin", b'{"bin_metadata": {}}'),
    Case("a negative id", "GET", "/api/v1/deployments/-1", "admin"),
    Case("NaN in a deployment", "POST", "/api/v1/deployments", "admin",
         b'{"name": "digits", "version": "1.0.0", "options": {"soak_seconds": NaN}}'),
    Case("Infinity in a deployment", "POST", "/api/v1/deployments", "admin",
         b'{"name": "digits", "version": "1.0.0", "options": {"latency_factor": Infinity}}'),
    Case("-Infinity in a deployment", "POST", "/api/v1/deployments", "admin",
         b'{"name": "digits", "version": "1.0.0", "options": {"min_success_ratio": -Infinity}}'),
    Case("deeply nested JSON body", "POST", "/api/v1/deployments", "admin", DEEP, (400,),
         (str(ErrorCode.INVALID_REQUEST),)),
    Case("an integer of 5000 digits", "POST", "/api/v1/deployments", "admin",
         b'{"name": "digits", "version": "1", "phases": [' + b"1" * 5000 + b"]}", (400,),
         (str(ErrorCode.INVALID_REQUEST),)),
    Case("a deeply nested report envelope", "POST", "/api/v1/devices/pi-1/reports", "device",
         b'{"v": 1, "report": ' + b"[" * 8000 + b"]" * 8000 + b"}", **REPORT_REFUSAL),
    Case("a report envelope with a 5000-digit integer", "POST",
         "/api/v1/devices/pi-1/reports", "device", b'{"v": ' + b"7" * 5000 + b"}",
         **REPORT_REFUSAL),
    Case("a tag key with markup", "POST", "/api/v1/devices", "admin",
         json.dumps({"device_id": "pi-9", "hardware": "rpi4", "identity": {},
                     "tls_public_key_pem": "x", "tags": {"<b>": "x"}}).encode()),
    Case("a tag value of 129 characters", "POST", "/api/v1/devices", "admin",
         json.dumps({"device_id": "pi-9", "hardware": "rpi4", "identity": {},
                     "tls_public_key_pem": "x", "tags": {"site": "x" * 129}}).encode()),
    Case("a tag value with a control character", "POST", "/api/v1/devices", "admin",
         json.dumps({"device_id": "pi-9", "hardware": "rpi4", "identity": {},
                     "tls_public_key_pem": "x", "tags": {"site": "a\u0007b"}}).encode()),
    Case("an unknown API path without a token", "GET", "/api/v1/nothing-here", "", b"",
         (401,), (str(ErrorCode.UNAUTHENTICATED),)),
    Case("a repository file name that is no file", "GET", "/repo/image/metadata/..json", "",
         b"", (404,), (str(ErrorCode.NOT_FOUND),)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_client_mistakes_are_4xx_with_a_code(served: Served, case: Case) -> None:
    token = {"admin": served.admin, "device": served.device_token, "": ""}[case.token]
    headers = dict(case.headers)
    if "content-length" not in headers:
        headers["content-length"] = str(len(case.body))
    head = _head(case.method, case.path, token or None,
                 **{k.replace("-", "_"): v for k, v in headers.items()})
    answer = send_attack(served, head, iter([case.body]) if case.body else None)
    assert answer.status in case.status, (answer.status, answer.body[:300])
    body = answer.json()  # it serialised: no NaN inside, whatever was sent
    assert body["code"] in case.codes and body["code"] in CODES, body
    text = answer.body.decode()
    assert str(served.home) not in text and "/tmp/" not in text
    if body["code"] == str(ErrorCode.INVALID_BODY):  # fields named, the input never echoed
        assert all(set(e) <= {"type", "loc", "msg"} for e in body["detail"]), body
    served.healthy_within(2.0)


# -- the limits are settings: validated when server.toml is read -------------------------


@pytest.mark.parametrize(("section", "name", "value", "error"), [
    ("http", "head_timeout_seconds", 0, "must be a positive number"),
    ("http", "max_json_bytes", 1.5, "must be a positive integer"),
    ("http", "body_min_bytes_per_second", True, "must be a positive integer"),
    ("http", "body_idle_seconds", float("nan"), "must be a positive number"),
    ("uploads", "quota_bytes", -1, "must be a positive integer"),
    ("uploads", "stale_hours", "24", "must be a positive number"),
    ("uploads", "max_bundle", 1, "unknown uploads settings"),
])
def test_limits_in_server_toml_are_validated(tmp_path: Path, section: str, name: str,
                                             value: object, error: str) -> None:
    home = tmp_path / "home"
    init_home(home, HomeOptions(bin_bits=4))
    config = load_server_config(home)
    assert (config.http_limits, config.uploads) == (HttpLimits(), UploadLimits())
    path = home / "server.toml"
    data = tomllib.loads(path.read_text())
    data[section][name] = value
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(ConfigError, match=error):
        load_server_config(home)


def test_error_details_name_no_server_path() -> None:
    roots = ("/srv/edgeota/home", "/tmp")
    onnx = ("[ONNXRuntimeError] : 3 : NO_SUCHFILE : Load model from "
            "/srv/edgeota/home/blobs/uploads/tmpab12/bundle/model.onnx failed")
    assert redact_paths(onnx, roots) == (
        "[ONNXRuntimeError] : 3 : NO_SUCHFILE : Load model from <path> failed")
    # A home whose name has a space is still found whole.
    assert redact_paths("cannot open '/srv/my home/server.toml'", ("/srv/my home",)) == (
        "cannot open '<path>'")
    assert redact_paths("[Errno 2] No such file: '/var/lib/x/y.json'") == (
        "[Errno 2] No such file: '<path>'")
    # What is not a server path stays: target paths, URLs, versions, ratios.
    kept = ("target path must be 'digits/1.0.0.bundle'; see http://127.0.0.1:8742/repo/x "
            "(1/2 phases, ratio 3/4)")
    assert redact_paths(kept, roots) == kept
