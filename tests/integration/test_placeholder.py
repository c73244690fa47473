"""Placeholders end to end: uploads through a real gunicorn, the conversion job run in-process
against the real Redis and S3, the record read back through the API as a page reads it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageStat
from redis import Redis

from core.events import events_key
from core.storage import Store
from tests import pixels
from tests.http import Api
from tests.keys import keys_of
from tests.thumbhash import decode

RunJobs = Callable[[], None]


def upload(api: Api, body: bytes) -> dict[str, Any]:
    resp = api.upload(body)
    assert resp.status == 201, resp.body
    record: dict[str, Any] = resp.json
    return record


def get(api: Api, image_id: str) -> dict[str, Any]:
    resp = api.request("GET", f"/v1/images/{image_id}")
    assert resp.status == 200, resp.body
    record: dict[str, Any] = resp.json
    return record


def first_event(redis_client: Redis, record: dict[str, Any]) -> dict[str, str]:
    stream = events_key(record["owner"], record["id"], record["gen"])
    entries: Any = redis_client.xrange(stream, count=1)
    return {k.decode(): v.decode() for k, v in entries[0][1].items()}


def rgb(colour: str) -> tuple[int, int, int]:
    r, g, b = bytes.fromhex(colour.removeprefix("#"))
    return r, g, b


def test_a_converted_image_carries_its_placeholder(
    api: Api, run_jobs: RunJobs, store: Store, redis_client: Redis
) -> None:
    body = pixels.save(Image.new("RGB", (400, 300), (255, 0, 0)), "PNG")
    uploaded = upload(api, body)
    assert uploaded["placeholder"] is None  # nothing decoded yet
    run_jobs()

    record = get(api, uploaded["id"])
    assert record["status"] == "ready"
    placeholder = record["placeholder"]
    assert placeholder["color"] == "#ff0000"
    shown = decode(placeholder["thumbhash"])
    assert shown.width > shown.height and not shown.has_alpha
    r, g, b, a = shown.pixel(shown.width // 2, shown.height // 2)
    assert r > 230 and g < 25 and b < 25 and a == 255, (r, g, b, a)
    # The bucket copy has it too.
    assert json.loads(store.read_bytes(keys_of(record).record))["placeholder"] == placeholder
    # It came with the first event of the conversion, while the variants were still to come.
    started = json.loads(first_event(redis_client, record)["record"])
    assert started["status"] == "processing" and started["placeholder"] == placeholder


def test_the_colour_is_the_average_of_the_picture(api: Api, run_jobs: RunJobs) -> None:
    picture = pixels.marked(640, 480)  # grey with a red and a blue corner
    image_id = upload(api, pixels.save(picture, "JPEG", quality=95))["id"]
    run_jobs()

    colour = rgb(get(api, image_id)["placeholder"]["color"])
    expected = ImageStat.Stat(picture).mean
    assert all(abs(c - e) <= 3 for c, e in zip(colour, expected, strict=True)), colour


def test_transparency_shows_in_the_placeholder_and_survives_a_reconvert(
    api: Api, run_jobs: RunJobs
) -> None:
    # Opaque orange on top, fully transparent green below: the green must not count.
    im = Image.new("RGBA", (300, 300), (0, 255, 0, 0))
    im.paste((*pixels.ORANGE, 255), (0, 0, 300, 150))
    image_id = upload(api, pixels.save(im, "PNG"))["id"]
    run_jobs()

    placeholder = get(api, image_id)["placeholder"]
    assert placeholder["color"] == "#c86432"  # ORANGE, (200, 100, 50)
    shown = decode(placeholder["thumbhash"])
    assert shown.has_alpha
    assert shown.pixel(16, 2)[3] > 200 and shown.pixel(16, 29)[3] < 60

    resp = api.request("POST", f"/v1/images/{image_id}/reconvert")
    assert resp.status == 202, resp.body
    run_jobs()
    record = get(api, image_id)
    assert record["status"] == "ready" and record["pending"] is None
    assert record["placeholder"] == placeholder  # the same image: the same placeholder
