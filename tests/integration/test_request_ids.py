"""Request ids and logs, across real processes (api/requestid.py, core/logs.py).

A client's valid `X-Request-Id` comes back on every kind of answer, directly and through
nginx, and an invalid one is replaced; the id is in gunicorn's lines for the request, in the
worker's lines for the conversion it queued and for the webhook delivery that followed, and
the receiver is told it. With PICSTREAM_LOG_FORMAT=json every line the web and the worker
write is one JSON object. A request carrying signatures and keys that fails inside the app
leaves none of them in any log.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import falcon.testing
import pytest
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from core.jobs import request_id_of
from core.settings import Settings
from core.signing import sign
from tests import servers
from tests.faults import Outage
from tests.http import Api, Response
from tests.images import png
from tests.integration.conftest import ALICE_KEY
from tests.logtrace import headers_only, json_lines, wait_until
from tests.webhooks import SECRET, Receiver

StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]
ORIGIN = "https://app.example"


def fresh_id() -> str:
    return f"client.{secrets.token_hex(6)}:trace_1-2"


def assert_id(resp: Response, request_id: str) -> None:
    assert resp.header("x-request-id") == request_id, (resp.status, resp.headers)


def assert_problem_names(resp: Response, request_id: str) -> None:
    assert resp.header("content-type") == "application/problem+json", resp.headers
    assert resp.json["request_id"] == request_id, resp.json
    assert resp.json["instance"] == f"urn:picstream:request:{request_id}"


def answers(api: Api) -> Iterator[tuple[str, Callable[[dict[str, str]], Response]]]:
    """One request of each kind (201, 404, problems, event stream, download), by name."""
    image_id = f"rid-{secrets.token_hex(4)}"
    yield "created", lambda h: api.upload(png(6, 4), image_id, headers=h)
    yield "not found", lambda h: api.request("GET", "/v1/images/nope", headers=h)
    yield "no route", lambda h: api.request("GET", "/v2/nothing", headers=h)
    yield "bad key", lambda h: api.request("GET", "/v1/images", headers=h, key="wrong")
    yield "bad request", lambda h: api.upload(b"", image_id + "x", headers=h)
    yield "event stream", lambda h: headers_only(api, f"/v1/images/{image_id}/events", h)
    yield "download", lambda h: api.request("GET", f"/v1/images/{image_id}/original", headers=h)
    # Once only, also when nginx serves the bytes (a handed-off download adds its own).
    yield "download head", lambda h: headers_only(api, f"/v1/images/{image_id}/original", h)


@pytest.mark.parametrize("via", ["gunicorn", "nginx"])
def test_a_valid_id_comes_back_on_every_answer_and_an_invalid_one_is_replaced(
    via: str, api: Api, nginx: servers.Front
) -> None:
    target = api if via == "gunicorn" else Api("127.0.0.1", nginx.port, ALICE_KEY)
    for name, send in answers(target):
        mine = fresh_id()
        resp = send({"X-Request-Id": mine})
        assert resp.status < 500, (name, resp.status, resp.body[:300])
        assert_id(resp, mine)
        if resp.status >= 400:
            assert_problem_names(resp, mine)
        if name == "download":
            assert resp.status == 200 and resp.body == png(6, 4)
        for bad in ("has space", "x" * 129, "<script>", "é-utf8".encode().decode("latin-1")):
            replaced = send({"X-Request-Id": bad}).header("x-request-id")
            assert replaced and replaced != bad and len(replaced) == 32, (name, replaced)
            int(replaced, 16)
        made = send({}).header("x-request-id")
        assert made and len(made) == 32, (name, made)


def test_nginx_names_the_id_on_its_own_answers_and_in_its_access_log(
    nginx: servers.Front,
) -> None:
    mine = fresh_id()
    front = Api("127.0.0.1", nginx.port, ALICE_KEY)
    sock, raw = front.raw(
        front.headers_for(
            "POST", "/v1/images", f"X-Request-Id: {mine}\r\nContent-Length: {10**12}\r\n"
        )
    )
    sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), raw[:300]
    assert f"\r\nX-Request-Id: {mine}\r\n".encode() in head + b"\r\n", head
    problem = json.loads(body)
    assert problem["request_id"] == mine and problem["instance"].endswith(mine)
    access = Path(nginx.prefix, "access.log")
    wait_until(lambda: f"request_id={mine}" in access.read_text(), 10, "nginx's access line")


def test_preflights_carry_the_id_and_browsers_may_read_it(
    client_with: Callable[..., falcon.testing.TestClient],
) -> None:
    client = client_with(PICSTREAM_CORS_ORIGINS=ORIGIN)
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "PUT", "X-Request-Id": "pf-1"}
    resp = client.simulate_options("/v1/images/x", headers=preflight)
    assert resp.status_code == 204 and resp.headers["x-request-id"] == "pf-1"
    refused = client.simulate_options(
        "/v1/images/x", headers={**preflight, "Origin": "https://evil"}
    )
    assert refused.status_code == 403 and refused.headers["x-request-id"] == "pf-1"
    assert refused.json["request_id"] == "pf-1"
    resp = client.simulate_get("/v1/images/nope", headers={"Origin": ORIGIN})
    exposed = {h.strip() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert "X-Request-Id" in exposed


def test_gunicorns_access_line_names_the_id(api: Api, gunicorn: servers.Server) -> None:
    mine = fresh_id()
    assert_id(api.request("GET", "/v1/images/nope", headers={"X-Request-Id": mine}), mine)
    wait_until(
        lambda: any(
            '"GET /v1/images/nope HTTP/1.1" 404' in line and line.endswith(f"request_id={mine}")
            for line in gunicorn.output().splitlines()
        ),
        10,
        "gunicorn's access line",
    )


@pytest.fixture()
def worker_dir(workdir: Path) -> Path:
    return workdir / f"rid-{secrets.token_hex(3)}"


def test_one_id_from_the_upload_to_the_webhook_in_json_lines(
    env: dict[str, str], start_api: StartApi, receiver: Receiver, worker_dir: Path
) -> None:
    hooked = {
        **env,
        "PICSTREAM_LOG_FORMAT": "json",
        "PICSTREAM_WEBHOOK_HOSTS": f"127.0.0.1:{receiver.port}",
        "PICSTREAM_WEBHOOK_SECRET": SECRET,
    }
    web, api = start_api(hooked)
    worker = servers.start_worker(hooked, worker_dir)
    try:
        receiver.answers = [503]  # the first delivery fails: its retry carries the id too
        mine = fresh_id()
        url = f"http://127.0.0.1:{receiver.port}/hook?token=receiver-secret-{mine}"
        created = api.upload(
            png(64, 48),
            headers={"X-Request-Id": mine},
            query=f"?callback={quote(url, safe='')}",
        )
        assert created.status == 201, created.body
        image_id = created.json["id"]
        wait_until(lambda: len(receiver.received) >= 2, 60, "the delivery and its retry")
        assert all(headers["x-request-id"] == mine for headers, _ in receiver.received)
        wait_until(
            lambda: any("delivered" in line["message"] for line in mine_in(worker, mine)),
            10,
            "the worker's delivery line",
        )
    finally:
        worker.stop()
    web_lines = json_lines(web.output())
    worker_lines = json_lines(worker.output())
    for line in web_lines + worker_lines:
        assert {"time", "level", "logger", "message", "process", "request_id"} <= set(line)
    ours = [line for line in web_lines if line["request_id"] == mine]
    assert any(line["logger"] == "gunicorn.access" for line in ours), web_lines[-5:]
    messages = [line["message"] for line in mine_in(worker, mine)]
    assert any("pickup=" in m and image_id in m for m in messages), messages  # the job starts
    assert any("Job OK" in m for m in messages), messages  # rq's own line, in the horse
    assert sum(f"webhook for {image_id} delivered" in m for m in messages) == 1, messages
    assert any(
        "DeliveryFailed" in (line.get("exception") or line["message"])
        for line in mine_in(worker, mine)
    ), messages  # the failed attempt, then its retry
    assert "receiver-secret" not in web.output() + worker.output()


def mine_in(server: servers.Server, request_id: str) -> list[dict[str, Any]]:
    lines = []
    for raw in server.output().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("request_id") == request_id:
            lines.append(line)
    return lines


def test_signatures_and_keys_never_reach_a_log_when_the_app_fails(
    env: dict[str, str], redis_server: servers.Server, workdir: Path
) -> None:
    """Redis is unreachable, so each request fails inside the app after authentication;
    gunicorn (text and what the app logs) and nginx's access log are then searched."""
    settings = Settings.from_env(env)
    assert settings.signing_key is not None
    sig = secrets.token_hex(32)
    amz_sig, amz_cred, token = (f"{name}{secrets.token_hex(8)}" for name in ("S", "C", "T"))
    path = "/v1/images/holiday/original"
    genuine = sign(settings.signing_key, path, "alice", 600)  # the app's own: a genuine link
    leaky = (
        f"{path}?{genuine}&X-Amz-Signature={amz_sig}&X-Amz-Credential={amz_cred}%2Fus-east-1"
        f"&token={token}"
    )
    with Outage(redis_server.port, down=True) as redis_down:
        front = servers.start_front(
            {**env, "PORT": str(servers.free_port()), "REDIS_URL": redis_down.redis_url},
            workdir / f"leaks-{secrets.token_hex(3)}",
        )
        try:
            target = Api("127.0.0.1", front.port, ALICE_KEY)
            mine = fresh_id()
            failed = target.request("GET", leaky, headers={"X-Request-Id": mine}, key=None)
            assert failed.status >= 500, failed.body
            assert_problem_names(failed, mine)
            keyed = target.request("GET", f"/v1/images/holiday?signature={sig}&token={token}")
            assert keyed.status >= 500, keyed.body
            wait_until(lambda: mine in front.web.output(), 10, "the failure's log lines")
        finally:
            front.stop()
    logs = {
        "gunicorn": front.web.output(),
        "nginx access.log": Path(front.prefix, "access.log").read_text(),
    }
    assert (
        f"request_id={mine}" in logs["gunicorn"]
        and f"request_id={mine}" in logs["nginx access.log"]
    )
    genuine_sig = genuine.rsplit("sig=", 1)[1]
    for name, text in logs.items():
        for secret in (sig, genuine_sig, amz_sig, amz_cred, token, ALICE_KEY):
            assert secret not in text, (name, secret)


