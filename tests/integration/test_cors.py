"""CORS (api/cors.py): what a browser on another origin is allowed to send and to read.

Preflights are answered before authentication on every route, routed or not; every answer to
a listed origin (problems, falcon's own errors and a store outage included) lets the page read
it; `*` opens signed reads to every page and nothing else; and a download handed to nginx
keeps its CORS headers, as does the problem nginx answers when the store fails it.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from api.cors import ALLOW_HEADERS, EXPOSE_HEADERS
from core.storage import Store
from tests import servers
from tests.http import Api, Response
from tests.images import png
from tests.integration.conftest import ALICE_KEY
from tests.links import converted, local

ClientWith = Callable[..., falcon.testing.TestClient]

APP = "https://app.example.com"
DEV = "http://127.0.0.1:3000"
STRANGER = "https://evil.example.net"
ORIGINS = f"{APP},{DEV}"
AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
ALL_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# One request of each route family a browser uses, with the method it would preflight; the
# upload-token and tus routes are preflighted whether or not this build serves them.
ROUTES = [
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("PUT", "/v1/images/holiday-1"),
    ("GET", "/v1/images/holiday-1?signed=60"),
    ("DELETE", "/v1/images/holiday-1"),
    ("GET", "/v1/images/holiday-1/original"),
    ("GET", "/v1/images/holiday-1/variants/w256.webp"),
    ("GET", "/v1/images/holiday-1/best?width=300"),
    ("GET", "/v1/images/holiday-1/events"),
    ("POST", "/v1/images/holiday-1/reconvert"),
    ("POST", "/v1/upload-tokens"),
    ("DELETE", "/v1/upload-tokens/0123abcd"),
    ("POST", "/v1/tus"),
    ("PATCH", "/v1/tus/0123abcd"),
    ("HEAD", "/v1/tus/0123abcd"),
    ("DELETE", "/v1/tus/0123abcd"),
]


Headers = dict[str, str]


def access_control(headers: Any) -> Headers:
    """The Access-Control-* headers of an answer, names in lower case."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith("access-control-")}


def vary(headers: Any) -> list[str]:
    value = {k.lower(): v for k, v in headers.items()}.get("vary") or ""
    return [part.strip() for part in value.split(",") if part.strip()]


def preflight(
    client: falcon.testing.TestClient, method: str, path: str, origin: str
) -> falcon.testing.Result:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, tus-resumable",
    }
    return client.simulate_request("OPTIONS", path, headers=headers)


def assert_readable_by(origin: str, headers: Any) -> None:
    """What a page on `origin` needs to read an actual answer: no more, no less."""
    assert access_control(headers) == {
        "access-control-allow-origin": origin,
        "access-control-expose-headers": EXPOSE_HEADERS,
    }
    if origin != "*":
        assert "Origin" in vary(headers)


def assert_not_readable(headers: Any) -> None:
    assert access_control(headers) == {}
    assert "Origin" in vary(headers)  # a cache must not hand this to a listed origin


@pytest.fixture()
def cors(client_with: ClientWith) -> falcon.testing.TestClient:
    return client_with(PICSTREAM_CORS_ORIGINS=ORIGINS)


@pytest.fixture()
def anyone(client_with: ClientWith) -> falcon.testing.TestClient:
    """Any origin may read signed links; APP may do everything."""
    return client_with(PICSTREAM_CORS_ORIGINS=f"*,{APP}")


# --- preflights ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_a_preflight_from_a_listed_origin_is_answered_without_a_key(
    cors: falcon.testing.TestClient, method: str, path: str
) -> None:
    for origin in (APP, DEV):
        resp = preflight(cors, method, path, origin)
        assert resp.status_code == 204, (method, path, resp.text)
        assert resp.content == b""
        assert access_control(resp.headers) == {
            "access-control-allow-origin": origin,
            "access-control-allow-methods": ALL_METHODS,
            "access-control-allow-headers": ALLOW_HEADERS,
            "access-control-max-age": "600",
        }
        assert vary(resp.headers) == ["Origin"]
        for name in ("Upload-Offset", "Tus-Resumable", "Last-Event-ID", "If-Modified-Since"):
            assert name in ALLOW_HEADERS.split(", ")


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_a_preflight_from_another_origin_is_a_403_with_no_cors_headers(
    cors: falcon.testing.TestClient, method: str, path: str
) -> None:
    for origin in (STRANGER, "null", "https://app.example.com.evil.net", APP + ":443"):
        resp = preflight(cors, method, path, origin)
        assert resp.status_code == 403, (method, path, origin)
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert resp.json["type"] == "urn:picstream:problem:forbidden"
        assert "PICSTREAM_CORS_ORIGINS" in resp.json["detail"]
        assert_not_readable(resp.headers)


