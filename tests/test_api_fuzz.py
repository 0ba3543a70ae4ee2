"""API fuzzing (issue 21): schemathesis against the live OpenAPI of ``/api/v1``.

A real server (uvicorn on a loopback socket, SQLite) with an enrolled device,
a published release and a deployment, so ids and names the fuzzer sends can
name real rows. For every operation of ``/api/v1``:

* with an admin token, schemathesis' generated requests (valid and invalid)
  never get a 5xx, and every response matches the schema: a documented
  status, its content type, a body of its schema (every error is ``ErrorOut``);
* no token, a viewer's and a device's: an operation answers 2xx only to the
  roles :data:`REQUIRED` allows, and the table must name every operation the
  server documents, so a new route cannot slip past it.

The agent's inference endpoint serves no OpenAPI document; its routes are
fuzzed with hypothesis (:func:`test_inference_endpoint_never_fails_on_client_input`).

Budget: ``EDGEOTA_FUZZ_API_EXAMPLES`` examples per operation and role (a few
in ``make test``; ``make fuzz-api`` runs hundreds).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_support import RunningServer, running_server

from edgeota.agent.inference_server import InferenceServer
from edgeota.agent.model_host import ModelHost
from edgeota.runtime.agent_config import AgentConfig
from edgeota.runtime.validation import SessionSettings
from edgeota.samples import SampleModel
from edgeota.server.manifest_builder import build_manifest
from edgeota.server.tokens import Role

EXAMPLES = int(os.environ.get("EDGEOTA_FUZZ_API_EXAMPLES", "6"))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
ANY = None  # any valid token, of any role (a device's included)

# The least role each operation needs (ANY: any authenticated caller). An operator role
# allows the ones below it; DEVICE is apart: only a device token allows it.
REQUIRED: dict[tuple[str, str], Role | None] = {
    ("GET", "/api/v1/whoami"): ANY,
    ("GET", "/api/v1/keywrap-key"): ANY,
    ("POST", "/api/v1/tokens"): Role.ADMIN,
    ("GET", "/api/v1/audit/verify"): Role.VIEWER,
    ("POST", "/api/v1/devices"): Role.OPERATOR,
    ("GET", "/api/v1/devices"): Role.VIEWER,
    ("GET", "/api/v1/devices/{device_id}"): Role.VIEWER,
    ("POST", "/api/v1/devices/{device_id}/reports"): Role.DEVICE,
    ("PUT", "/api/v1/blobs/{sha256}"): Role.RELEASE_MANAGER,
    ("POST", "/api/v1/releases"): Role.RELEASE_MANAGER,
    ("POST", "/api/v1/releases/{release_id}/signatures"): Role.RELEASE_MANAGER,
    ("GET", "/api/v1/releases"): Role.VIEWER,
    ("GET", "/api/v1/releases/{release_id}"): Role.VIEWER,
    ("POST", "/api/v1/deployments"): Role.OPERATOR,
    ("GET", "/api/v1/deployments"): Role.VIEWER,
    ("GET", "/api/v1/deployments/{deployment_id}"): Role.VIEWER,
    ("POST", "/api/v1/deployments/{deployment_id}/pause"): Role.OPERATOR,
    ("POST", "/api/v1/deployments/{deployment_id}/resume"): Role.OPERATOR,
    ("POST", "/api/v1/deployments/{deployment_id}/cancel"): Role.OPERATOR,
    ("POST", "/api/v1/deployments/{deployment_id}/rollback"): Role.OPERATOR,
}
# What a caller whose role falls short may get: refused by its role, or before that by
# the body's size or parse (the body is parsed before any route code runs). Never a 2xx.
SHORT_ROLE = {400, 403, 413, 422}
COUNTS: Counter[str] = Counter()


@dataclass
class Target:
    server: RunningServer
    tokens: dict[str, str]  # "admin", "viewer", "device"

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"} if who in self.tokens else {}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz-api")
    with running_server(root, f"sqlite:///{root / 'edgeota.db'}") as server:
        device_dir = server.enroll("pi-1", "rpi4", "site=lab")
        published = server.publish("digits_v1", "1.0.0")
        assert published.code == 0, published.err
        deployed = server.cli("deploy", "digits@1.0.0", "--devices", "pi-1")
        assert deployed.code == 0, deployed.err
        tokens = {"admin": server.operator.token(), "viewer": server.token(Role.VIEWER),
                  "device": AgentConfig.load(device_dir / "agent.toml").token()}
        yield Target(server, tokens)
    print(f"schemathesis cases per check: {dict(sorted(COUNTS.items()))}")


@pytest.fixture(scope="module")
def api_schema(target: Target) -> Any:
    return schemathesis.openapi.from_url(f"{target.server.url}/openapi.json")


OPERATIONS = sorted(REQUIRED)


def _cases(api_schema: Any, operation: tuple[str, str]) -> st.SearchStrategy[Any]:
    """Requests schemathesis generates for ``operation``: valid ones and invalid ones."""
    found = api_schema.find_operation_by_label(" ".join(operation))
    assert found is not None, operation
    return st.one_of(found.as_strategy(GenerationMode.POSITIVE),
                     found.as_strategy(GenerationMode.NEGATIVE))


def test_the_role_table_names_every_operation(target: Target) -> None:
    document = httpx.get(f"{target.server.url}/openapi.json").json()
    documented = {(method.upper(), path) for path, item in document["paths"].items()
                  if path.startswith("/api/v1/") for method in item}
    assert documented == set(REQUIRED)


@pytest.mark.parametrize("operation", OPERATIONS, ids=[" ".join(o) for o in OPERATIONS])
def test_no_5xx_and_every_response_matches_the_schema(
    api_schema: Any, target: Target, operation: tuple[str, str],
) -> None:
    @FUZZ_SETTINGS
    @given(case=_cases(api_schema, operation))
    def run(case: Any) -> None:
        case.call_and_validate(headers=target.headers("admin"), checks=CHECKS)
        COUNTS["admin"] += 1

    run()


def _allows(who: str, required: Role | None) -> bool:
    if who == "anonymous":
        return False
    role = {"admin": Role.ADMIN, "viewer": Role.VIEWER, "device": Role.DEVICE}[who]
    return required is ANY or role.allows(required)


@pytest.mark.parametrize("operation", OPERATIONS, ids=[" ".join(o) for o in OPERATIONS])
def test_no_operation_answers_a_lesser_role(
    api_schema: Any, target: Target, operation: tuple[str, str],
) -> None:
    required = REQUIRED[operation]

    @FUZZ_SETTINGS
    @given(case=_cases(api_schema, operation))
    def run(case: Any) -> None:
        for who in ("anonymous", "viewer", "device"):
            response = case.call(headers=target.headers(who))
            COUNTS[who] += 1
            assert response.status_code < 500, (who, response.status_code, response.text[:300])
            if who == "anonymous":
                assert response.status_code == 401, (response.status_code, response.text[:300])
                assert response.json()["code"] == "unauthenticated"
            elif not _allows(who, required) or (
                    who == "device" and case.path_parameters.get("device_id", "pi-1") != "pi-1"):
                # A device acts for itself only: another device's id in the path is a 403.
                assert response.status_code in SHORT_ROLE, (who, response.status_code,
                                                            response.text[:300])
            else:
                assert response.status_code not in (401, 403), (who, response.text[:300])

    run()


# -- the agent's inference endpoint (no OpenAPI document: hypothesis) --------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=20)
_DIMS = st.lists(st.one_of(st.integers(-2, 70), st.integers(0, 2**64)), max_size=4)
_TENSOR = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "x", "", "float_input"]),
     "shape": _DIMS | _JSON,
     "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BOOL", "BYTES", "FP16", "nope"]),
     "data": st.lists(st.floats(allow_nan=True) | st.integers() | st.booleans(), max_size=70)
     | _JSON},
    optional={"parameters": _JSON})
_INFER = st.fixed_dictionaries({"inputs": st.lists(_TENSOR, max_size=3) | _JSON},
                               optional={"id": _JSON, "outputs": _JSON, "parameters": _JSON})
_BODY = st.one_of(
    _INFER.map(lambda v: json.dumps(v).encode()),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 5000).map(lambda n: b'{"inputs": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(4301, 6000).map(lambda n: b'{"inputs": [], "id": ' + b"9" * n + b"}"),
)
# An integer past sys.get_int_max_str_digits() (4300): Python's json raises ValueError.
HUGE_INT_BODIES = [b'{"inputs": [], "id": ' + b"9" * 4301 + b"}",
                   b'{"inputs": [{"name": "input", "shape": [1, ' + b"9" * 5000
                   + b'], "datatype": "FP32", "data": []}]}']
_PATHS = st.sampled_from(["/v2/models/digits/infer", "/v2/models/digits/versions/1.0.0/infer",
                          "/v2/models/nope/infer", "/v2/models/digits", "/v2/models/digits/ready",
                          "/v2/health/ready", "/v2/health/live", "/v2", "/v2/models/%00/infer"])
# What the endpoint may answer a client; a 5xx would be the server's fault.
AGENT_STATUSES = {200, 400, 404, 405, 413, 415, 422}


@pytest.fixture(scope="module")
def inference(catalog: dict[str, SampleModel], tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[InferenceServer]:
    sample = catalog["digits_v1"]
    manifest = build_manifest(sample.path, name="digits", version=sample.version,
                              hardware=["rpi4"], vectors=sample.vectors_path)
    host = ModelHost(SessionSettings())
    host.load("digits", sample.version, sample.path, manifest)
    with InferenceServer(host) as server:
        yield server


@settings(max_examples=max(20, EXAMPLES * 10), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(path=_PATHS, method=st.sampled_from(["POST", "GET", "PUT"]), body=_BODY,
       content_type=st.sampled_from(["application/json", "application/octet-stream", "",
                                     "text/plain"]))
def test_inference_endpoint_never_fails_on_client_input(
    inference: InferenceServer, path: str, method: str, body: bytes, content_type: str,
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.request(method, f"{inference.url}{path}", content=body, headers=headers,
                             timeout=10)
    COUNTS["agent"] += 1
    assert response.status_code in AGENT_STATUSES, (
        method, path, content_type, body[:200], response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert "error" in response.json()
    assert httpx.get(f"{inference.url}/v2/health/live", timeout=5).status_code == 200


@pytest.mark.parametrize("body", HUGE_INT_BODIES, ids=["id", "shape"])
def test_inference_endpoint_refuses_integers_past_4300_digits(
    inference: InferenceServer, body: bytes,
) -> None:
    response = httpx.post(f"{inference.url}/v2/models/digits/infer", content=body,
                          headers={"content-type": "application/json"}, timeout=10)
    assert response.status_code == 400, response.text[:300]
    assert httpx.get(f"{inference.url}/v2/health/live", timeout=5).status_code == 200
