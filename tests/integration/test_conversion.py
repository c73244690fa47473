"""Conversion jobs against the real Redis and S3: uploads through the in-process app, jobs run
in-process by rq's SimpleWorker (burst), the worker's services configured with the test
settings (`configure_jobs`), as `python -m worker` configures them with its own."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
import pyvips
from blake3 import blake3
from redis import Redis
from rq import Queue
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from core import janitor
from core.events import events_key
from core.jobs import enqueue_convert, make_queue
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store
from tests import pixels
from tests.faults import Outage
from tests.integration.conftest import ALICE_KEY, BOB_KEY, ConfigureJobs
from tests.keys import keys_of, variant_key
from worker.jobs import RETIRE_GRACE, ImageJob, conversion_failed, horse_killed
from worker.services import JobServices

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
RunJobs = Callable[[], None]
ClientWith = Callable[..., falcon.testing.TestClient]

PROFILES = """
[profiles.default]
formats = ["webp", "jpeg"]
widths = [64, 160]

[profiles.thumbs]
formats = ["avif", "png"]
boxes = ["32x32"]
"""


def upload(client: falcon.testing.TestClient, body: bytes, query: str = "") -> dict[str, Any]:
    resp = client.simulate_post(
        "/v1/images", body=body, headers={**AS_ALICE}, query_string=query.lstrip("?")
    )
    assert resp.status_code == 201, resp.text
    record: dict[str, Any] = resp.json
    return record


def get(client: falcon.testing.TestClient, image_id: str) -> dict[str, Any]:
    resp = client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE)
    assert resp.status_code == 200, resp.text
    record: dict[str, Any] = resp.json
    return record


def in_redis(redis_client: Redis, image_id: str) -> dict[str, Any]:
    """The stored record (the API adds links on top of it)."""
    return Records(redis_client).get("alice", image_id).to_dict()


def events(redis_client: Redis, image_id: str) -> list[dict[str, str]]:
    entries = redis_client.xrange(stream_of(redis_client, image_id))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def stream_of(redis_client: Redis, image_id: str) -> str:
    record = in_redis(redis_client, image_id)
    return events_key("alice", image_id, record["gen"])


@pytest.fixture()
def profiles(tmp_path: Path, env: dict[str, str], configure_jobs: ConfigureJobs) -> str:
    """A profiles file with `default` and `thumbs`, named in the worker's settings; the
    test's app gets it through `client_with(PICSTREAM_PROFILES=...)`."""
    path = tmp_path / "profiles.toml"
    path.write_text(PROFILES)
    configure_jobs(Settings.from_env({**env, "PICSTREAM_PROFILES": str(path)}))
    return str(path)


def run_until(run_jobs: RunJobs, done: Callable[[], bool], timeout: float = 30) -> None:
    """Run due jobs until `done()` (retries become due after their interval)."""
    deadline = time.monotonic() + timeout
    while True:
        run_jobs()
        if done():
            return
        assert time.monotonic() < deadline, "conversion did not finish in time"
        time.sleep(0.2)


def test_an_upload_ends_ready_with_every_variant_in_the_bucket(
    client: falcon.testing.TestClient, run_jobs: RunJobs, store: Store, redis_client: Redis
) -> None:
    body = pixels.jpeg_with_orientation(6, 640, 480)  # displayed 640x480, stored 480x640
    image_id = upload(client, body)["id"]
    run_jobs()

    record = get(client, image_id)
    assert record["status"] == "ready" and record["error"] is None
    assert (record["width"], record["height"]) == (640, 480)
    by_name = {v["name"]: v for v in record["variants"]}
    assert sorted(by_name) == sorted(
        f"w{w}.{ext}" for ext in ("avif", "webp", "jpg") for w in (256, 1024)
    )
    for name, variant in by_name.items():
        assert variant["status"] == "ready", variant
        data = store.read_bytes(variant_key(record, name))
        assert (variant["size"], variant["blake3"]) == (len(data), blake3(data).hexdigest())
        image = pyvips.Image.new_from_buffer(data, "")
        assert (image.width, image.height) == (variant["width"], variant["height"])
        assert variant["width"] == (256 if name.startswith("w256") else 640)
        info = store.stat(variant_key(record, name))
        assert info.content_type == f"image/{variant['format']}"
        assert info.metadata["picstream-blake3"] == variant["blake3"]
    # The bucket copy is in step with Redis.
    assert json.loads(store.read_bytes(keys_of(record).record)) == in_redis(
        redis_client, image_id
    )


