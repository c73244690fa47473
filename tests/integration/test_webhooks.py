"""Webhooks: the final record POSTed to an allow-listed URL, signed, retried."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import quote

import pytest
from PIL import Image
from redis import Redis
from rq import SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from core.inflight import CONFIRM_AFTER, deliveries_in_flight
from core.jobs import make_queue
from core.settings import Settings
from core.storage import Store
from core.webhooks import DELIVER
from tests import servers
from tests.http import Api
from tests.integration.conftest import ConfigureJobs
from tests.lost import sweep_later, take_the_job
from tests.webhooks import SECRET, Receiver


@pytest.fixture()
def hook_env(
    env: dict[str, str], receiver: Receiver, configure_jobs: ConfigureJobs
) -> dict[str, str]:
    """The test settings with webhooks to the receiver allowed; in-process jobs get them."""
    hooked = {
        **env,
        "PICSTREAM_WEBHOOK_HOSTS": f"127.0.0.1:{receiver.port}",
        "PICSTREAM_WEBHOOK_SECRET": SECRET,
    }
    configure_jobs(Settings.from_env(hooked))
    return hooked


@pytest.fixture()
def hooked(
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]], hook_env: dict[str, str]
) -> Api:
    """An API (and in-process jobs) with webhooks to the receiver."""
    _, api = start_api(hook_env)
    return api


def photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 10)).save(out, "JPEG")
    return out.getvalue()


def verify(headers: dict[str, str], body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in headers["x-picstream-signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    fresh = abs(time.time() - int(parts["t"])) < 300
    return fresh and hmac.compare_digest(expected.hexdigest(), parts["v1"])


def test_final_record_is_posted_signed_after_retries(
    hooked: Api, receiver: Receiver, run_jobs: Callable[[], None]
) -> None:
    receiver.answers = [500, 503]  # the receiver is down twice, then takes it
    url = f"http://127.0.0.1:{receiver.port}/hooks/picstream"
    created = hooked.upload(photo(), query=f"?callback={quote(url, safe='')}")
    assert created.status == 201, created.body
    assert created.json["callback"] == url
    deadline = time.monotonic() + 30
    while len(receiver.received) < 3 and time.monotonic() < deadline:
        run_jobs()  # conversion, then the delivery and its retries as they fall due
        time.sleep(0.5)
    assert len(receiver.received) == 3
    headers, body = receiver.received[-1]
    assert verify(headers, body)
    assert headers["x-picstream-event"] == "image.ready"
    sent = json.loads(body)
    assert sent["type"] == "image.ready"
    assert sent["record"]["id"] == created.json["id"]
    assert sent["record"]["status"] == "ready"
    assert not verify({"x-picstream-signature": headers["x-picstream-signature"]}, body + b" ")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata: not allow-listed
        "http://127.0.0.1:1/other-port",
        "file:///etc/passwd",
        "http://user:pass@127.0.0.1/",
        "not a url",
    ],
)
def test_callbacks_outside_the_allow_list_are_refused_before_upload(hooked: Api, url: str) -> None:
    resp = hooked.upload(photo(), query=f"?callback={quote(url, safe='')}")
    assert resp.status == 400
    assert resp.header("Content-Type") == "application/problem+json"
    assert resp.json["type"] == "urn:picstream:problem:bad-request"  # clients match on it
    assert hooked.request("GET", "/v1/images").json["images"] == []


def test_a_delivery_waits_on_the_webhook_queue_behind_fresh_conversions(
    hooked: Api,
    receiver: Receiver,
    run_jobs: Callable[[], None],
    redis_client: Redis,
    settings: Settings,
) -> None:
    """A delivery is queued on the webhook queue, not on the conversions': a slow receiver
    never sits in front of an upload's conversion, and the worker converts first."""
    url = f"http://127.0.0.1:{receiver.port}/hooks/picstream"
    hooked_upload = hooked.upload(photo(), query=f"?callback={quote(url, safe='')}")
    assert hooked_upload.status == 201, hooked_upload.body
    conversions = make_queue(redis_client, settings.queue, 60)
    convert_only = SimpleWorker([conversions], connection=redis_client, serializer=JSONSerializer)
    convert_only.work(burst=True, logging_level="WARNING")

    deliveries = make_queue(redis_client, settings.webhook_queue, 60)
    (delivery,) = deliveries.get_jobs()
    assert delivery.func_name == DELIVER
    assert delivery.kwargs["event"] == "image.ready"
    assert conversions.count == 0 and receiver.received == []

    later = hooked.upload(photo())  # converted before the delivery waiting since
    assert later.status == 201, later.body
    (conversion_id,) = conversions.job_ids
    run_jobs()
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert headers["x-picstream-event"] == "image.ready" and verify(headers, body)
    converted, delivered = (
        Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
        for job_id in (conversion_id, delivery.id)
    )
    assert converted.ended_at is not None and delivered.started_at is not None
    assert converted.ended_at <= delivered.started_at
    assert hooked.request("GET", f"/v1/images/{later.json['id']}").json["status"] == "ready"


