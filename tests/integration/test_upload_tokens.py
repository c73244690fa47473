"""Upload tokens: minted with the API key, good for uploads only, within their limits, their
uses and revocation shared by every web process (real gunicorn, Redis and SeaweedFS)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import falcon.testing
import pytest
from redis import Redis

from core.mirror import read_copy
from core.models import ObjectKeys
from core.settings import Settings
from core.storage import Store
from tests import servers
from tests.faults import Outage
from tests.http import Api, Response, multipart
from tests.images import Body, gif, jpeg, png
from tests.integration.conftest import ALICE_KEY, BOB_KEY
from tests.keys import keys_of

MiB = 1024 * 1024
PROBLEM = "urn:picstream:problem:"
AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
WEBHOOKS = {
    "PICSTREAM_WEBHOOK_HOSTS": "hooks.example",
    "PICSTREAM_WEBHOOK_SECRET": "webhook-secret-for-tests-0123456789abcdef",
}

ClientWith = Callable[..., falcon.testing.TestClient]
StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]


def mint(api: Api, key: str = ALICE_KEY, **asked: Any) -> dict[str, Any]:
    body = json.dumps(asked).encode() if asked else None
    resp = api.request(
        "POST", "/v1/upload-tokens", body, {"Content-Type": "application/json"}, key=key
    )
    assert resp.status == 201, resp.body
    assert resp.header("Cache-Control") == "no-store"
    minted: dict[str, Any] = resp.json
    return minted


def assert_problem(resp: Response, status: int, slug: str) -> None:
    assert resp.status == status, resp.body
    assert resp.header("Content-Type") == "application/problem+json"
    assert resp.json["type"] == PROBLEM + slug, resp.json
    assert resp.json["detail"]
    if status == 401:
        assert resp.header("WWW-Authenticate") == 'Bearer realm="picstream"'


def uses_left(redis_client: Redis, jti: str) -> int | None:
    value = redis_client.hget(f"picstream:token:{jti}", "left")
    return None if value is None else int(value)


def assert_stored(store: Store, redis_client: Redis, owner: str, count: int) -> None:
    """`count` committed images of `owner` and nothing else: no stray object, no multipart
    upload, no lease, no purge pending."""
    assert store.incomplete_uploads() == []
    keys = store.keys("")
    assert len([k for k in keys if k.endswith("/original")]) == count, keys
    assert all(
        k.startswith(f"{owner}/") and k.endswith(("/original", "/record.json")) for k in keys
    )
    for key in keys:  # each with the bucket copy of its record (on it, or record.json)
        owner_, image_id, gen, _ = key.split("/")
        assert read_copy(store, ObjectKeys(owner_, image_id, gen)).gen == gen
    assert redis_client.zcard(f"picstream:images:{owner}") == count
    assert list(redis_client.scan_iter("picstream:lease:*")) == []
    assert redis_client.zcard("picstream:purges") == 0


# --- minting ----------------------------------------------------------------------------


def test_a_token_minted_with_defaults_echoes_the_deployments_limits(
    api: Api, settings: Settings, redis_client: Redis
) -> None:
    before = time.time()
    minted = mint(api)
    assert set(minted) == {
        "token",
        "jti",
        "expires_at",
        "max_bytes",
        "formats",
        "profile",
        "id",
        "uploads",
        "callback",
    }
    assert minted["token"].startswith("pst_")
    assert len(minted["jti"]) == 22
    assert minted["expires_at"].endswith("Z")
    expires = datetime.fromisoformat(minted["expires_at"]).timestamp()
    assert before + settings.token_ttl - 1 <= expires <= time.time() + settings.token_ttl
    assert minted["max_bytes"] == settings.max_upload_bytes
    assert minted["formats"] == sorted(settings.allowed_formats)
    assert (minted["profile"], minted["id"], minted["callback"]) == (None, None, None)
    assert minted["uploads"] == settings.token_uploads == 1
    # Its state in Redis expires with it (a minute's margin for clocks).
    state = f"picstream:token:{minted['jti']}"
    assert redis_client.hgetall(state) == {b"owner": b"alice", b"uploads": b"1", b"left": b"1"}
    assert settings.token_ttl < redis_client.ttl(state) <= settings.token_ttl + 60


def test_a_token_minted_with_limits_carries_them(
    client_with: ClientWith, redis_client: Redis
) -> None:
    client = client_with(**WEBHOOKS)
    asked = {
        "expires_in": 600,
        "max_bytes": 5000,
        "formats": ["png", "jpeg", "png"],
        "profile": "default",
        "id": "avatar-7",
        "uploads": 4,
        "callback": "https://hooks.example/done?user=7",
    }
    resp = client.simulate_post("/v1/upload-tokens", json=asked, headers=AS_ALICE)
    assert resp.status_code == 201, resp.text
    minted = resp.json
    limits = {k: v for k, v in asked.items() if k != "expires_in"}
    assert {k: minted[k] for k in limits} == {**limits, "formats": ["jpeg", "png"]}
    expires = datetime.fromisoformat(minted["expires_at"])
    assert 590 < (expires - datetime.now(UTC)).total_seconds() <= 600
    assert uses_left(redis_client, minted["jti"]) == 4


@pytest.mark.parametrize(
    ("asked", "detail"),
    [
        ({"expires_in": 0}, "expires_in must be an integer from 1 to 86400"),
        ({"expires_in": 86401}, "expires_in must be an integer from 1 to 86400"),
        ({"expires_in": "60"}, "expires_in must be an integer from 1 to 86400"),
        ({"expires_in": 1.5}, "expires_in must be an integer from 1 to 86400"),
        ({"uploads": True}, "uploads must be an integer from 1 to 1000"),
        ({"uploads": 1001}, "uploads must be an integer from 1 to 1000"),
        ({"max_bytes": 300 * MiB + 1}, f"max_bytes must be an integer from 1 to {300 * MiB}"),
        ({"max_bytes": 0}, f"max_bytes must be an integer from 1 to {300 * MiB}"),
        ({"formats": []}, "formats must be a non-empty list"),
        ({"formats": "png"}, "formats must be a non-empty list"),
        ({"formats": [1]}, "formats must be a non-empty list"),
        ({"formats": ["png", "svg"]}, "formats: 'svg' is not accepted here"),
        ({"profile": "nope"}, "unknown profile 'nope'"),
        ({"profile": 3}, "profile must be a profile name"),
        ({"id": "a/b"}, "image id must be 1-64 characters"),
        ({"id": ""}, "image id must be 1-64 characters"),
        ({"callback": "https://elsewhere.example/x"}, "not on PICSTREAM_WEBHOOK_HOSTS"),
        ({"callback": "ftp://hooks.example/x"}, "callback must be an absolute http(s) URL"),
        ({"callback": "https://hooks.example/" + "x" * 3000}, "at most 2048 characters"),
        ({"max_byte": 10}, "unknown field 'max_byte'"),
    ],
)
def test_bad_mint_requests_are_400_naming_the_field(
    client_with: ClientWith, redis_client: Redis, asked: dict[str, Any], detail: str
) -> None:
    client = client_with(**WEBHOOKS)
    resp = client.simulate_post("/v1/upload-tokens", json=asked, headers=AS_ALICE)
    assert resp.status_code == 400, resp.text
    assert resp.json["type"] == PROBLEM + "bad-request"
    assert detail in resp.json["detail"]
    assert ALICE_KEY not in resp.text
    assert list(redis_client.scan_iter("picstream:token:*")) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"[" * 10_000, "application/json", 400),
        (b"\xff\xfe{", "application/json", 400),
        (b" " * 20_000, "application/json", 400),
        (b'{"uploads": 2}', "text/plain", 415),
    ],
)
def test_a_mint_body_that_is_not_a_json_object_is_refused(
    client: falcon.testing.TestClient, body: bytes, content_type: str, status: int
) -> None:
    resp = client.simulate_post(
        "/v1/upload-tokens", body=body, headers={**AS_ALICE, "Content-Type": content_type}
    )
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/problem+json"


def test_a_chunked_mint_body_is_read_not_dropped(api: Api) -> None:
    """falcon's get_media reads a chunked body as empty: the limits would silently vanish."""
    resp = api.request(
        "POST",
        "/v1/upload-tokens",
        iter([b'{"uploads": 3, ', b'"max_bytes": 1234}']),
        {"Content-Type": "application/json"},
        chunked=True,
    )
    assert resp.status == 201, resp.body
    assert (resp.json["uploads"], resp.json["max_bytes"]) == (3, 1234)


