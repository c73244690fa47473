"""End to end: a real gunicorn, real `python -m worker` processes, real Redis and S3."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from core.jobs import make_queue
from core.settings import Settings
from core.storage import Store
from tests import pixels, servers
from tests.http import Api
from tests.keys import variant_key

StartWorker = Callable[..., servers.Server]


@pytest.fixture()
def start_worker(env: dict[str, str], workdir: Path) -> Iterator[StartWorker]:
    """Start `python -m worker` processes (stopped after the test)."""
    started: list[servers.Server] = []

    def start(name: str = "worker", **overrides: str) -> servers.Server:
        server = servers.start_worker({**env, **overrides}, workdir / "workers", name)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for(api: Api, image_id: str, timeout: float) -> dict[str, Any]:
    """Poll the record until it leaves `processing`."""
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = api.request("GET", f"/v1/images/{image_id}").json
        if record["status"] != "processing" or time.monotonic() > deadline:
            return record
        time.sleep(0.25)


def test_an_upload_through_gunicorn_is_converted_by_a_worker_process(
    api: Api, start_worker: StartWorker, store: Store
) -> None:
    worker = start_worker()
    resp = api.upload(
        pixels.jpeg_with_orientation(8, 900, 600), headers={"Content-Type": "image/jpeg"}
    )
    assert resp.status == 201, resp.body
    record = wait_for(api, resp.json["id"], timeout=60)
    assert record["status"] == "ready", (record, worker.output()[-3000:])
    for variant in record["variants"]:
        data = store.read_bytes(variant_key(record, variant["name"]))
        image = pyvips.Image.new_from_buffer(data, "")
        assert (image.width, image.height) == (variant["width"], variant["height"])
        assert abs(image.width / image.height - 1.5) < 0.01  # upright: 900x600 displayed


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return children + [d for child in children for d in descendants(child)]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


SLOW = (
    '[profiles.default]\nformats = ["avif"]\nwidths = [2000]\n[profiles.default.avif]\neffort = 8\n'
)
FAST = '[profiles.default]\nformats = ["webp"]\nwidths = [200]\n'


@pytest.mark.slow
def test_a_job_whose_worker_dies_with_its_horse_completes_on_another_worker(
    api: Api,
    start_worker: StartWorker,
    redis_client: Redis,
    settings: Settings,
    tmp_path: Path,
) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(SLOW)  # minutes of AVIF effort: the job is surely mid-way when killed
    first = start_worker("doomed", PICSTREAM_PROFILES=str(profiles))
    noise = pyvips.Image.gaussnoise(2000, 1500, sigma=50, mean=128)
    photo = noise.bandjoin([noise, noise]).cast("uchar").copy(interpretation="srgb")
    resp = api.upload(bytes(photo.jpegsave_buffer(Q=90)), headers={"Content-Type": "image/jpeg"})
    assert resp.status == 201, resp.body
    image_id = resp.json["id"]

    started = StartedJobRegistry(queue=make_queue(redis_client, settings.queue, 60))
    wait_until(lambda: started.count == 1, 60, "the job to start")
    job_id = started.get_job_ids()[0]
    wait_until(lambda: len(descendants(first.proc.pid)) >= 1, 30, "the work-horse")
    wait_until(
        lambda: (
            api.request("GET", f"/v1/images/{image_id}").json["variants"][0]["name"] == "w2000.avif"
        ),
        60,
        "the job to decode and plan",
    )

    # A host crash: the worker, its work-horse and its scheduler die at once, no clean-up.
    for pid in [*descendants(first.proc.pid), first.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.proc.wait()

    profiles.write_text(FAST)  # the re-run need not take minutes again
    second = start_worker("survivor", PICSTREAM_PROFILES=str(profiles))
    record = wait_for(api, image_id, timeout=150)
    took = time.monotonic() - killed_at
    assert record["status"] == "ready", (record, second.output()[-3000:])
    assert took < 120, f"recovered after {took:.0f} s"
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    # rq finishes its bookkeeping just after the job wrote the final record.
    wait_until(lambda: job.get_status(refresh=True) == "finished", 10, "rq to finish the job")
    job.refresh()
    assert job.worker_name and job.worker_name in second.output()
    print(f"recovered and completed {took:.0f} s after the crash")


def test_an_image_too_big_for_the_memory_limit_ends_failed(
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]],
    env: dict[str, str],
    start_worker: StartWorker,
) -> None:
    """The work-horse's data-segment limit stops a conversion that needs too much memory:
    the image is recorded failed (at once when Python sees the MemoryError; after rq's
    retries when libvips/GLib abort the process instead) and the worker goes on."""
    _, api = start_api({**env, "PICSTREAM_RETRY_INTERVALS": "0"})
    start_worker(PICSTREAM_JOB_MEMORY="200MiB")
    # A 6000x4000 BMP is decoded whole (72 MB, then copied for libvips): above 200 MiB.
    noise = pyvips.Image.gaussnoise(6000, 4000, sigma=40, mean=128).cast("uchar")
    im = Image.frombytes("L", (6000, 4000), noise.write_to_memory()).convert("RGB")
    resp = api.upload(pixels.save(im, "BMP"), headers={"Content-Type": "image/bmp"})
    assert resp.status == 201, resp.body
    small = api.upload(pixels.save(pixels.marked(), "BMP"), headers={"Content-Type": "image/bmp"})
    record = wait_for(api, resp.json["id"], timeout=60)
    assert record["status"] == "failed", record
    assert "needs more memory" in record["error"] or "died" in record["error"], record["error"]
    assert wait_for(api, small.json["id"], timeout=30)["status"] == "ready"
