"""Sentinel failover: a master, a replica and three Sentinels (tests/sentinel.py); a real
gunicorn and a real `python -m worker` on `redis+sentinel://`. The master is SIGKILLed while
uploads, conversions and event streams run."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import falcon.testing
import pytest
from PIL import Image
from redis import Redis

from api.app import create_app
from api.main import build_collaborators
from core import janitor
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store
from tests import servers
from tests.http import Api, EventReader
from tests.integration.conftest import ALICE_KEY, close_services, make_env
from tests.sentinel import SentinelSet, start_sentinel_set, wait_for

PROFILES = """
[profiles.default]
formats = ["jpeg"]
widths = [256]
"""
RECOVERY = 30.0  # the bound: the service answers 201 again within this of the kill
UPLOADERS = 3


def photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 90, 200)).save(out, "JPEG", quality=85)
    return out.getvalue()


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[SentinelSet]:
    started = start_sentinel_set(tmp_path / "redis")
    yield started
    started.stop()


@dataclass
class Answer:
    began: float  # monotonic
    status: int
    content_type: str
    body: dict[str, object]


@dataclass
class Watcher:
    """An EventSource as a browser runs it: reads events, reconnects with Last-Event-ID
    when the stream ends or breaks, stops at `ready` (or a 204)."""

    api: Api
    image_id: str
    last_id: str | None = None
    events: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    ready = False
    thread: threading.Thread | None = None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and not self.ready:
            try:
                reader = EventReader(
                    self.api, f"/v1/images/{self.image_id}/events", self.last_id, timeout=20
                )
            except OSError:
                stop.wait(0.5)  # EventSource waits its `retry` before reconnecting
                continue
            self.answers.append(reader.response.status)
            if reader.response.status == 204:
                reader.close()
                return
            try:
                while (event := reader.next()) is not None:
                    self.last_id = event.id or self.last_id
                    status = event.data.get("status") if isinstance(event.data, dict) else None
                    self.events.append(f"{event.event}:{status}")
                    if event.event == "status" and status == "ready":
                        self.ready = True
                        break
            except OSError:
                pass
            finally:
                reader.close()
            stop.wait(0.5)


def upload_loop(api: Api, body: bytes, answers: list[Answer], stop: threading.Event) -> None:
    while not stop.is_set():
        began = time.monotonic()
        try:
            resp = api.upload(body, headers={"Content-Type": "image/jpeg"})
        except OSError as exc:  # no answer at all: recorded, and fails the test below
            answers.append(Answer(began, 0, "", {"error": repr(exc)}))
            continue
        content_type = resp.header("content-type") or ""
        parsed = resp.json if "json" in content_type else {"body": resp.body[:200]}
        answers.append(Answer(began, resp.status, content_type, parsed))
        stop.wait(0.1)  # pacing: a few uploads a second each, not a flood of conversions


@pytest.mark.timeout(480)  # the conversions' deadline below, and the servers' start and stop
def test_the_service_rides_out_a_master_killed_mid_traffic(
    cluster: SentinelSet, s3_server: servers.Server, store: Store, tmp_path: Path
) -> None:
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(PROFILES)
    env = make_env(
        cluster.url,
        s3_server.extra["endpoint"],
        PICSTREAM_PROFILES=str(profiles),
        PICSTREAM_REDIS_TIMEOUT="2",
        PICSTREAM_WEB_THREADS="24",
        PICSTREAM_MAX_EVENT_STREAMS="8",
        # The janitor queues again a conversion whose job the failover lost (its
        # registration, or the record update that ended it, not yet replicated).
        PICSTREAM_JANITOR_INTERVAL="5",
    )
    settings = Settings.from_env(env)
    web = servers.start_gunicorn(env, tmp_path / "web")
    worker: servers.Server | None = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        api = Api("127.0.0.1", web.port, ALICE_KEY)
        body = photo()
        # Watched images are queued before any worker runs, so their conversions (and their
        # streams) are under way or still to come when the master dies.
        watchers = []
        for _ in range(4):
            resp = api.upload(body, headers={"Content-Type": "image/jpeg"})
            assert resp.status == 201, resp.body
            watchers.append(Watcher(api, resp.json["id"]))
        for watcher in watchers:
            watcher.thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
            watcher.thread.start()
        wait_for(lambda: all(w.events for w in watchers), 20, "the watchers got no status")
        answers: list[Answer] = []
        for _ in range(UPLOADERS):
            threads.append(
                threading.Thread(target=upload_loop, args=(api, body, answers, stop), daemon=True)
            )
            threads[-1].start()
        worker = servers.start_worker(env, tmp_path / "worker")
        # Kill once conversions run: a watcher saw more than its opening status.
        wait_for(lambda: any(len(w.events) > 1 for w in watchers), 30, "no conversion began")
        killed_at = time.monotonic()
        old = cluster.kill_master()

        def recovered() -> bool:
            return any(a.status == 201 and a.began > killed_at for a in answers)

        wait_for(recovered, RECOVERY, "no upload was answered 201 after the master died")
        assert cluster.master_port() not in (None, old)
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 2 * UPLOADERS, 20, "uploads stalled again")
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

        # Every other answer was a 503 problem.
        others = [a for a in answers if a.status != 201]
        assert all(a.status == 503 for a in others), [(a.status, a.body) for a in others]
        assert all(a.content_type == "application/problem+json" for a in others)
        accepted = {str(a.body["id"]) for a in answers if a.status == 201}
        accepted |= {w.image_id for w in watchers}

        # Every image answered 201 is there, converted (its variant in the bucket).
        def all_ready() -> bool:
            return all(
                api.request("GET", f"/v1/images/{i}").json["status"] == "ready" for i in accepted
            )

        # A conversion the failover cut is handed on by rq's abandoned-job handling (60 s
        # after its worker's last heartbeat) and retried, or, when the failover lost its
        # job, queued again by the janitor (90 s after it was last seen alive): a deadline
        # for those, not a timing (the 30 s bound is the 201 above).
        wait_for(all_ready, 240, "not every accepted image became ready")
        for watcher in watchers:
            assert watcher.thread is not None
            watcher.thread.join(timeout=30)
            assert watcher.ready, (watcher.image_id, watcher.events, watcher.answers)
            assert set(watcher.answers) <= {200}, watcher.answers

        # Nothing else is left: only accepted images in Redis and in the bucket, once the
        # janitor ran as if every job had timed out.
        records = Records(connect(settings))
        try:
            janitor.run_once(store, records, now=time.time() + settings.job_timeout + 3600)
            kept = {image_id for _, image_id in records.all_ids()}
            assert kept == accepted
            redis = records.redis
            assert not redis.keys("picstream:lease:*")
            assert redis.zcard("picstream:purges") == 0
            assert redis.zcard("picstream:multipart") == 0
            gens = {f"alice/{i}/{records.get('alice', i).gen}/" for i in accepted}
            stray = [k for k in store.keys("") if not any(k.startswith(g) for g in gens)]
            assert not stray
            for image_id in accepted:
                record = records.get("alice", image_id)
                assert all(v.status == "ready" for v in record.variants), record
        finally:
            records.redis.close()
    finally:
        stop.set()
        if worker is not None:
            worker.stop()
        web.stop()


def test_a_commit_is_answered_once_the_replica_has_it_or_taken_back(
    cluster: SentinelSet, s3_server: servers.Server, store: Store, tmp_path: Path
) -> None:
    """201 means the replica holds the record already; a replica that is online but does
    not acknowledge within PICSTREAM_REDIS_WAIT_TIMEOUT (SIGSTOPped) makes the commit be
    taken back: 503 and nothing left, not a record the client was told is missing."""
    env = make_env(cluster.url, s3_server.extra["endpoint"], PICSTREAM_REDIS_TIMEOUT="2")
    settings = Settings.from_env(env)
    services = build_collaborators(settings)
    client = falcon.testing.TestClient(create_app(services))
    headers = {"Authorization": f"Bearer {ALICE_KEY}", "Content-Type": "image/jpeg"}
    master = cluster.master_port()
    assert master is not None
    replica = next(node for node in cluster.nodes if node.port != master)
    on_replica = Redis(port=replica.port)
    try:
        created = client.simulate_post("/v1/images", body=photo(), headers=headers)
        assert created.status_code == 201
        image_id = created.json["id"]
        assert on_replica.exists(f"picstream:image:alice:{image_id}")  # no lag left to lose

        replica.proc.send_signal(signal.SIGSTOP)
        try:
            refused = client.simulate_post("/v1/images", body=photo(), headers=headers)
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert "taken back" in refused.json["detail"]

        # A resumable upload whose final PATCH is taken back is ended: a HEAD must never
        # report complete an upload that has no image.
        body = photo()
        tus = {"Authorization": f"Bearer {ALICE_KEY}", "Tus-Resumable": "1.0.0"}
        made = client.simulate_post("/v1/tus", headers={**tus, "Upload-Length": str(len(body))})
        assert made.status_code == 201, made.text
        location = made.headers["location"]
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            patched = client.simulate_patch(
                location,
                body=body,
                headers={
                    **tus,
                    "Content-Type": "application/offset+octet-stream",
                    "Upload-Offset": "0",
                },
            )
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        assert patched.status_code == 503, patched.text
        assert "taken back" in patched.json["detail"]
        assert client.simulate_head(location, headers=tus).status_code == 404

        records = services.records
        janitor.run_once(store, records, now=time.time() + settings.job_timeout + 3600)
        assert {i for _, i in records.all_ids()} == {image_id}
        gen = records.get("alice", image_id).gen
        assert all(key.startswith(f"alice/{image_id}/{gen}/") for key in store.keys(""))
        assert records.redis.zcard("picstream:purges") == 0
    finally:
        on_replica.close()
        close_services(services)
