"""api/openapi.yaml: valid OpenAPI 3.1, served as it is written, naming exactly the routes
and methods the app serves, and true of a real gunicorn under property-based requests.

The property-based run (schemathesis) is seeded and bounded so it fits the ordinary test
run; a longer one: `SCHEMATHESIS_MAX_EXAMPLES=500 .venv/bin/pytest
tests/integration/test_openapi.py` (`SCHEMATHESIS_SEED=N` picks another seed).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.inspect
import hypothesis
import pytest
import schemathesis
import yaml
from hypothesis import strategies as st
from openapi_spec_validator import validate

from api.app import Collaborators, create_app
from api.console import PATHS as CONSOLE_PATHS
from api.errors import TABLE, TYPE_PREFIX
from api.openapi import load_document
from tests import images, servers
from tests.http import Api
from tests.integration.conftest import ALICE_KEY

DOCUMENT = Path(__file__).resolve().parents[2] / "api" / "openapi.yaml"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "100"))
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20261121"))
# What the run asserts of every answer (and nothing else: e.g. not that every generated
# request that breaks the schema is refused, which `?v=` and `Range` rightly never are).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)


def documented_operations() -> dict[str, set[str]]:
    document = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    return {
        path: {method.upper() for method in item if method in HTTP_METHODS}
        for path, item in document["paths"].items()
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    document = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises, naming the first invalid part


def test_the_package_ships_the_document() -> None:
    """What the app loads (package data) is the file in the repository."""
    assert load_document() == yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))


def test_the_served_json_is_the_yaml_document_without_a_key(api: Api) -> None:
    resp = api.request("GET", "/v1/openapi.json", key=None)
    assert resp.status == 200, resp.body
    assert resp.header("Content-Type") == "application/json"
    assert resp.json == yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))


def test_the_exemption_from_auth_is_that_path_alone(api: Api) -> None:
    assert api.request("GET", "/v1/openapi.yaml", key=None).status == 404
    assert api.request("GET", "/v1/images", key=None).status == 401


def test_every_route_and_method_is_documented_and_nothing_else(services: Collaborators) -> None:
    """The app's routes (falcon's public inspect API) and the methods each resource
    implements (`on_get`...; falcon's own OPTIONS/405 responders are not ours) equal the
    document's paths and operations, both ways. The web console's static files (exactly
    api/console.py `PATHS`, GET and HEAD) are a page, not API operations: not documented."""
    served = {
        route.path: {m.method for m in route.methods if not m.internal}
        for route in falcon.inspect.inspect_routes(create_app(services))
    }
    assert served, "falcon.inspect found no routes: has its API changed?"
    console = {path: served.pop(path) for path in CONSOLE_PATHS}
    assert all(methods == {"GET", "HEAD"} for methods in console.values()), console
    assert served == documented_operations()


def test_every_problem_type_is_documented() -> None:
    """Every type in the error table (and the readiness and falcon-made ones) appears in
    the document, so a new domain error cannot be added without describing it."""
    text = DOCUMENT.read_text(encoding="utf-8")
    slugs = {slug for _, slug, _ in TABLE.values()} | {"not-ready", "range-not-satisfiable"}
    missing = sorted(slug for slug in slugs if f'"{TYPE_PREFIX}{slug}"' not in text)
    assert not missing, f"problem types not in api/openapi.yaml: {missing}"


# --- property-based: schemathesis against the session's gunicorn ---------------------------

SAMPLE_ID = "holiday-1"  # the document's example id (ImageId), so examples hit a real image


@pytest.fixture()
def sample(api: Api, run_jobs: Callable[[], None]) -> dict[str, Any]:
    """One converted image under the documented example id, so downloads, events and
    deletion reach their 200/206/304 answers, not only 404s. (Every operation is a test of
    its own: the autouse `clean` fixture empties Redis and the bucket before each.)"""
    resp = api.upload(images.png(300, 200), SAMPLE_ID)
    assert resp.status == 201, resp.body
    run_jobs()
    record: dict[str, Any] = api.request("GET", f"/v1/images/{SAMPLE_ID}").json
    assert record["status"] == "ready", record
    assert any(v["name"] == "w256.webp" for v in record["variants"]), record
    return record


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + images.chunk(b"IHDR", ihdr)


def image_bodies() -> st.SearchStrategy[bytes]:
    """Small upload bodies that reach every verdict of the head: valid images (201),
    truncated or damaged headers (422), formats we refuse and noise (415), nothing (400)."""
    valid = st.builds(images.png, st.integers(1, 64), st.integers(1, 64)) | st.builds(
        images.jpeg, st.integers(1, 64), st.integers(1, 64)
    )
    damaged = st.tuples(valid, st.integers(0, 40)).map(lambda pair: pair[0][: pair[1]])
    absurd = st.sampled_from([png_header(0, 5), png_header(100_000, 100_000), images.gif(0, 0)])
    refused = st.sampled_from([b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x00\x00\x01\x00"])
    return st.one_of(valid, damaged, absurd, refused, st.binary(max_size=256))


# Raw bodies, whatever image media type a case names (`image/*` in the document).
schemathesis.openapi.media_type("image/*", image_bodies())
# A tus PATCH's (or creation's) bytes: the same, so the head reaches every verdict there too.
schemathesis.openapi.media_type("application/offset+octet-stream", image_bodies())

# Loaded from the file at collection time, so every operation is a test of its own (each
# starting clean); that the server serves this same document is asserted above. The base
# URL (the session's gunicorn) is given at call time.
schema = schemathesis.openapi.from_path(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "request-timeout": 20,
            "auth": {"openapi": {"apiKey": {"bearer": ALICE_KEY}}},
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        }
    ),
)


@pytest.mark.timeout(60 + MAX_EXAMPLES // 2)
@schema.parametrize()
# `sample` is made once per operation, on purpose, not once per generated request.
@hypothesis.settings(suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
def test_every_operation_answers_as_documented(
    case: schemathesis.Case[Any], sample: dict[str, Any], gunicorn: servers.Server
) -> None:
    # The framing headers describe the body the client library actually sends; a made-up
    # value would be a framing error that gunicorn answers before the app sees the request.
    for name in ("Content-Length", "Transfer-Encoding"):
        if case.headers:
            case.headers.pop(name, None)
    case.call_and_validate(base_url=f"http://127.0.0.1:{gunicorn.port}")
