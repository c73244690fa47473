"""Prometheus metrics end to end: a real gunicorn with two worker processes and a real
`python -m worker`, a scripted scenario, then the scraped counters against what happened."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests import pixels, servers
from tests.http import Api
from tests.integration.conftest import ALICE_KEY
from tests.metrics import Samples, listening, scrape, total, value
from tests.webhooks import SECRET, Receiver

MiB = 1024 * 1024
UPLOADS = {"route": "/v1/images", "method": "POST"}


@pytest.fixture()
def stack(
    env: dict[str, str], workdir: Path, tmp_path: Path, receiver: Receiver
) -> Iterator[dict[str, Any]]:
    """gunicorn (2 workers) and one worker, both with their metrics listeners."""
    stack_env = {
        **env,
        "PORT": str(servers.free_port()),
        "PICSTREAM_WEB_WORKERS": "2",
        "PICSTREAM_MAX_UPLOAD_BYTES": "1MiB",
        "PICSTREAM_METRICS_PORT": str(servers.free_port()),
        "PICSTREAM_WORKER_METRICS_PORT": str(servers.free_port()),
        "PICSTREAM_WEBHOOK_HOSTS": f"127.0.0.1:{receiver.port}",
        "PICSTREAM_WEBHOOK_SECRET": SECRET,
    }
    web = servers.start_gunicorn(stack_env, workdir / "metrics-web")
    worker_dir = tmp_path / "worker-metrics"
    worker = servers.start_worker(
        {**stack_env, "PICSTREAM_METRICS_DIR": str(worker_dir)}, workdir / "metrics-worker"
    )
    try:
        wait_listening(int(stack_env["PICSTREAM_WORKER_METRICS_PORT"]), worker)
        yield {
            "env": stack_env,
            "web": web,
            "worker": worker,
            "worker_dir": worker_dir,
            "api": Api("127.0.0.1", web.port, ALICE_KEY),
        }
    finally:
        worker.stop()
        web.stop()


def wait_listening(port: int, server: servers.Server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            scrape(port)
            return
        except OSError:
            if server.proc.poll() is not None:
                raise RuntimeError(server.output()[-2000:]) from None
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on {port}: {server.output()[-2000:]}")


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def final(api: Api, image_id: str) -> dict[str, Any]:
    record: dict[str, Any] = {}

    def done() -> bool:
        nonlocal record
        record = api.request("GET", f"/v1/images/{image_id}").json
        return bool(record["status"] != "processing")

    wait_until(done, f"{image_id} to be converted")
    return record


def test_scraped_counters_equal_what_happened(stack: dict[str, Any], receiver: Receiver) -> None:
    api: Api = stack["api"]
    env = stack["env"]
    web_port, worker_port = (
        int(env["PICSTREAM_METRICS_PORT"]),
        int(env["PICSTREAM_WORKER_METRICS_PORT"]),
    )
    receiver.answers = [500]  # the first delivery is refused, its retry taken
    hook = quote(f"http://127.0.0.1:{receiver.port}/hook", safe="")

    photos = [pixels.save(pixels.marked(300 + 40 * n, 200), "JPEG") for n in range(3)]
    corrupt = pixels.save(pixels.marked(), "PNG")[:-40]  # sniffs fine, fails to decode
    created = [api.upload(photos[0], query=f"?callback={hook}")]
    created += [api.upload(body) for body in (*photos[1:], corrupt)]
    assert [r.status for r in created] == [201] * 4, [r.body for r in created]
    assert api.upload(b"just some text, no image").status == 415
    assert api.upload(b"\0" * (2 * MiB)).status == 413  # refused by its Content-Length
    assert api.upload(photos[0], key=None).status == 401  # refused before routing
    assert api.request("GET", "/metrics").status == 404  # never on the public port
    assert api.request("GET", "/no/such/path/1234").status == 404

    records = [final(api, r.json["id"]) for r in created]
    assert [r["status"] for r in records] == ["ready"] * 3 + ["failed"]
    original = api.request("GET", f"/v1/images/{records[0]['id']}/original")
    assert original.status == 200
    wait_until(lambda: len(receiver.received) == 2, "the webhook and its retry")

    web = scrape(web_port)
    requests = "picstream_http_requests_total"
    assert value(web, requests, {**UPLOADS, "status": "201"}) == 4
    for status, problem in (("415", "not-an-image"), ("413", "too-large"), ("401", "unauthorized")):
        assert value(web, requests, {**UPLOADS, "status": status}) == 1
        assert value(web, "picstream_uploads_rejected_total", {"problem": problem}) == 1
    assert total(web, "picstream_uploads_rejected_total") == 3
    assert value(web, "picstream_uploads_accepted_total") == 4
    assert value(web, "picstream_upload_bytes_total") == sum(map(len, (*photos, corrupt)))
    assert value(web, "picstream_upload_duration_seconds_count", {"outcome": "accepted"}) == 4
    assert value(web, "picstream_upload_duration_seconds_count", {"outcome": "rejected"}) == 3
    # Route templates, never paths: the unknown path and /metrics are one label value.
    assert value(web, requests, {"route": "unmatched", "method": "GET", "status": "404"}) == 2
    assert not [
        labels for (name, labels) in web if ("route", "/v1/images/" + records[0]["id"]) in labels
    ]
    routed = total(web, requests)
    assert total(web, "picstream_http_request_duration_seconds_count") == routed
    download = {"route": "/v1/images/{image_id}/original"}
    assert value(web, "picstream_download_bytes_total", download) == len(photos[0])
    # Both worker processes' samples are summed: each has its 6 upload slots.
    assert value(web, "picstream_slots_limit", {"kind": "uploads"}) == 12
    assert value(web, "picstream_slots_in_use", {"kind": "uploads"}) == 0
    assert value(web, "picstream_sse_watchers") == 0
    assert total(web, "picstream_s3_request_duration_seconds_count", operation="upload") >= 4
    assert total(web, "picstream_s3_errors_total") == 0
    assert total(web, "picstream_redis_operation_duration_seconds_count") > 0

    ready = [v for r in records for v in r["variants"] if v["status"] == "ready"]

    delivered = {"queue": "webhooks", "outcome": "succeeded"}

    def worker_done() -> bool:
        return value(scrape(worker_port), "picstream_jobs_finished_total", delivered) == 1

    wait_until(worker_done, "the worker's counters")
    work = scrape(worker_port)
    check_worker(work, ready)
    # Each work-horse's files were folded into the archive when it exited: what is left is
    # the archive and the rq worker's own files, however many jobs ran.
    leftovers = sorted(p.name for p in stack["worker_dir"].glob("*.db"))
    pids = {name.rsplit("_", 1)[1].removesuffix(".db") for name in leftovers} - {"archive"}
    assert len(pids) == 1, leftovers
    assert {"counter_archive.db", "histogram_archive.db"} <= set(leftovers)


def check_worker(work: Samples, ready: list[dict[str, Any]]) -> None:
    finished = "picstream_jobs_finished_total"
    assert value(work, "picstream_jobs_started_total", {"queue": "convert"}) == 4
    assert value(work, finished, {"queue": "convert", "outcome": "succeeded"}) == 4
    assert value(work, "picstream_jobs_started_total", {"queue": "webhooks"}) == 2
    assert value(work, finished, {"queue": "webhooks", "outcome": "retried"}) == 1
    assert total(work, finished, outcome="failed") == 0
    assert value(work, "picstream_conversions_total", {"outcome": "ready"}) == 3
    assert value(work, "picstream_conversions_total", {"outcome": "failed"}) == 1
    assert value(work, "picstream_conversion_duration_seconds_count", {"format": "jpeg"}) == 3
    assert value(work, "picstream_webhook_deliveries_total", {"outcome": "refused"}) == 1
    assert value(work, "picstream_webhook_deliveries_total", {"outcome": "delivered"}) == 1
    assert total(work, "picstream_variant_bytes_total") == sum(v["size"] for v in ready)
    assert total(work, "picstream_variant_encode_duration_seconds_count") == len(ready)
    assert value(work, "picstream_queue_depth", {"queue": "convert"}) == 0
    assert value(work, "picstream_queue_depth", {"queue": "webhooks"}) == 0
    assert ("picstream_janitor_actions_total", frozenset({("action", "purged_prefix")})) in work


def test_the_listener_is_on_loopback_by_default_and_off_when_unset(
    env: dict[str, str], workdir: Path, gunicorn: servers.Server
) -> None:
    # The session's gunicorn has no PICSTREAM_METRICS_PORT: it listens on its port alone.
    assert {port for _, port in listening(gunicorn.proc.pid)} == {gunicorn.port}
    metrics_port = servers.free_port()
    web = servers.start_gunicorn(
        {**env, "PORT": str(servers.free_port()), "PICSTREAM_METRICS_PORT": str(metrics_port)},
        workdir / "metrics-loopback",
    )
    try:
        wait_listening(metrics_port, web)
        assert ("127.0.0.1", metrics_port) in listening(web.proc.pid)
        # Only the master holds it: the workers closed their copies after the fork.
        for pid in servers.worker_pids(web):
            assert metrics_port not in {port for _, port in listening(pid)}
    finally:
        web.stop()


def test_a_taken_metrics_port_stops_gunicorn_with_one_line(
    env: dict[str, str], workdir: Path, gunicorn: servers.Server
) -> None:
    port = str(servers.free_port())
    taken = {**env, "PORT": port, "PICSTREAM_METRICS_PORT": str(gunicorn.port)}
    log = workdir / "metrics-taken.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [str(servers.BIN / "gunicorn"), "-c", "deploy/gunicorn.conf.py", "api.main:app()"],
            env={**os.environ, **taken},
            cwd=servers.ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=60,
        )
    assert proc.returncode == 2
    assert f"PICSTREAM_METRICS_PORT {gunicorn.port}" in log.read_text()