def test_progress_events_tell_the_whole_story(
    client: falcon.testing.TestClient, run_jobs: RunJobs, redis_client: Redis
) -> None:
    image_id = upload(client, pixels.save(pixels.marked(300, 200), "PNG"))["id"]
    run_jobs()
    seen = events(redis_client, image_id)
    assert seen[0]["type"] == "status" and seen[0]["status"] == "processing"
    planned = [v["name"] for v in json.loads(seen[0]["record"])["variants"]]
    assert planned == [
        "w256.avif",
        "w1024.avif",
        "w256.webp",
        "w1024.webp",
        "w256.jpg",
        "w1024.jpg",
    ]
    # One event per variant, as each is made (so not in plan order: the smallest size comes
    # first, test_conversion_order.py).
    assert sorted((e["type"], e["name"], e["status"]) for e in seen[1:-1]) == sorted(
        ("variant", name, "ready") for name in planned
    )
    final = seen[-1]
    assert (final["type"], final["status"]) == ("status", "ready")
    assert json.loads(final["record"]) == in_redis(redis_client, image_id)
    assert 0 < redis_client.ttl(stream_of(redis_client, image_id)) <= 24 * 3600


def test_profile_query_picks_the_profile_and_unknown_is_400_before_the_body(
    client_with: ClientWith, run_jobs: RunJobs, store: Store, profiles: str
) -> None:
    client = client_with(PICSTREAM_PROFILES=profiles)
    record = upload(client, pixels.save(pixels.marked(), "PNG"), "?profile=thumbs")
    assert record["profile"] == "thumbs"
    assert [v["name"] for v in record["variants"]] == ["32x32.avif", "32x32.png"]

    # Not even an image: the profile is refused first, and nothing is stored.
    resp = client.simulate_post(
        "/v1/images", body=b"not an image", headers=AS_ALICE, query_string="profile=nope"
    )
    assert resp.status_code == 400
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert "unknown profile 'nope'" in resp.json["detail"]
    resp = client.simulate_put(
        "/v1/images/x1", body=b"not an image", headers=AS_ALICE, query_string="profile=nope"
    )
    assert resp.status_code == 400

    run_jobs()
    done = get(client, record["id"])
    assert done["status"] == "ready"
    assert {(v["name"], v["width"], v["height"]) for v in done["variants"]} == {
        ("32x32.avif", 32, 21),
        ("32x32.png", 32, 21),
    }
    assert len(store.keys("alice/")) == 4  # original, record, two variants


def test_the_worker_fills_in_dimensions_the_header_did_not_tell(
    client_with: ClientWith, run_jobs: RunJobs
) -> None:
    client = client_with(PICSTREAM_MAX_HEAD_BYTES="64KiB")
    plain = pixels.save(pixels.marked(300, 200), "JPEG", quality=90)
    padding = b"\xff\xe2" + (65533 + 2).to_bytes(2, "big") + b"\x00" * 65533
    body = plain[:2] + padding + plain[2:]  # the frame header now lies beyond 64 KiB
    record = upload(client, body)
    assert (record["width"], record["height"]) == (None, None)
    run_jobs()
    done = get(client, record["id"])
    assert (done["status"], done["width"], done["height"]) == ("ready", 300, 200)
    assert {v["name"] for v in done["variants"]} == {
        "w256.avif",
        "w1024.avif",
        "w256.webp",
        "w1024.webp",
        "w256.jpg",
        "w1024.jpg",
    }


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (pixels.save(pixels.marked(800, 600), "JPEG", quality=95)[:3000], "premature end"),
        (pixels.save(pixels.marked(), "PNG")[:-40], "PNG"),
        (pixels.INPUTS["heic"][1]()[:300], "HEIC"),
    ],
    ids=["truncated-jpeg", "truncated-png", "truncated-heic"],
)
def test_bad_inputs_fail_with_a_reason_and_are_not_retried(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    redis_client: Redis,
    settings: Settings,
    body: bytes,
    reason: str,
) -> None:
    image_id = upload(client, body)["id"]
    queue = make_queue(redis_client, settings.queue, settings.job_timeout)
    job_id = queue.job_ids[0]
    run_jobs()

    record = get(client, image_id)
    assert record["status"] == "failed"
    assert reason.lower() in record["error"].lower(), record["error"]
    assert all(v["status"] == "failed" and v["error"] for v in record["variants"])
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == "finished"
    assert job.retries_left == len(settings.retry_intervals)  # never retried
    assert FailedJobRegistry(queue=queue).count == 0