def test_minting_needs_the_signing_key(client_with: ClientWith) -> None:
    client = client_with(PICSTREAM_SIGNING_KEY="")
    resp = client.simulate_post("/v1/upload-tokens", headers=AS_ALICE)
    assert resp.status_code == 400
    assert resp.json["detail"].startswith("upload tokens are not enabled here")


def test_minting_needs_an_api_key(api: Api) -> None:
    assert_problem(api.request("POST", "/v1/upload-tokens", key=None), 401, "unauthorized")
    token = mint(api)["token"]
    assert_problem(api.request("POST", "/v1/upload-tokens", key=token), 403, "token-not-allowed")


# --- uploading with a token ----------------------------------------------------------------


def test_a_token_uploads_with_post_and_put_as_its_owner(
    api: Api, store: Store, redis_client: Redis
) -> None:
    minted = mint(api, key=BOB_KEY, uploads=3)
    token = minted["token"]
    body = png(30, 20)
    posted = api.upload(body, key=token, query="?filename=a.png")
    assert posted.status == 201, posted.body
    assert posted.json["owner"] == "bob"
    assert posted.json["filename"] == "a.png"
    assert store.read_bytes(keys_of(posted.json).original) == body

    put = api.upload(jpeg(20, 10), "from-the-page", key=token)
    assert put.status == 201, put.body
    assert put.header("Location") == "/v1/images/from-the-page"
    assert put.json["owner"] == "bob"

    pieces, content_type = multipart(gif(5, 5), filename="c.gif", content_type="image/gif")
    form = api.request("POST", "/v1/images", pieces, {"Content-Type": content_type}, key=token)
    assert form.status == 201, form.body
    assert form.json["filename"] == "c.gif"

    assert uses_left(redis_client, minted["jti"]) == 0
    assert_problem(api.upload(png(), key=token), 401, "token-used-up")
    assert_stored(store, redis_client, "bob", 3)
    # The owner's key sees them; the token never could.
    assert api.request("GET", "/v1/images/from-the-page", key=BOB_KEY).json["format"] == "jpeg"


