"""Scale on one machine: uploads/s with 1 and 2 web processes, conversions/s with 1 and 2
workers, what the store (SeaweedFS) and Redis cost per upload and per conversion, and what
each process costs in memory.

    .venv/bin/python -m bench.scale [--clients 8] [--seconds 8] [--conversions 8] [--rounds 1]

One redis-server and one SeaweedFS for the whole run (as a deployment shares them); per cell:

- uploads: a gunicorn with PICSTREAM_WEB_WORKERS=N (no conversion workers: their CPU would
  compete), --clients threads POSTing a ~1 MB JPEG on keep-alive connections for --seconds;
  uploads/s, p50/p99, CPU ms per upload of gunicorn, SeaweedFS and Redis, and the gunicorn
  workers' RSS idle and at peak;
- conversions: M `python -m worker`s started while rq is suspended, --conversions 12 MP
  camera-like JPEGs (4000x3000 q92, bench/convert.py's) uploaded, rq resumed; conversions/s
  from rq's own start and end times of the jobs (first start to last end), CPU ms per
  conversion of the workers (work-horses included: reaped children count to their rq
  worker), SeaweedFS and Redis, the rq worker's RSS idle and the peak RSS of a work-horse.

Redis memory: INFO used_memory before and after the uploads (records, index, rq jobs while
rq keeps them) and MEMORY USAGE of the image records themselves.

Cells take turns (--rounds repeats them in reverse order); the load average is printed with
every row: the machine is shared, so compare within a run. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.suspension import resume, suspend

from bench.convert import camera_like
from bench.small import drive, jpeg_of_about
from bench.stack import stack_env
from core.settings import Settings
from core.storage import Store
from deploy.seaweed import free_port
from tests import servers
from tests.hosts import descendants, wait_until
from tests.servers import PeakRss, rss_kib

KEY = "bench-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "image/jpeg"}


def cpu_with_children(pid: int) -> float:
    """User + system CPU of a process and of its reaped children (a worker's horses)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


@dataclass
class Base:
    work: Path
    env: dict[str, str]
    redis: servers.Server
    s3: servers.Server
    client: Redis

    def cpu(self) -> dict[str, float]:
        return {
            "weed": cpu_with_children(self.s3.proc.pid),
            "redis": cpu_with_children(self.redis.proc.pid),
        }

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])


@contextmanager
def base_stack() -> Iterator[Base]:
    with tempfile.TemporaryDirectory(prefix="picstream-scale-") as tmp:
        work = Path(tmp)
        redis = servers.start_redis(work / "redis")
        s3 = servers.start_seaweedfs(work / "s3")
        try:
            env = {
                **stack_env(redis, s3, "bench", KEY),
                "PICSTREAM_MAX_UPLOADS": "40",  # above the clients: none answered 503 Busy
            }
            Store.from_settings(Settings.from_env({**env, "PORT": "1"})).ensure_bucket()
            client = Redis.from_url(env["REDIS_URL"])
            yield Base(work, env, redis, s3, client)
            client.close()
        finally:
            s3.stop()
            redis.stop()


@contextmanager
def web(base: Base, processes: int) -> Iterator[servers.Server]:
    env = {
        **base.env,
        "PORT": str(free_port()),
        "PICSTREAM_WEB_WORKERS": str(processes),
    }
    server = servers.start_gunicorn(env, base.work / f"web-{processes}")
    try:
        wait_until(lambda: len(servers.worker_pids(server)) == processes, 30, "gunicorn workers")
        post(server.port, b"")  # each worker loads the app on its first request
        yield server
    finally:
        server.stop()