def test_running_a_job_twice_gives_the_same_variants(
    client: falcon.testing.TestClient, run_jobs: RunJobs, store: Store, services: Any
) -> None:
    image_id = upload(client, pixels.jpeg_with_orientation(3, 400, 300))["id"]
    run_jobs()
    first = get(client, image_id)
    objects = {k: store.read_bytes(k) for k in store.keys(f"alice/{image_id}/")}

    with services.records.redis.pipeline(transaction=True) as pipe:
        pipe.multi()
        record = services.records.get("alice", image_id)
        enqueue_convert(services.queue, record, record.vset, pipe)
        pipe.execute()
    run_jobs()
    assert get(client, image_id) == first
    assert {k: store.read_bytes(k) for k in store.keys(f"alice/{image_id}/")} == objects


def test_a_job_for_a_deleted_image_recreates_nothing(
    client: falcon.testing.TestClient, run_jobs: RunJobs, store: Store, redis_client: Redis
) -> None:
    image_id = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    redis_client.delete(f"picstream:image:alice:{image_id}")  # what deletion will do
    for key in store.keys(f"alice/{image_id}/"):
        store.delete(key)
    run_jobs()
    assert store.keys("alice/") == []
    assert not redis_client.exists(f"picstream:image:alice:{image_id}")


class DeletingStore(Store):
    """Deletes the image record (as a DELETE request would) right after the first variant
    is written: the job is then mid-way."""

    def __init__(self, store: Store, redis_client: Redis, image_key: str) -> None:
        super().__init__(store.client, store.bucket)
        self.written: list[str] = []
        self.redis_client = redis_client
        self.image_key = image_key

    def put(self, key: str, data: Any, content_type: str, metadata: Any) -> None:
        super().put(key, data, content_type, metadata)
        self.written.append(key)
        self.redis_client.delete(self.image_key)


def test_a_record_deleted_mid_job_ends_it_quietly_and_removes_its_variants(
    client: falcon.testing.TestClient,
    store: Store,
    redis_client: Redis,
    settings: Settings,
) -> None:
    record = upload(client, pixels.save(pixels.marked(), "PNG"))
    image_id = record["id"]
    uploaded = set(store.keys(f"alice/{image_id}/"))  # the original (+ record.json)
    assert keys_of(record).original in uploaded
    deleting = DeletingStore(store, redis_client, f"picstream:image:alice:{image_id}")
    services = JobServices(settings, deleting, Records(connect(settings)))
    job = ImageJob(services, "alice", image_id, record["gen"], record["vset"])
    job.run()  # no exception: deletion is not an error
    assert deleting.written  # it had written a variant before it noticed
    # Its variants are gone; what the upload stored is left for the deletion to remove.
    assert set(store.keys(f"alice/{image_id}/")) == uploaded
    assert not redis_client.exists(f"picstream:image:alice:{image_id}")