def test_a_token_reads_and_changes_nothing(api: Api, redis_client: Redis) -> None:
    image_id = api.upload(png(300, 200), "mine").json["id"]
    minted = mint(api, uploads=2)
    token = minted["token"]
    for method, path in [
        ("GET", "/v1/images"),
        ("GET", f"/v1/images/{image_id}"),
        ("DELETE", f"/v1/images/{image_id}"),
        ("GET", f"/v1/images/{image_id}/original"),
        ("HEAD", f"/v1/images/{image_id}/original"),
        ("GET", f"/v1/images/{image_id}/variants/w256.webp"),
        ("GET", f"/v1/images/{image_id}/best"),
        ("GET", f"/v1/images/{image_id}/events"),
        ("POST", f"/v1/images/{image_id}/reconvert"),
        ("POST", "/v1/upload-tokens"),
        ("DELETE", f"/v1/upload-tokens/{minted['jti']}"),
        ("OPTIONS", "/v1/upload-tokens"),
    ]:
        resp = api.request(method, path, key=token)
        assert resp.status == 403, (method, path, resp.status, resp.body)
        if method != "HEAD":
            assert resp.json["type"] == PROBLEM + "token-not-allowed", (method, path)
            assert token not in resp.body.decode()
    assert api.request("GET", f"/v1/images/{image_id}").status == 200
    assert uses_left(redis_client, minted["jti"]) == 2
    # OPTIONS on an upload route is what nginx asks for `Expect: 100-continue`: allowed.
    assert api.request("OPTIONS", "/v1/images", key=token).status == 200
    assert api.request("OPTIONS", "/v1/images/anything", key=token).status == 200
    assert uses_left(redis_client, minted["jti"]) == 2


def test_a_token_only_ever_uploads_for_its_owner(
    api: Api, store: Store, redis_client: Redis
) -> None:
    alices = api.upload(png(8, 8), "shared-name").json
    bobs_token = mint(api, key=BOB_KEY, uploads=2)
    # The same id under Bob's token is Bob's own image; Alice's is untouched.
    bobs = api.upload(gif(), "shared-name", key=bobs_token["token"])
    assert bobs.status == 201, bobs.body
    assert bobs.json["owner"] == "bob"
    still = api.request("GET", "/v1/images/shared-name").json
    assert (still["owner"], still["blake3"], still["gen"]) == (
        "alice",
        alices["blake3"],
        alices["gen"],
    )
    assert store.read_bytes(keys_of(alices).original) == png(8, 8)
    assert_problem(
        api.request("DELETE", "/v1/images/shared-name", key=bobs_token["token"]),
        403,
        "token-not-allowed",
    )
    # Only the owner who minted a token can revoke it.
    jti = bobs_token["jti"]
    assert_problem(api.request("DELETE", f"/v1/upload-tokens/{jti}"), 404, "not-found")
    assert uses_left(redis_client, jti) == 1
    assert api.request("DELETE", f"/v1/upload-tokens/{jti}", key=BOB_KEY).status == 204