def test_a_delivery_queued_by_the_previous_version_is_still_sent(
    hook_env: dict[str, str],
    receiver: Receiver,
    run_jobs: Callable[[], None],
    redis_client: Redis,
    settings: Settings,
) -> None:
    """Deliveries queued before the webhook queue existed wait on the conversion queue and
    name no event: the worker still sends them, with the event their body announces."""
    url = f"http://127.0.0.1:{receiver.port}/hooks/picstream"
    body = json.dumps({"type": "image.failed", "record": {"id": "old"}}, separators=(",", ":"))
    legacy = {"url": url, "body": body, "image_id": "old"}
    make_queue(redis_client, settings.queue, 60).enqueue_call(DELIVER, kwargs=legacy)
    run_jobs()
    ((headers, sent),) = receiver.received
    assert sent == body.encode() and verify(headers, sent)
    assert headers["x-picstream-event"] == "image.failed"


LATER, CONFIRMED = 100.0, 100.0 + CONFIRM_AFTER  # sweeps as if this much later


def converted_with_hook(
    hooked: Api, receiver: Receiver, redis_client: Redis, settings: Settings
) -> str:
    """An upload with a callback, converted: its delivery waits on the webhook queue."""
    url = f"http://127.0.0.1:{receiver.port}/hooks/picstream"
    created = hooked.upload(photo(), query=f"?callback={quote(url, safe='')}")
    assert created.status == 201, created.body
    conversions = make_queue(redis_client, settings.queue, 60)
    SimpleWorker([conversions], connection=redis_client, serializer=JSONSerializer).work(
        burst=True, logging_level="WARNING"
    )
    assert len(deliveries_in_flight(redis_client)) == 1
    return str(created.json["id"])


def sweep(store: Store, redis_client: Redis, settings: Settings, later: float) -> int:
    """How many deliveries a janitor sweep `later` seconds from now queued again."""
    return sweep_later(store, redis_client, settings, later).redelivered


def test_a_delivery_lost_by_a_dying_worker_is_sent_again(
    hooked: Api,
    receiver: Receiver,
    run_jobs: Callable[[], None],
    redis_client: Redis,
    settings: Settings,
    store: Store,
) -> None:
    image_id = converted_with_hook(hooked, receiver, redis_client, settings)
    take_the_job(redis_client, settings.webhook_queue)
    run_jobs()
    assert receiver.received == []  # lost: nothing would ever send it

    assert sweep(store, redis_client, settings, LATER) == 0  # dead once: suspected
    assert sweep(store, redis_client, settings, CONFIRMED) == 1
    run_jobs()
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    assert verify(headers, body)
    assert json.loads(body)["record"]["id"] == image_id
    assert deliveries_in_flight(redis_client) == []  # delivered: nothing left to watch


def test_a_delivery_rq_gave_up_on_is_not_sent_again(
    hooked: Api,
    receiver: Receiver,
    run_jobs: Callable[[], None],
    redis_client: Redis,
    settings: Settings,
    store: Store,
) -> None:
    """rq's retries were spent (the receiver refused each): the janitor lets it go."""
    converted_with_hook(hooked, receiver, redis_client, settings)
    take_the_job(redis_client, settings.webhook_queue).set_status(JobStatus.FAILED)
    assert sweep(store, redis_client, settings, LATER) == 0
    assert deliveries_in_flight(redis_client) == []
    assert sweep(store, redis_client, settings, CONFIRMED) == 0
    run_jobs()
    assert receiver.received == []


def test_a_delivered_webhook_leaves_nothing_in_flight(
    hooked: Api,
    receiver: Receiver,
    run_jobs: Callable[[], None],
    redis_client: Redis,
    settings: Settings,
) -> None:
    converted_with_hook(hooked, receiver, redis_client, settings)
    run_jobs()
    assert len(receiver.received) == 1
    assert deliveries_in_flight(redis_client) == []


def test_a_delivery_whose_worker_died_is_handed_on_by_rq_alone(
    hooked: Api,
    receiver: Receiver,
    run_jobs: Callable[[], None],
    redis_client: Redis,
    settings: Settings,
    store: Store,
) -> None:
    """Its worker started it and was killed: rq's started registry still lists it, so rq's
    registry cleaning retries it — the janitor must not send it a second time."""
    converted_with_hook(hooked, receiver, redis_client, settings)
    job = take_the_job(redis_client, settings.webhook_queue)
    job.set_status(JobStatus.STARTED)
    job.heartbeat(datetime.fromtimestamp(time.time() - 200, UTC), 60)  # beats long stopped
    queue = make_queue(redis_client, settings.webhook_queue, 60)
    started = StartedJobRegistry(queue=queue)
    redis_client.zadd(started.key, {f"{job.id}:killed": time.time() - 100})  # its lease is up

    assert sweep(store, redis_client, settings, LATER) == 0
    assert sweep(store, redis_client, settings, CONFIRMED) == 0
    started.cleanup()  # rq: abandoned, to be retried after its first wait
    retries = ScheduledJobRegistry(queue=queue)
    redis_client.zadd(retries.key, {job.id: time.time() - 1})  # that wait is over
    run_jobs()
    assert len(receiver.received) == 1