def test_without_origins_every_preflight_is_refused_and_nothing_varies(
    client: falcon.testing.TestClient,
) -> None:
    resp = preflight(client, "POST", "/v1/images", APP)
    assert resp.status_code == 403
    assert access_control(resp.headers) == {}
    listing = client.simulate_get("/v1/images", headers={**AS_ALICE, "Origin": APP})
    assert listing.status_code == 200
    assert access_control(listing.headers) == {} and "Vary" not in listing.headers


def test_an_options_request_that_is_no_preflight_still_needs_the_key(
    cors: falcon.testing.TestClient,
) -> None:
    # Origin without Access-Control-Request-Method: an ordinary OPTIONS (nginx's
    # Expect: 100-continue check sends one), authenticated like any request.
    refused = cors.simulate_request("OPTIONS", "/v1/images", headers={"Origin": APP})
    assert refused.status_code == 401
    assert_readable_by(APP, refused.headers)
    allowed = cors.simulate_request("OPTIONS", "/v1/images", headers={**AS_ALICE, "Origin": APP})
    assert allowed.status_code == 200


# --- actual answers ------------------------------------------------------------------------


def test_every_answer_to_a_listed_origin_is_readable(cors: falcon.testing.TestClient) -> None:
    answers = {
        "listing": cors.simulate_get("/v1/images", headers={**AS_ALICE, "Origin": APP}),
        "no key": cors.simulate_get("/v1/images", headers={"Origin": APP}),
        "wrong key": cors.simulate_get(
            "/v1/images", headers={"Authorization": "Bearer nope", "Origin": APP}
        ),
        "no such image": cors.simulate_get(
            "/v1/images/nope/original", headers={**AS_ALICE, "Origin": APP}
        ),
        "bad id": cors.simulate_get("/v1/images/a%20b", headers={**AS_ALICE, "Origin": APP}),
        "not an image": cors.simulate_post(
            "/v1/images", body=b"hello", headers={**AS_ALICE, "Origin": APP}
        ),
        "falcon 405": cors.simulate_request(
            "PATCH", "/v1/images", headers={**AS_ALICE, "Origin": APP}
        ),
        "falcon 404": cors.simulate_get("/v1/nowhere", headers={**AS_ALICE, "Origin": APP}),
        "upload": cors.simulate_put(
            "/v1/images/cors-1", body=png(), headers={**AS_ALICE, "Origin": APP}
        ),
    }
    statuses = {name: resp.status_code for name, resp in answers.items()}
    assert statuses == {
        "listing": 200,
        "no key": 401,
        "wrong key": 401,
        "no such image": 404,
        "bad id": 400,
        "not an image": 415,
        "falcon 405": 405,
        "falcon 404": 404,
        "upload": 201,
    }
    for name, resp in answers.items():
        assert_readable_by(APP, resp.headers)
        if resp.status_code >= 400:
            assert resp.headers["Content-Type"] == "application/problem+json", name
    assert answers["upload"].headers["Location"] == "/v1/images/cors-1"
    assert "Location" in EXPOSE_HEADERS.split(", ")


def test_answers_to_other_origins_are_not_readable(cors: falcon.testing.TestClient) -> None:
    for headers in ({"Origin": STRANGER}, {"Origin": "null"}, {}):
        ok = cors.simulate_get("/v1/images", headers={**AS_ALICE, **headers})
        assert ok.status_code == 200
        assert_not_readable(ok.headers)
        refused = cors.simulate_get("/v1/images", headers=headers)
        assert refused.status_code == 401
        assert_not_readable(refused.headers)


def test_a_store_outage_is_readable_too(
    cors: falcon.testing.TestClient, client_with: ClientWith
) -> None:
    assert cors.simulate_put("/v1/images/down", body=png(), headers=AS_ALICE).status_code == 201
    broken = client_with(
        PICSTREAM_CORS_ORIGINS=ORIGINS,
        S3_ENDPOINT=f"http://127.0.0.1:{servers.free_port()}",  # nothing listens there
    )
    resp = broken.simulate_get("/v1/images/down/original", headers={**AS_ALICE, "Origin": DEV})
    assert resp.status_code == 503
    assert resp.json["type"] == "urn:picstream:problem:storage-unavailable"
    assert_readable_by(DEV, resp.headers)


