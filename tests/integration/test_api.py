"""Auth, owner isolation, idempotent PUT, health checks: the app in-process on real services."""

from __future__ import annotations

from collections.abc import Callable

import falcon.testing
import pytest
from redis import Redis

from core.storage import Store
from tests import servers
from tests.http import Api
from tests.images import gif, png
from tests.integration.conftest import ALICE_KEY, BOB_KEY, make_env
from tests.keys import keys_of

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
AS_BOB = {"Authorization": f"Bearer {BOB_KEY}"}


def put(
    client: falcon.testing.TestClient,
    image_id: str,
    body: bytes,
    headers: dict[str, str] = AS_ALICE,
) -> falcon.testing.Result:
    return client.simulate_put(f"/v1/images/{image_id}", body=body, headers=headers)


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer wrong-key-0123456789abc",
        "Basic YWxpY2U6eA==",
        f"Bearer {ALICE_KEY}x",
        "Bearer",
    ],
)
def test_missing_or_wrong_key_is_401(
    client: falcon.testing.TestClient, store: Store, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    for resp in (
        client.simulate_post("/v1/images", body=png(), headers=headers),
        client.simulate_get("/v1/images/abc", headers=headers),
    ):
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert ALICE_KEY not in resp.text
    assert store.keys("") == []


def test_health_checks_need_no_key(client: falcon.testing.TestClient) -> None:
    assert client.simulate_get("/healthz").json == {"status": "ok"}
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == {"redis": "ok", "s3": "ok"}


def test_images_belong_to_their_owner(client: falcon.testing.TestClient, store: Store) -> None:
    created = client.simulate_post("/v1/images", body=png(), headers=AS_ALICE)
    assert created.status_code == 201
    image_id = created.json["id"]

    assert client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE).status_code == 200
    theirs = client.simulate_get(f"/v1/images/{image_id}", headers=AS_BOB)
    assert theirs.status_code == 404
    assert theirs.json["type"] == "urn:picstream:problem:not-found"
    # Bob may use the same id for his own image: ids are per owner.
    bobs = put(client, image_id, gif(), AS_BOB)
    assert bobs.status_code == 201
    assert client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE).json["format"] == "png"
    assert client.simulate_get(f"/v1/images/{image_id}", headers=AS_BOB).json["format"] == "gif"
    assert store.exists(keys_of(created.json).original)
    assert store.exists(keys_of(bobs.json).original)


def test_put_is_idempotent(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis
) -> None:
    first = put(client, "holiday-2026_01", png(5, 5))
    assert first.status_code == 201
    assert first.headers["Location"] == "/v1/images/holiday-2026_01"

    again = put(client, "holiday-2026_01", png(5, 5))
    assert again.status_code == 200
    assert again.json == first.json

    other_size = put(client, "holiday-2026_01", png(6, 5))
    assert other_size.status_code == 409
    assert other_size.headers["Content-Type"] == "application/problem+json"
    same_size = png(5, 5)[:-13] + b"\x00" * 13  # same length, different bytes
    assert put(client, "holiday-2026_01", same_size).status_code == 409
    # The original is untouched, and only one job was ever queued.
    assert client.simulate_get("/v1/images/holiday-2026_01", headers=AS_ALICE).json == first.json
    assert redis_client.llen("rq:queue:convert") == 1


@pytest.mark.parametrize("bad_id", ["a" * 65, "has.dot", "space%20d", "%C3%A9t%C3%A9", "a%2Fb"])
def test_invalid_client_ids_are_400(
    client: falcon.testing.TestClient, store: Store, bad_id: str
) -> None:
    resp = put(client, bad_id, png())
    assert resp.status_code in (400, 404)  # a '/' can't even route
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert store.keys("") == []


def test_unknown_routes_are_problem_json(client: falcon.testing.TestClient) -> None:
    resp = client.simulate_get("/v2/nothing", headers=AS_ALICE)
    assert resp.status_code == 404
    assert resp.headers["Content-Type"] == "application/problem+json"
    resp = client.simulate_delete("/v1/images", headers=AS_ALICE)
    assert resp.status_code == 405
    assert resp.headers["Content-Type"] == "application/problem+json"


def test_redis_down_at_the_end_of_an_upload_leaves_no_object(
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]],
    workdir,
    s3_server: servers.Server,
    store: Store,
) -> None:
    own_redis = servers.start_redis(workdir / "redis-doomed")
    try:
        _, api = start_api(make_env(own_redis.extra["url"], s3_server.extra["endpoint"]))
        assert api.request("GET", "/readyz", key=None).status == 200

        def body():  # Redis dies while the body is still arriving
            yield png(8, 8)
            own_redis.stop()
            yield b"\x00" * (6 * 1024 * 1024)

        resp = api.upload(body(), chunked=True)
        assert resp.status == 503
        assert resp.json["type"] == "urn:picstream:problem:queue-unavailable"
        assert store.keys("") == []
        assert store.incomplete_uploads() == []
        ready = api.request("GET", "/readyz", key=None)
        assert ready.status == 503
        assert ready.json["checks"]["s3"] == "ok"
    finally:
        own_redis.stop()