def post(port: int, body: bytes) -> str:
    """POST one image; its id ("" unless answered 201)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/images", body=body, headers=AUTH)
        resp = conn.getresponse()
        data = resp.read()
        return str(json.loads(data)["id"]) if resp.status == 201 else ""
    finally:
        conn.close()


# ---------------------------------------------------------------- uploads


@dataclass
class Uploads:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    elapsed: float = 0.0
    ids: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies) or [float("nan")]
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def drive_uploads(port: int, data: bytes, clients: int, seconds: float) -> Uploads:
    """bench/small.py's driver, keeping the created ids (their records are measured)."""
    ids: list[str] = []
    lock = threading.Lock()
    headers = {**AUTH, "Content-Length": str(len(data))}

    def one(_n: int) -> Callable[[], str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def upload() -> str | None:
            try:
                conn.request("POST", "/v1/images", body=data, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                return type(exc).__name__
            if resp.status != 201:
                return str(resp.status)
            with lock:
                ids.append(str(json.loads(body)["id"]))
            return None

        return upload

    cell = drive(clients, seconds, one)
    return Uploads(cell.latencies, sum(cell.failures.values()), cell.elapsed, ids)


def upload_cell(base: Base, processes: int, data: bytes, clients: int, seconds: float) -> str:
    with web(base, processes) as server:
        pids = servers.worker_pids(server)
        idle_rss = max(rss_kib(pid) for pid in pids)
        cpu_before = {"web": sum(cpu_with_children(p) for p in pids), **base.cpu()}
        memory_before = base.used_memory()
        peaks = [PeakRss(pid) for pid in pids]
        for peak in peaks:
            peak.__enter__()
        result = drive_uploads(server.port, data, clients, seconds)
        for peak in peaks:
            peak.__exit__()
        cpu_after = {"web": sum(cpu_with_children(p) for p in pids), **base.cpu()}
        memory_after = base.used_memory()
    done = max(len(result.latencies), 1)
    cpu = {k: (cpu_after[k] - cpu_before[k]) / done * 1000 for k in cpu_before}
    record_bytes = record_memory(base.client, result.ids[:50])
    return (
        f"  uploads  web={processes}  {len(result.latencies) / result.elapsed:6.1f}/s"
        f"  p50 {result.pct(0.5):6.0f} ms  p99 {result.pct(0.99):6.0f} ms"
        f"  cpu ms/upload web {cpu['web']:5.1f} weed {cpu['weed']:5.1f} redis {cpu['redis']:4.2f}"
        f"  web RSS idle {idle_rss / 1024:.0f} MiB peak {max(p.peak for p in peaks) / 1024:.0f} MiB"
        f"  redis +{(memory_after - memory_before) / done:.0f} B/upload incl. its queued job"
        f" (record {record_bytes:.0f} B)  failed {result.failures}  {load()}"
    )


def record_memory(client: Redis, ids: list[str]) -> float:
    """Mean MEMORY USAGE of the image records (their hash/string key alone)."""
    sizes = [client.memory_usage(f"picstream:image:bench:{i}") or 0 for i in ids if i]
    return statistics.mean(sizes) if sizes else float("nan")


# ---------------------------------------------------------------- conversions


def conversion_cell(base: Base, workers: int, photo: bytes, count: int) -> str:
    # The upload cells queued a conversion per upload, with no worker to run them: drop them.
    Queue("convert", connection=base.client, serializer=JSONSerializer).empty()
    suspend(base.client)
    started: list[servers.Server] = []
    try:
        for n in range(workers):
            started.append(servers.start_worker(base.env, base.work / "workers", f"w{workers}-{n}"))
        wait_until(
            lambda: len(Worker.all(connection=base.client)) == workers, 60, "workers to register"
        )
        rq_pids = [child for s in started for child in servers.worker_pids(s)]
        idle_rss = max(rss_kib(pid) for pid in rq_pids)
        with web(base, 1) as server:
            ids = [post(server.port, photo) for _ in range(count)]
        cpu_before = {"workers": sum(cpu_with_children(p) for p in rq_pids), **base.cpu()}
        horse_peak = [0]
        stop = threading.Event()

        def watch_horses() -> None:
            while not stop.is_set():
                for pid in rq_pids:
                    for child in descendants(pid):
                        horse_peak[0] = max(horse_peak[0], rss_kib_safe(child))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_horses, daemon=True)
        watcher.start()
        resume(base.client)
        wait_until(lambda: all_done(base.client, ids), 300, "the conversions", pause=0.2)
        stop.set()
        watcher.join()
        cpu_after = {"workers": sum(cpu_with_children(p) for p in rq_pids), **base.cpu()}
    finally:
        resume(base.client)
        for server in started:
            server.stop()
    jobs = [
        Job.fetch(jid, connection=base.client, serializer=JSONSerializer)
        for jid in finished_jobs(base.client)
    ]
    jobs = [j for j in jobs if j.started_at and j.ended_at and j.kwargs.get("image_id") in ids]
    span = max(j.ended_at for j in jobs) - min(j.started_at for j in jobs)  # type: ignore[type-var,operator]
    seconds = span.total_seconds()
    cpu = {k: (cpu_after[k] - cpu_before[k]) / count * 1000 for k in cpu_before}
    base.client.delete("rq:finished:convert")
    converted = record_memory(base.client, ids)
    return (
        f"  convert  workers={workers}  {len(jobs) / seconds:5.2f}/s"
        f" ({len(jobs)} in {seconds:.1f} s)"
        f"  cpu ms/conversion workers {cpu['workers']:6.0f} weed {cpu['weed']:5.1f}"
        f" redis {cpu['redis']:4.1f}  rq worker RSS idle {idle_rss / 1024:.0f} MiB"
        f"  horse peak {horse_peak[0] / 1024:.0f} MiB  record {converted:.0f} B  {load()}"
    )


def rss_kib_safe(pid: int) -> int:
    try:
        return rss_kib(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def finished_jobs(client: Redis) -> list[str]:
    members: list[bytes] = client.zrange("rq:finished:convert", 0, -1)  # type: ignore[assignment]
    return [m.decode() for m in members]


def all_done(client: Redis, ids: list[str]) -> bool:
    """Every image's record (a JSON string) has left `processing`."""
    for image_id in ids:
        raw = client.get(f"picstream:image:bench:{image_id}")
        if raw is None or json.loads(raw)["status"] == "processing":
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--conversions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    data = jpeg_of_about(1_000_000)
    photo = bytes(camera_like(4000, 3000).jpegsave_buffer(Q=92))
    print(f"{os.cpu_count()} cores; upload {len(data)} B; photo {len(photo)} B; {load()}")
    with base_stack() as base:
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for n in order:
                print(upload_cell(base, n, data, args.clients, args.seconds), flush=True)
            for m in order:
                print(conversion_cell(base, m, photo, args.conversions), flush=True)


if __name__ == "__main__":
    main()