def test_downloads_keep_their_vary_and_signed_links_work_from_listed_origins(
    cors: falcon.testing.TestClient, run_jobs: Callable[[], None]
) -> None:
    record = converted(cors, run_jobs)
    best = cors.simulate_get(
        "/v1/images/holiday-1/best",
        headers={**AS_ALICE, "Origin": APP, "Accept": "image/webp"},
        query_string="width=10",
    )
    assert best.status_code == 200 and best.headers["Content-Type"] == "image/webp"
    assert vary(best.headers) == ["Accept", "Origin"]
    assert_readable_by(APP, best.headers)

    signed = local(record["variants"][0]["signed_url"])
    mine = cors.simulate_get(signed, headers={"Origin": APP})
    assert (
        mine.status_code == 200 and mine.headers["ETag"] == f'"{record["variants"][0]["blake3"]}"'
    )
    assert_readable_by(APP, mine.headers)
    # Without `*` in the setting a signed link is readable by listed origins only.
    theirs = cors.simulate_get(signed, headers={"Origin": STRANGER})
    assert theirs.status_code == 200
    assert_not_readable(theirs.headers)


# --- `*`: signed reads from anywhere, nothing else -----------------------------------------


def test_star_lets_any_page_read_signed_links_and_nothing_else(
    anyone: falcon.testing.TestClient, run_jobs: Callable[[], None]
) -> None:
    record = converted(anyone, run_jobs)
    signed = [
        local(record["original_signed_url"]),
        local(record["variants"][0]["signed_url"]),
        local(record["best_signed_url"]) + "&width=10",
        local(record["events_signed_url"]),
    ]
    for path in signed:
        for headers in ({"Origin": STRANGER}, {"Origin": APP}, {}):
            for method in ("GET", "HEAD") if "/events" not in path else ("GET",):
                resp = anyone.simulate_request(method, path, headers=headers)
                assert resp.status_code == 200, (method, path, resp.text)
                # The same for every origin: one copy in a CDN, no Vary: Origin.
                assert_readable_by("*", resp.headers)
                assert "Origin" not in vary(resp.headers)
    bad = signed[1].replace("sig=", "sig=0")
    refused = anyone.simulate_get(bad, headers={"Origin": STRANGER})
    assert refused.status_code == 403
    assert_readable_by("*", refused.headers)  # the page may read why

    # With the key, or on a path no link can sign, a stranger reads nothing; APP does.
    variant = f"/v1/images/holiday-1/variants/{record['variants'][0]['name']}"
    query = urllib.parse.urlsplit(record["original_signed_url"]).query
    for method, path, headers in [
        ("GET", variant, AS_ALICE),
        ("GET", "/v1/images/holiday-1", AS_ALICE),
        ("GET", f"/v1/images/holiday-1?{query}", {}),
        ("DELETE", local(record["original_signed_url"]), {}),
    ]:
        stranger = anyone.simulate_request(method, path, headers={**headers, "Origin": STRANGER})
        assert_not_readable(stranger.headers)
        app = anyone.simulate_request(method, path, headers={**headers, "Origin": APP})
        assert_readable_by(APP, app.headers)
    assert (
        anyone.simulate_get("/v1/images/holiday-1", headers={"Origin": STRANGER}).status_code == 401
    )


def test_star_preflights_only_signed_reads(anyone: falcon.testing.TestClient) -> None:
    signed = "/v1/images/holiday-1/variants/w256.webp?owner=alice&expires=1&sig=00"
    ok = preflight(anyone, "GET", signed, STRANGER)
    assert ok.status_code == 204
    assert access_control(ok.headers) == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "GET, HEAD",
        "access-control-allow-headers": ALLOW_HEADERS,
        "access-control-max-age": "600",
    }
    for method, path in [
        ("DELETE", signed),
        ("GET", signed.partition("?")[0]),  # no signature: needs the key
        ("GET", "/v1/images/holiday-1?owner=alice&expires=1&sig=00"),  # records are not signable
        ("POST", "/v1/images"),
        ("POST", "/v1/upload-tokens"),
        ("PATCH", "/v1/tus/0123abcd"),
    ]:
        refused = preflight(anyone, method, path, STRANGER)
        assert refused.status_code == 403, (method, path)
        assert access_control(refused.headers) == {}
    upload = preflight(anyone, "POST", "/v1/images", APP)
    assert upload.status_code == 204
    assert upload.headers["Access-Control-Allow-Origin"] == APP


def test_credentials_are_never_allowed(
    cors: falcon.testing.TestClient, anyone: falcon.testing.TestClient
) -> None:
    for client in (cors, anyone):
        for resp in (
            preflight(client, "POST", "/v1/images", APP),
            client.simulate_get("/v1/images", headers={**AS_ALICE, "Origin": APP}),
            client.simulate_get("/v1/images", headers={"Origin": APP}),
        ):
            assert "Access-Control-Allow-Credentials" not in resp.headers