def test_a_token_bound_to_an_id_puts_under_it_and_nothing_else(
    api: Api, store: Store, redis_client: Redis
) -> None:
    minted = mint(api, id="avatar-1", profile="default", uploads=4)
    token = minted["token"]
    body = png(64, 64)
    # POST with the token: the upload goes under its id, as a PUT would.
    first = api.upload(body, key=token)
    assert first.status == 201, first.body
    assert first.json["id"] == "avatar-1"
    assert first.header("Location") == "/v1/images/avatar-1"
    assert first.json["profile"] == "default"
    again = api.upload(body, key=token)
    assert again.status == 200, again.body  # the same bytes: the existing record
    assert again.json == first.json
    # Other bytes under its id: a conflict, and the use is given back.
    assert_problem(api.upload(png(65, 64), key=token), 409, "conflict")
    assert uses_left(redis_client, minted["jti"]) == 2

    for resp, what in [
        (api.upload(body, "avatar-2", key=token), "image id 'avatar-1'"),
        (api.upload(body, "avatar-1", key=token, query="?profile=thumbs"), "profile"),
        (api.upload(body, key=token, query="?profile=thumbs"), "profile 'default'"),
    ]:
        assert_problem(resp, 403, "token-not-allowed")
        assert what in resp.json["detail"]
        assert "thumbs" not in resp.json["detail"]
    assert uses_left(redis_client, minted["jti"]) == 2
    assert_stored(store, redis_client, "alice", 1)


def test_a_tokens_callback_applies_to_its_uploads(
    client_with: ClientWith, redis_client: Redis
) -> None:
    client = client_with(**WEBHOOKS)
    url = "https://hooks.example/done?user=7"
    minted = client.simulate_post(
        "/v1/upload-tokens", json={"callback": url, "uploads": 2}, headers=AS_ALICE
    ).json
    as_token = {"Authorization": f"Bearer {minted['token']}"}
    created = client.simulate_post("/v1/images", body=png(), headers=as_token)
    assert created.status_code == 201, created.text
    assert created.json["callback"] == url
    named = client.simulate_post(
        "/v1/images", body=png(), headers=as_token, params={"callback": url}
    )
    assert named.status_code == 201, named.text
    other = client.simulate_post(
        "/v1/images",
        body=png(),
        headers=as_token,
        params={"callback": "https://hooks.example/other"},
    )
    assert other.status_code == 403
    assert other.json["type"] == PROBLEM + "token-not-allowed"
    assert "hooks.example" not in other.json["detail"]  # a URL may carry a secret


# --- limits ----------------------------------------------------------------------------------


def test_a_body_above_the_tokens_max_bytes_is_413_and_costs_no_use(
    api: Api, store: Store, redis_client: Redis
) -> None:
    minted = mint(api, max_bytes=100_000, uploads=1)
    token = minted["token"]
    body = Body(100_001, piece=16 * 1024)
    assert_problem(api.upload(body.read_all(), key=token), 413, "too-large")  # declared
    assert_problem(api.upload(iter(body), key=token, chunked=True), 413, "too-large")  # counted
    pieces, content_type = multipart(Body(3 * MiB).read_all(), filename="big.png")
    assert_problem(  # a multipart envelope far above the limit
        api.request("POST", "/v1/images", pieces, {"Content-Type": content_type}, key=token),
        413,
        "too-large",
    )
    chunked_form, content_type = multipart(iter(body), filename="big.png")
    assert_problem(
        api.request(
            "POST",
            "/v1/images",
            iter(chunked_form),
            {"Content-Type": content_type},
            key=token,
            chunked=True,
        ),
        413,
        "too-large",
    )
    assert "100000" in api.upload(body.read_all(), key=token).json["detail"]
    assert uses_left(redis_client, minted["jti"]) == 1
    assert_stored(store, redis_client, "alice", 0)
    # At the limit exactly: stored.
    exact = Body(100_000)
    done = api.upload(exact.read_all(), key=token)
    assert done.status == 201, done.body
    assert done.json["size"] == 100_000
    assert_stored(store, redis_client, "alice", 1)


