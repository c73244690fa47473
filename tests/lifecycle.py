"""Helpers of the lifecycle tests (tests/integration/test_lifecycle*.py): requests as alice,
polling with a deadline, a store that acts once at a precise step, what the record and its
event stream went through, and images as the version before incarnations stored them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit

import falcon.testing
import pytest
import pyvips
from redis import Redis

from core import janitor
from core.errors import StorageUnavailable
from core.events import events_key
from core.models import ImageRecord
from core.records import Records
from core.settings import Settings
from core.storage import Store
from tests import pixels, servers
from tests.faults import Outage
from tests.http import Api
from tests.integration.conftest import ALICE_KEY
from tests.keys import keys_of, variant_key
from worker.jobs import ImageJob
from worker.services import JobServices

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
RunJobs = Callable[[], None]
ClientWith = Callable[..., falcon.testing.TestClient]
StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]


def put(client: falcon.testing.TestClient, image_id: str, body: bytes) -> Any:
    return client.simulate_put(f"/v1/images/{image_id}", body=body, headers=AS_ALICE)


def get(client: falcon.testing.TestClient, image_id: str) -> dict[str, Any]:
    resp = client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE)
    assert resp.status_code == 200, resp.text
    record: dict[str, Any] = resp.json
    return record


def landscape() -> bytes:
    return pixels.save(pixels.marked(300, 200), "PNG")


def portrait() -> bytes:
    return pixels.save(pixels.marked(200, 300), "PNG")


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def served_variant_sizes(client: falcon.testing.TestClient, record: dict[str, Any]) -> set[tuple]:
    """(width, height) of every variant as decoded from the bytes the API serves."""
    sizes = set()
    for variant in record["variants"]:
        resp = client.simulate_get(urlsplit(variant["url"]).path, headers=AS_ALICE)
        assert resp.status_code == 200, (variant["name"], resp.text)
        image = pyvips.Image.new_from_buffer(resp.content, "")
        sizes.add((image.width, image.height))
    return sizes


def stream(redis_client: Redis, record: dict[str, Any]) -> list[dict[str, str]]:
    """The events of this incarnation, oldest first."""
    key = events_key(record["owner"], record["id"], record["gen"])
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], redis_client.xrange(key))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def finals(story: list[dict[str, str]]) -> list[dict[str, str]]:
    """The events that end a conversion run."""
    return [e for e in story if e["type"] == "status" and e["status"] in ("ready", "failed")]


def while_watching(redis_client: Redis, image_id: str, act: Callable[[], None]) -> list[Any]:
    """Every state of the record seen while `act` runs (polled as fast as Redis answers)."""
    seen: list[ImageRecord] = []
    done = threading.Event()
    records = Records(redis_client)

    def watch() -> None:
        while not done.is_set():
            seen.append(records.get("alice", image_id))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        act()
    finally:
        done.set()
        watcher.join()
    seen.append(records.get("alice", image_id))
    return seen


Step = Callable[[str, str], bool]


def after_first_variant(method: str, key: str) -> bool:
    """A job wrote its first variant: it is mid-way."""
    return method == "put" and not key.endswith("record.json")


class ActingStore(Store):
    """Runs `act` once, the first time `when(method, key)` holds: before a `put_json` or
    `delete_prefix`, after a `put` (so the object it wrote is there when `act` runs)."""

    def __init__(self, store: Store, when: Step, act: Callable[[], None]) -> None:
        super().__init__(store.client, store.bucket)
        self.when = when
        self.act: Callable[[], None] | None = act

    def _maybe(self, method: str, key: str) -> None:
        if self.act is not None and self.when(method, key):
            act, self.act = self.act, None
            act()

    def put(self, key: str, data: Any, content_type: str, metadata: Any) -> None:
        super().put(key, data, content_type, metadata)
        self._maybe("put", key)

    def put_json(self, key: str, value: Any) -> None:
        self._maybe("put_json", key)
        super().put_json(key, value)

    def delete_prefix(self, prefix: str) -> int:
        self._maybe("delete_prefix", prefix)
        return super().delete_prefix(prefix)


def run_job_midway(
    settings: Settings,
    store: Store,
    redis_client: Redis,
    record: dict[str, Any],
    act: Callable[[], None],
) -> None:
    """Run the conversion job of `record` in-process, with `act` done once it is mid-way."""
    services = JobServices(
        settings, ActingStore(store, after_first_variant, act), Records(redis_client)
    )
    ImageJob(services, record["owner"], record["id"], record["gen"], record["vset"]).run()


def store_as_legacy(
    store: Store, redis_client: Redis, made: dict[str, Any], status: str | None = None
) -> None:
    """Move the image `made` (as the API returned it) to what the version before
    incarnations wrote: flat keys, a record without gen, vset or pending."""
    owner, image_id = made["owner"], made["id"]
    legacy = Records(redis_client).get(owner, image_id).to_dict()
    for name in ("gen", "vset", "pending"):
        legacy.pop(name)
    if status is not None:
        legacy["status"] = status
    moved = keys_of(made)
    store.copy(moved.original, f"{owner}/{image_id}/original")
    for variant in made["variants"]:
        store.copy(variant_key(made, variant["name"]), f"{owner}/{image_id}/{variant['name']}")
    store.put_json(f"{owner}/{image_id}/record.json", legacy)
    store.delete_prefix(moved.prefix)
    # Written raw, as the old version did: no public API writes a record without gen.
    redis_client.set(f"picstream:image:{owner}:{image_id}", json.dumps(legacy))


def delete_while_the_store_is_down(
    client: falcon.testing.TestClient, outage: Outage, image_id: str
) -> None:
    """DELETE while the store behind `outage` is down: accepted (202), the files left for
    the janitor; the store is back afterwards."""
    outage.cut()
    assert client.simulate_delete(f"/v1/images/{image_id}", headers=AS_ALICE).status_code == 202
    outage.down = False


def sweep_a_week_later(store: Store, redis_client: Redis) -> None:
    """The janitor's sweep a week from now: every purge is due by then."""
    janitor.run_once(store, Records(redis_client), now=time.time() + 7 * 86_400)


def run_job_losing_the_store_at_its_record_copy(
    settings: Settings, outage: Outage, redis_client: Redis, image_id: str, gen: str, vset: str
) -> None:
    """Run alice's conversion job of `image_id` in-process through `outage`, which cuts the
    store just before the job writes the bucket copy of the record: the job raises
    StorageUnavailable after its Redis switch. The store stays down."""
    flaky = Store.from_settings(replace(settings, s3_endpoint=outage.endpoint))
    cutting = ActingStore(flaky, lambda method, key: method == "put_json", outage.cut)
    services = JobServices(settings, cutting, Records(redis_client))
    with pytest.raises(StorageUnavailable):
        ImageJob(services, "alice", image_id, gen, vset).run()
