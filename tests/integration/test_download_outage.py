"""Downloads ask the store before they answer, and both relays serve exact bytes.

A store that is down is a 503 problem for GET and HEAD (never a 200 whose body never
comes); a file the record names but the store lacks is a 404 problem. The splice relay
must really be taken under gunicorn, and must fall back to copying when a response's
socket cannot be had.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import falcon.testing
import pytest
import urllib3
from PIL import Image

from api import splice
from api.app import Collaborators
from api.files import original_blob
from core.storage import ObjectStream, OpenObject, Store
from tests import servers
from tests.faults import Outage
from tests.http import Api, Response
from tests.images import Body, png
from tests.integration.conftest import ALICE_KEY, make_env

MiB = 1024 * 1024
AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
STORAGE_UNAVAILABLE = "urn:picstream:problem:storage-unavailable"
StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]


def photo() -> bytes:
    """A photo the default profile makes variants of."""
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 120, 200)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture()
def outage(s3_server: servers.Server) -> Iterator[Outage]:
    """A forwarder to the session S3 server, down until the test brings it up."""
    forwarder = Outage(s3_server.port, down=True)
    yield forwarder
    forwarder.close()


def assert_problem(got: Response, status: int, method: str, slug: str) -> None:
    assert got.status == status, (method, got.status, got.body[:200])
    assert got.header("Content-Type") == "application/problem+json"
    # Nothing of the download's description leaks into the problem answer.
    for name in ("ETag", "Content-Disposition", "Cache-Control", "Content-Range"):
        assert got.header(name) is None, name
    if method == "GET":
        assert got.header("Content-Length") == str(len(got.body))
        assert got.json["type"] == f"urn:picstream:problem:{slug}"
        assert got.json["status"] == status
    else:
        assert got.body == b""


def test_store_down_is_a_503_problem_for_every_download(
    api: Api,
    run_jobs: Callable[[], None],
    start_api: StartApi,
    redis_server: servers.Server,
    outage: Outage,
) -> None:
    created = api.upload(photo(), query="?filename=holiday.jpg")
    assert created.status == 201, created.body
    image_id = created.json["id"]
    run_jobs()
    record = api.request("GET", f"/v1/images/{image_id}").json
    assert record["status"] == "ready", record
    base = f"/v1/images/{image_id}"
    variant = f"{base}/variants/{record['variants'][0]['name']}"
    original = api.request("GET", f"{base}/original").body
    etag = f'"{record["blake3"]}"'

    # Same Redis and bucket as `api`, but it reaches S3 only through the forwarder.
    _, cut_off = start_api(make_env(redis_server.extra["url"], outage.endpoint))
    for method, path, headers in [
        ("GET", f"{base}/original", {}),
        ("HEAD", f"{base}/original", {}),
        ("GET", f"{base}/original?v={record['blake3'][:16]}", {"Range": "bytes=0-9"}),
        ("GET", variant, {}),
        ("HEAD", variant, {}),
        ("GET", f"{base}/best?width=10", {"Accept": "image/webp"}),
    ]:
        tried = outage.connections
        got = cut_off.request(method, path, headers=headers)
        assert_problem(got, 503, method, "storage-unavailable")
        assert outage.connections > tried, (method, path)  # it did ask the store

    # A 304 and a 416 are decided from the record: no store round trip, so no outage.
    tried = outage.connections
    cached = cut_off.request("GET", f"{base}/original", headers={"If-None-Match": etag})
    assert cached.status == 304 and cached.body == b"" and cached.header("ETag") == etag
    far = cut_off.request("GET", f"{base}/original", headers={"Range": f"bytes={len(original)}-"})
    assert far.status == 416
    assert far.header("Content-Range") == f"bytes */{len(original)}"
    assert outage.connections == tried

    outage.down = False  # the store is back: the same process serves again
    whole = cut_off.request("GET", f"{base}/original")
    assert whole.status == 200 and whole.body == original
    assert whole.header("Content-Length") == str(len(original))
    assert whole.header("ETag") == etag
    head = cut_off.request("HEAD", f"{base}/original")
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == str(len(original))
    assert cut_off.request("GET", variant).body == api.request("GET", variant).body


def test_store_down_in_process_is_a_503_problem(
    client: falcon.testing.TestClient,
    client_with: Callable[..., falcon.testing.TestClient],
    outage: Outage,
) -> None:
    # Outside gunicorn the copying relay serves; it too opens the response first.
    body = Body(2 * MiB + 7).read_all()
    created = client.simulate_post("/v1/images", body=body, headers=AS_ALICE)
    assert created.status_code == 201
    path = f"/v1/images/{created.json['id']}/original"
    cut_off = client_with(S3_ENDPOINT=outage.endpoint)
    for method in ("GET", "HEAD"):
        got = cut_off.simulate_request(method, path, headers=AS_ALICE)
        assert got.status_code == 503, method
        assert got.headers["Content-Type"] == "application/problem+json"
        assert "ETag" not in got.headers
    assert cut_off.simulate_get(path, headers=AS_ALICE).json["type"] == STORAGE_UNAVAILABLE

    outage.down = False
    whole = cut_off.simulate_get(path, headers=AS_ALICE)
    assert whole.status_code == 200 and whole.content == body
    part = cut_off.simulate_get(path, headers={**AS_ALICE, "Range": "bytes=1048570-2097160"})
    assert part.status_code == 206 and part.content == body[1048570:2097161]


def test_a_file_missing_from_the_store_is_a_404_problem(
    api: Api, store: Store, services: Collaborators
) -> None:
    image_id = api.upload(png(8, 8)).json["id"]
    store.delete(original_blob(services.records.get("alice", image_id)).key)
    path = f"/v1/images/{image_id}/original"
    for method in ("GET", "HEAD"):
        assert_problem(api.request(method, path), 404, method, "not-found")
    assert api.request("GET", path).json["detail"] == "the stored file of this image is missing"
    assert api.request("GET", f"/v1/images/{image_id}").status == 200  # the record is intact


def test_a_file_that_no_longer_matches_its_record_is_a_503_problem(
    api: Api, store: Store, services: Collaborators
) -> None:
    image_id = api.upload(png(8, 8)).json["id"]
    blob = original_blob(services.records.get("alice", image_id))
    store.put(blob.key, png(16, 16) + b"longer", "image/png", {})
    path = f"/v1/images/{image_id}/original"
    for method in ("GET", "HEAD"):
        assert_problem(api.request(method, path), 503, method, "storage-unavailable")


def test_downloads_under_gunicorn_take_the_splice_path(
    api: Api, start_api: StartApi, redis_server: servers.Server, outage: Outage
) -> None:
    body = Body(3 * MiB + 17).read_all()
    image_id = api.upload(body).json["id"]
    path = f"/v1/images/{image_id}/original"
    outage.down = False  # only counting connections here
    _, proxied = start_api(make_env(redis_server.extra["url"], outage.endpoint))

    downloads = 3
    for _ in range(downloads):
        got = proxied.request("GET", path)
        assert got.status == 200 and got.body == body
    part = proxied.request("GET", path, headers={"Range": "bytes=1000-2000000"})
    assert part.status == 206 and part.body == body[1000:2000001]
    # The copying relay reads each body to the end through urllib3, which returns the
    # connection to its pool: one connection would serve all of them. The splice relay reads
    # behind urllib3's back and closes the connection: one per download. Fewer means the
    # fast path was silently not taken.
    assert outage.connections == downloads + 1, "downloads did not go through splice(2)"


@contextlib.contextmanager
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair: (the server's side, the client's side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_side = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    with server_side, client_side:
        yield server_side, client_side


def receive(sock: socket.socket, size: int) -> Callable[[], bytes]:
    """Read `size` bytes from `sock` on a thread; the returned call joins it."""
    got = bytearray()

    def run() -> None:
        while len(got) < size and (chunk := sock.recv(1024 * 1024)):
            got.extend(chunk)

    reader = threading.Thread(target=run)
    reader.start()

    def join() -> bytes:
        reader.join(timeout=60)
        return bytes(got)

    return join


def test_the_splice_relay_gets_the_socket_of_a_real_s3_response(
    api: Api, store: Store, services: Collaborators, s3_server: servers.Server
) -> None:
    body = Body(2 * MiB + 3).read_all()
    blob = original_blob(services.records.get("alice", api.upload(body).json["id"]))
    opened = store.open_range(blob.key, 5, blob.size - 5)
    try:
        raw = opened.raw_body()
        assert raw is not None, (
            "urllib3/http.client internals moved (OpenObject.raw_body): under gunicorn every "
            "download would silently take the copying relay"
        )
        assert raw.sock.getpeername() == ("127.0.0.1", s3_server.port)
        with tcp_pair() as (server_side, client_side):
            relay = splice.relay(opened, {"gunicorn.socket": server_side}, MiB, None)
            assert isinstance(relay, splice.SpliceRelay)
            join = receive(client_side, len(body) - 5)
            assert list(relay) == [b""]  # the headers' turn, then the body moved in the kernel
            assert join() == body[5:]
    finally:
        opened.close()


def test_without_a_plain_socket_the_splice_path_falls_back_to_copying(
    services: Collaborators,
) -> None:
    # A real urllib3 response whose body is no socket: what raw_body() finds when urllib3
    # or http.client change shape (or the store speaks TLS). The relay must still serve.
    body = Body(2 * MiB + 3).read_all()
    response: Any = urllib3.HTTPResponse(
        body=io.BytesIO(body), headers={"Content-Length": str(len(body))}, preload_content=False
    )
    opened = OpenObject(response, len(body))
    assert opened.raw_body() is None
    with tcp_pair() as (server_side, _):
        relay = splice.relay(opened, {"gunicorn.socket": server_side}, MiB, services.download_pool)
        assert isinstance(relay, ObjectStream)
        try:
            assert b"".join(relay) == body
        finally:
            relay.close()