def test_a_declared_size_above_the_tokens_limit_is_refused_before_the_body(
    api: Api, store: Store
) -> None:
    token = mint(api, max_bytes=1000)["token"]
    request = (
        f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {50 * MiB}\r\n\r\n"
    ).encode()
    sock, raw = api.raw(request)  # nothing of the body sent: the answer comes anyway
    sock.close()
    assert raw.startswith(b"HTTP/1.1 413"), raw[:300]
    assert b"too-large" in raw
    assert store.keys("") == []


def test_a_format_outside_the_tokens_formats_is_415_before_any_s3_call(
    client_with: ClientWith, s3_outage: Outage, redis_client: Redis, store: Store
) -> None:
    client = client_with(S3_ENDPOINT=s3_outage.endpoint)
    minted = client.simulate_post(
        "/v1/upload-tokens", json={"formats": ["png"], "uploads": 1}, headers=AS_ALICE
    ).json
    as_token = {"Authorization": f"Bearer {minted['token']}"}
    s3_outage.cut()
    tried = s3_outage.connections
    for body in (gif(40, 40), jpeg(40, 40), jpeg(4000, 3000, pad=200_000)):
        refused = client.simulate_post("/v1/images", body=body, headers=as_token)
        assert refused.status_code == 415, refused.text
        assert refused.json["type"] == PROBLEM + "unsupported-format"
        assert refused.json["detail"].endswith("(png are)")
    assert s3_outage.connections == tried  # the store was never asked
    assert uses_left(redis_client, minted["jti"]) == 1
    # A PNG passes the head and reaches the store, which is down: proof the outage is real.
    down = client.simulate_post("/v1/images", body=png(), headers=as_token)
    assert down.status_code == 503, down.text
    assert s3_outage.connections > tried
    assert uses_left(redis_client, minted["jti"]) == 1  # given back: nothing was committed
    assert store.keys("") == []


def test_a_wrong_format_is_refused_from_the_head_without_the_rest(api: Api, store: Store) -> None:
    token = mint(api, formats=["jpeg"])["token"]
    request = (
        f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Length: {50 * MiB}\r\n\r\n"
    ).encode()
    sock, raw = api.raw(request + Body(50 * MiB).head + b"\x00" * 4096)
    sock.close()
    assert raw.startswith(b"HTTP/1.1 415"), raw[:300]
    assert b"unsupported-format" in raw
    assert store.incomplete_uploads() == []
    assert store.keys("") == []


# --- uses, expiry, revocation, forgery -------------------------------------------------------


def test_a_used_up_token_leaves_nothing_behind(api: Api, store: Store, redis_client: Redis) -> None:
    minted = mint(api, uploads=2)
    token = minted["token"]
    for n in range(2):
        assert api.upload(png(10 + n, 10), key=token).status == 201
    for body in (png(12, 10), Body(12 * MiB).read_all()):
        assert_problem(api.upload(body, key=token), 401, "token-used-up")
    assert_problem(api.upload(png(), "by-id", key=token), 401, "token-used-up")
    assert uses_left(redis_client, minted["jti"]) == 0
    assert_stored(store, redis_client, "alice", 2)