def test_a_transient_s3_outage_is_retried_and_completes(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    s3_server: Any,
    configure_jobs: ConfigureJobs,
    env: dict[str, str],
    redis_client: Redis,
    settings: Settings,
) -> None:
    image_id = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    job_id = make_queue(redis_client, settings.queue, 60).job_ids[0]
    with Outage(s3_server.port, down=True) as outage:
        # The worker's view of S3 goes through the outage.
        configure_jobs(Settings.from_env({**env, "S3_ENDPOINT": outage.endpoint}))
        run_jobs()
        assert outage.connections > 0
        assert get(client, image_id)["status"] == "processing"  # waiting for its retry
        job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
        assert job.get_status() == "scheduled"

        outage.down = False
        run_until(run_jobs, lambda: get(client, image_id)["status"] != "processing")
    record = get(client, image_id)
    assert record["status"] == "ready", record
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert job.retries_left is not None and job.retries_left < len(settings.retry_intervals)


def test_s3_down_for_good_ends_failed_once_the_retries_are_spent(
    client_with: ClientWith,
    run_jobs: RunJobs,
    s3_server: Any,
    configure_jobs: ConfigureJobs,
    env: dict[str, str],
) -> None:
    client = client_with(PICSTREAM_RETRY_INTERVALS="0")  # one immediate retry
    image_id = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    with Outage(s3_server.port, down=True) as outage:
        configure_jobs(Settings.from_env({**env, "S3_ENDPOINT": outage.endpoint}))
        run_until(run_jobs, lambda: get(client, image_id)["status"] != "processing")
    record = get(client, image_id)
    assert record["status"] == "failed"
    assert (
        record["error"].startswith("gave up after 2 attempts: ") and "download" in record["error"]
    )


def test_reconvert_with_another_profile_replaces_the_variants(
    client_with: ClientWith,
    run_jobs: RunJobs,
    store: Store,
    redis_client: Redis,
    settings: Settings,
    profiles: str,
) -> None:
    client = client_with(PICSTREAM_PROFILES=profiles)
    image_id = upload(client, pixels.save(pixels.marked(300, 200), "PNG"))["id"]
    run_jobs()
    assert {v["name"] for v in get(client, image_id)["variants"]} == {
        "w64.webp",
        "w160.webp",
        "w64.jpg",
        "w160.jpg",
    }

    resp = client.simulate_post(
        f"/v1/images/{image_id}/reconvert", headers=AS_ALICE, query_string="profile=thumbs"
    )
    assert resp.status_code == 202
    assert resp.headers["Location"] == f"/v1/images/{image_id}"
    # The current variants keep serving while the new set is made beside them.
    assert resp.json["status"] == "processing" and resp.json["profile"] == "default"
    assert all(v["status"] == "ready" and v["url"] for v in resp.json["variants"])
    assert resp.json["pending"]["profile"] == "thumbs"
    assert [(v["name"], v["status"]) for v in resp.json["pending"]["variants"]] == [
        ("32x32.avif", "pending"),
        ("32x32.png", "pending"),
    ]
    bulk = make_queue(redis_client, settings.bulk_queue, 60)
    assert bulk.count == 1 and make_queue(redis_client, settings.queue, 60).count == 0

    run_jobs()
    record = get(client, image_id)
    assert record["status"] == "ready" and record["profile"] == "thumbs"
    assert record["pending"] is None and record["vset"] == resp.json["pending"]["vset"]
    # The replaced set stays readable for a grace period, then the janitor deletes it.
    assert len(store.keys(f"alice/{image_id}/")) == 2 + 2 + 4
    janitor.sweep_purges(store, Records(redis_client), now=time.time() + RETIRE_GRACE + 1)
    keys = keys_of(record)
    assert sorted(store.keys(f"alice/{image_id}/")) == sorted(
        [keys.original, keys.record] + [variant_key(record, n) for n in ("32x32.avif", "32x32.png")]
    )


