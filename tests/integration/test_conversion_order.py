"""The smallest variant is made, stored and announced first; the others follow as they are
made, longest first, each announced once, and the final event comes once, last. Jobs run
in-process (rq's SimpleWorker) against the real Redis and S3; order is asserted on the
events in the image's stream, never on timings."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from PIL import Image
from redis import Redis

from core.events import events_key
from core.settings import Settings
from tests.integration.conftest import ALICE_KEY, ConfigureJobs

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}

ONE_FORMAT = """
[profiles.default]
formats = ["webp"]
widths = [64, 160, 320]
"""


def photo(width: int = 900, height: int = 600) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 40)).save(out, "JPEG", quality=90)
    return out.getvalue()


def upload(client: falcon.testing.TestClient, body: bytes) -> dict[str, Any]:
    resp = client.simulate_post("/v1/images", body=body, headers=AS_ALICE)
    assert resp.status_code == 201, resp.text
    record: dict[str, Any] = resp.json
    return record


def stream(redis_client: Redis, record: dict[str, Any]) -> list[dict[str, str]]:
    entries: Any = redis_client.xrange(events_key(record["owner"], record["id"], record["gen"]))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def variant_events(events: list[dict[str, str]]) -> list[str]:
    return [e["name"] for e in events if e["type"] == "variant"]


def test_each_variant_announced_once_then_the_final_event_once(
    client: falcon.testing.TestClient, redis_client: Redis, run_jobs: Callable[[], None]
) -> None:
    # The default profile and its two encoders at once: variants are announced as they are
    # made, so their order is the encoders' race; what a client relies on is fixed.
    record = upload(client, photo())
    run_jobs()

    events = stream(redis_client, record)
    made = {"w256.avif", "w256.webp", "w256.jpg", "w1024.avif", "w1024.webp", "w1024.jpg"}
    assert sorted(variant_events(events)) == sorted(made)  # each exactly once
    finals = [e for e in events if e["type"] == "status" and e["status"] in ("ready", "failed")]
    assert [e["status"] for e in finals] == ["ready"]
    assert events[-1] is finals[0]
    # The start event (the plan, every variant pending) comes before any variant's.
    assert events[0]["type"] == "status" and events[0]["status"] == "processing"


@pytest.mark.parametrize(
    ("profile", "order"),
    [
        # 900x600: avif/webp/jpeg at 256 and 1024 (made at 900 px), no 2048.
        (None, ["w256.avif", "w256.webp", "w256.jpg", "w1024.avif", "w1024.webp", "w1024.jpg"]),
        (ONE_FORMAT, ["w64.webp", "w320.webp", "w160.webp"]),
    ],
)
def test_the_smallest_size_first_then_the_largest(
    tmp_path: Path,
    env: dict[str, str],
    configure_jobs: ConfigureJobs,
    client_with: Callable[..., falcon.testing.TestClient],
    redis_client: Redis,
    run_jobs: Callable[[], None],
    profile: str | None,
    order: list[str],
) -> None:
    # One encoder at a time makes the order exact: the smallest size, then largest first.
    overrides = {"PICSTREAM_CONVERT_THREADS": "1"}
    if profile is not None:
        path = tmp_path / "profiles.toml"
        path.write_text(profile)
        overrides["PICSTREAM_PROFILES"] = str(path)
    configure_jobs(Settings.from_env({**env, **overrides}))
    record = upload(client_with(**overrides), photo())
    run_jobs()

    events = stream(redis_client, record)
    assert variant_events(events) == order
    assert events[-1]["type"] == "status" and events[-1]["status"] == "ready"


def test_an_animation_is_encoded_before_stills_of_its_size(
    env: dict[str, str],
    configure_jobs: ConfigureJobs,
    client_with: Callable[..., falcon.testing.TestClient],
    redis_client: Redis,
    run_jobs: Callable[[], None],
) -> None:
    """Longest first after the thumbnail size: an 8-frame animated WebP costs more than
    the still AVIF of its size (an 800 px GIF's animated WebP is most of its conversion)."""
    overrides = {"PICSTREAM_CONVERT_THREADS": "1"}
    configure_jobs(Settings.from_env({**env, **overrides}))
    colours = [(40 * i, 200 - 20 * i, 90) for i in range(8)]
    first, *rest = [Image.new("RGB", (900, 600), c) for c in colours]
    out = io.BytesIO()
    first.save(out, "GIF", save_all=True, append_images=rest, duration=100, loop=0)
    record = upload(client_with(**overrides), out.getvalue())
    run_jobs()

    events = stream(redis_client, record)
    small = ["w256.avif", "w256.webp", "w256.jpg"]
    assert variant_events(events) == [*small, "w1024.webp", "w1024.avif", "w1024.jpg"]
    assert events[-1]["type"] == "status" and events[-1]["status"] == "ready"