def test_uses_hold_under_concurrent_uploads(api: Api, store: Store, redis_client: Redis) -> None:
    """k uses, k + 5 uploads at once: exactly k are stored."""
    k = 3
    minted = mint(api, uploads=k)
    body = Body(2 * MiB).read_all()
    start = threading.Barrier(k + 5)
    answers: list[Response] = []
    lock = threading.Lock()

    def upload() -> None:
        start.wait()
        resp = api.upload(body, key=minted["token"])
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=upload) for _ in range(k + 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    statuses = sorted(a.status for a in answers)
    assert statuses == [201] * k + [401] * 5, [a.body[:200] for a in answers]
    assert all(a.json["type"] == PROBLEM + "token-used-up" for a in answers if a.status == 401)
    assert uses_left(redis_client, minted["jti"]) == 0
    assert_stored(store, redis_client, "alice", k)


def test_an_expired_token_is_refused(api: Api, store: Store) -> None:
    token = mint(api, expires_in=1, uploads=5)["token"]
    # Until it expires, a read is a 403 (valid, wrong endpoint); after, a 401.
    deadline = time.monotonic() + 10
    while (resp := api.request("GET", "/v1/images", key=token)).status == 403:
        assert time.monotonic() < deadline, "the token did not expire"
        time.sleep(0.05)
    assert_problem(resp, 401, "token-expired")
    assert_problem(api.upload(png(), key=token), 401, "token-expired")
    assert_problem(api.request("OPTIONS", "/v1/images", key=token), 401, "token-expired")
    assert store.keys("") == []


def test_a_revoked_token_is_refused_by_every_process(
    start_api: StartApi, env: dict[str, str], store: Store, redis_client: Redis
) -> None:
    _, one = start_api(env)
    _, two = start_api(env)
    minted = mint(one, uploads=5)
    token = minted["token"]
    assert two.upload(png(), key=token).status == 201
    assert one.request("DELETE", f"/v1/upload-tokens/{minted['jti']}").status == 204
    for api in (one, two):
        assert_problem(api.upload(png(9, 9), key=token), 401, "token-revoked")
        assert_problem(api.upload(png(9, 9), "put-id", key=token), 401, "token-revoked")
    # Revoking twice is the same; an unknown or malformed jti is a 404.
    assert two.request("DELETE", f"/v1/upload-tokens/{minted['jti']}").status == 204
    assert_problem(two.request("DELETE", "/v1/upload-tokens/" + "A" * 22), 404, "not-found")
    assert_problem(two.request("DELETE", "/v1/upload-tokens/nope"), 404, "not-found")
    assert_stored(store, redis_client, "alice", 1)


def test_tampered_and_foreign_tokens_are_invalid(
    api: Api, client_with: ClientWith, store: Store
) -> None:
    token = mint(api, uploads=5)["token"]
    payload, mac = token.split(".")
    flipped = mac[:10] + ("A" if mac[10] != "A" else "B") + mac[11:]
    foreign = client_with(PICSTREAM_SIGNING_KEY="another-signing-key-0123456789abcdefgh")
    theirs = foreign.simulate_post("/v1/upload-tokens", json={}, headers=AS_ALICE).json["token"]
    for bad in (f"{payload}.{flipped}", payload[:-2] + "xx." + mac, theirs, "pst_", "pst_x.y"):
        resp = api.upload(png(), key=bad)
        assert_problem(resp, 401, "invalid-token")
        assert bad not in resp.body.decode()
        assert_problem(api.request("GET", "/v1/images", key=bad), 401, "invalid-token")
    # What does not look like a token is answered as a wrong key, as before.
    assert_problem(api.upload(png(), key="not-a-token-0123456789"), 401, "unauthorized")
    assert store.keys("") == []


def test_a_token_upload_through_nginx_gets_100_continue(nginx: servers.Front) -> None:
    """nginx asks the app (OPTIONS /v1/images) before it answers `100 Continue`: a token
    must pass that check as it passes the upload's."""
    front = Api("127.0.0.1", nginx.port, ALICE_KEY)
    token = mint(front)["token"]
    body = png(40, 30)
    sock = socket.create_connection((front.host, front.port), timeout=5)
    try:
        sock.sendall(
            f"PUT /v1/images/via-nginx HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        final = b""
        while b"\r\n\r\n" not in final:
            final += sock.recv(65536)
    finally:
        sock.close()
    assert final.startswith(b"HTTP/1.1 201"), final[:300]


def test_tokens_are_never_logged(api: Api, gunicorn: servers.Server) -> None:
    token = mint(api, uploads=1, max_bytes=50)["token"]
    api.upload(png(), key=token)  # 413
    api.upload(png(2, 2), key=token, query="?profile=nope")  # 400
    api.request("GET", "/v1/images", key=token)  # 403
    api.upload(png(2, 2)[:40], key=token)  # 201 or a refusal from the head
    api.upload(png(), key=token)  # used up or too large
    api.upload(png(), key=token[:-1] + "x")  # forged
    log = gunicorn.output()
    # Neither the claims nor the MAC (the session's server also served other tests, whose
    # requests may name `pst_` in a path: the token itself is what must not appear).
    claims, mac = token.split(".")
    assert claims not in log and mac not in log
    assert ALICE_KEY not in log