def test_reconvert_picks_up_a_changed_profile_file(
    client_with: ClientWith,
    run_jobs: RunJobs,
    store: Store,
    redis_client: Redis,
    profiles: str,
) -> None:
    client = client_with(PICSTREAM_PROFILES=profiles)
    image_id = upload(client, pixels.save(pixels.marked(300, 200), "PNG"))["id"]
    run_jobs()

    # The worker reads the file for every job; the API only at start-up.
    Path(profiles).write_text('[profiles.default]\nformats = ["jpeg"]\nwidths = [100]\n')
    resp = client.simulate_post(f"/v1/images/{image_id}/reconvert", headers=AS_ALICE)
    assert resp.status_code == 202
    run_jobs()
    record = get(client, image_id)
    assert record["status"] == "ready"
    assert [(v["name"], v["width"], v["height"]) for v in record["variants"]] == [
        ("w100.jpg", 100, 67)
    ]
    janitor.sweep_purges(store, Records(redis_client), now=time.time() + RETIRE_GRACE + 1)
    keys = keys_of(record)
    assert sorted(store.keys(f"alice/{image_id}/")) == sorted(
        [keys.original, keys.record, variant_key(record, "w100.jpg")]
    )


def test_reconvert_answers_like_the_rest_of_the_api(
    client: falcon.testing.TestClient, store: Store
) -> None:
    image_id = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    path = f"/v1/images/{image_id}/reconvert"
    as_bob = {"Authorization": f"Bearer {BOB_KEY}"}
    assert client.simulate_post(path).status_code == 401
    assert client.simulate_post(path, headers=as_bob).status_code == 404
    assert client.simulate_post("/v1/images/nope/reconvert", headers=AS_ALICE).status_code == 404
    bad = client.simulate_post(path, headers=AS_ALICE, query_string="profile=nope")
    assert bad.status_code == 400 and bad.headers["Content-Type"] == "application/problem+json"
    assert client.simulate_get(path, headers=AS_ALICE).status_code == 405


def test_fresh_uploads_are_converted_before_reconversions(
    client: falcon.testing.TestClient, run_jobs: RunJobs, redis_client: Redis, settings: Settings
) -> None:
    old = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    run_jobs()
    assert client.simulate_post(f"/v1/images/{old}/reconvert", headers=AS_ALICE).status_code == 202
    new = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    job_ids = {
        name: Queue(name, connection=redis_client, serializer=JSONSerializer).job_ids[0]
        for name in (settings.queue, settings.bulk_queue)
    }
    run_jobs()
    ended = {
        name: Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer).ended_at
        for name, job_id in job_ids.items()
    }
    assert get(client, new)["status"] == get(client, old)["status"] == "ready"
    assert ended[settings.queue] < ended[settings.bulk_queue]


@pytest.mark.parametrize(
    ("hook", "reason"),
    [
        (lambda job: horse_killed(job, 4242, signal.SIGKILL, None), "died by signal 9"),
        (
            lambda job: conversion_failed(
                job, job.connection, JobTimeoutException, JobTimeoutException(), None
            ),
            "took longer than",
        ),
        (
            lambda job: conversion_failed(
                job, job.connection, AbandonedJobError, AbandonedJobError(), None
            ),
            "stopped (crashed or was killed)",
        ),
    ],
    ids=["horse-killed", "timeout", "abandoned"],
)
def test_the_last_failed_attempt_records_failed(
    client: falcon.testing.TestClient,
    configure_jobs: ConfigureJobs,
    redis_client: Redis,
    settings: Settings,
    hook: Callable[[Job], None],
    reason: str,
) -> None:
    """rq's failure paths that never reach the job's own error handling (a killed
    work-horse, a timeout, a job abandoned by a dead worker) leave the image `processing`
    while rq retries, and record `failed` when no retry is left."""
    image_id = upload(client, pixels.save(pixels.marked(), "PNG"))["id"]
    job_id = make_queue(redis_client, settings.queue, 60).job_ids[0]
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)

    hook(job)  # retries left: rq will run it again
    assert get(client, image_id)["status"] == "processing"

    job.retries_left = 0
    hook(job)
    record = get(client, image_id)
    assert record["status"] == "failed" and reason in record["error"], record["error"]
    assert all(v["status"] == "failed" for v in record["variants"])