def test_an_invalid_id_never_reaches_a_log(api: Api, gunicorn: servers.Server) -> None:
    marker = f"evil{secrets.token_hex(4)}"
    sock = socket.create_connection((api.host, api.port), timeout=10)
    try:
        sock.sendall(api.headers_for("GET", "/v1/images/nope", f"X-Request-Id: {marker} x\r\n"))
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
    finally:
        sock.close()
    assert marker not in gunicorn.output()


def queued_ids(redis_client: Redis, name: str) -> list[str | None]:
    """The request id each job waiting on queue `name` carries."""
    queue = Queue(name, connection=redis_client, serializer=JSONSerializer)
    return [request_id_of(job) for job in queue.jobs]


def test_uploads_reconversions_and_tus_uploads_queue_jobs_with_their_id(
    client: falcon.testing.TestClient, settings: Settings, redis_client: Redis
) -> None:
    auth = {"Authorization": f"Bearer {ALICE_KEY}"}
    created = client.simulate_put(
        "/v1/images/traced", body=png(8, 8), headers={**auth, "X-Request-Id": "up-1"}
    )
    assert created.status_code == 201, created.text
    again = client.simulate_post(
        "/v1/images/traced/reconvert", headers={**auth, "X-Request-Id": "re-1"}
    )
    assert again.status_code in (200, 202), again.text
    tus = {**auth, "Tus-Resumable": "1.0.0", "X-Request-Id": "tus-1"}
    data = png(9, 9)
    made = client.simulate_post("/v1/tus", headers={**tus, "Upload-Length": str(len(data))})
    assert made.status_code == 201, made.text
    done = client.simulate_patch(
        made.headers["location"],
        body=data,
        headers={
            **tus,
            "Upload-Offset": "0",
            "Content-Type": "application/offset+octet-stream",
            "X-Request-Id": "tus-2",
        },
    )
    assert done.status_code == 204, done.text
    assert queued_ids(redis_client, settings.queue) == ["up-1", "tus-2"]
    assert queued_ids(redis_client, settings.bulk_queue) == ["re-1"]