# --- through nginx -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cors_front(env: dict[str, str], workdir: Path, store: Store) -> Iterator[tuple[Api, Api]]:
    """nginx with downloads handed off, and a bare gunicorn, both with `ORIGINS` and `*`."""
    cors_env = {**env, "PICSTREAM_CORS_ORIGINS": f"*,{ORIGINS}"}
    front = servers.start_front({**cors_env, "PORT": str(servers.free_port())}, workdir / "cors")
    direct = servers.start_gunicorn(
        {**cors_env, "PORT": str(servers.free_port())}, workdir / "cors"
    )
    try:
        yield Api("127.0.0.1", front.port, ALICE_KEY), Api("127.0.0.1", direct.port, ALICE_KEY)
    finally:
        front.stop()
        direct.stop()


HOP_BY_HOP = {"server", "date", "connection", "keep-alive", "transfer-encoding"}


def same_answer(through: Response, direct: Response) -> None:
    assert (through.status, through.body) == (direct.status, direct.body)
    mine = {k: v for k, v in through.headers.items() if k not in HOP_BY_HOP}
    theirs = {k: v for k, v in direct.headers.items() if k not in HOP_BY_HOP}
    assert mine == theirs


def test_a_handed_off_download_keeps_its_cors_headers(
    cors_front: tuple[Api, Api], run_jobs: Callable[[], None], store: Store
) -> None:
    front, direct = cors_front
    assert front.upload(png(40, 30), "holiday-1").status == 201
    run_jobs()
    record = front.request("GET", "/v1/images/holiday-1?signed=600").json
    original = "/v1/images/holiday-1/original"
    signed = record["original_signed_url"].split(str(front.port), 1)[1]
    best = record["best_signed_url"].split(str(front.port), 1)[1] + "&width=10"
    cases: list[tuple[str, Headers, str | None]] = [
        (original, {"Origin": APP}, ALICE_KEY),
        (original, {"Origin": STRANGER}, ALICE_KEY),
        (signed, {"Origin": STRANGER}, None),
        (best, {"Origin": DEV, "Accept": "image/webp"}, None),
        ("/v1/images/holiday-1/best?width=10", {"Origin": DEV, "Accept": "image/webp"}, ALICE_KEY),
        (original, {"Origin": APP, "Range": "bytes=0-9"}, ALICE_KEY),
    ]
    for n, (path, case_headers, key) in enumerate(cases):
        headers = {**case_headers, "X-Request-Id": f"cors-case-{n}"}  # the same id both ways
        through = front.request("GET", path, headers=headers, key=key)
        same_answer(through, direct.request("GET", path, headers=headers, key=key))
        assert through.status in (200, 206)
    handed = front.request("GET", original, headers={"Origin": APP})
    assert handed.body == store.read_bytes(f"alice/holiday-1/{record['gen']}/original")
    assert_readable_by(APP, handed.headers)
    assert vary(handed.headers) == ["Origin"]
    assert_readable_by(
        "*", front.request("GET", signed, headers={"Origin": STRANGER}, key=None).headers
    )
    webp = front.request("GET", best, headers={"Origin": DEV, "Accept": "image/webp"}, key=None)
    assert vary(webp.headers) == ["Accept"] and webp.header("content-type") == "image/webp"

    # The store lost the file: nginx's own 404 problem, readable by the page all the same.
    store.delete(f"alice/holiday-1/{record['gen']}/original")
    gone = front.request("GET", original, headers={"Origin": APP})
    assert gone.status == 404 and gone.json["type"] == "urn:picstream:problem:not-found"
    assert_readable_by(APP, gone.headers)
    assert gone.header("cache-control") == "no-store"


def test_preflights_pass_nginx_without_a_key(cors_front: tuple[Api, Api]) -> None:
    front, _ = cors_front
    for method, path in ROUTES:
        headers = {"Origin": DEV, "Access-Control-Request-Method": method}
        ok = front.request("OPTIONS", path, headers=headers, key=None)
        assert ok.status == 204, (method, path, ok.body)
        assert ok.header("access-control-allow-origin") == DEV
        refused = front.request("OPTIONS", path, headers={**headers, "Origin": STRANGER}, key=None)
        assert refused.status == 403 and access_control(refused.headers) == {}
    # nginx's Expect: 100-continue check asks the app for the key without the CORS headers:
    # they do not turn it into a preflight, and a wrong key gets no `100 Continue`.
    sock, answer = front.raw(
        b"PUT /v1/images/x HTTP/1.1\r\nHost: picstream\r\nOrigin: "
        + APP.encode()
        + b"\r\nAccess-Control-Request-Method: PUT\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
