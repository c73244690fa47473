"""Download throughput and memory, and 500 live event watchers on one API process.

    .venv/bin/python -m bench.download [--mib 1024] [--rounds 3] [--watchers 500]

Starts its own redis-server, SeaweedFS and gunicorn (1 worker process) on loopback, and the
production front (nginx from deploy/nginx.conf in front of a second gunicorn, downloads handed
off with X-Accel-Redirect).
1. The same original fetched (a) with the minio SDK's get_object straight from the store,
   (b) through the API (gunicorn relays it with splice) and (c) through nginx (the app answers
   at once, nginx streams from the store); MiB/s, ratios to (a), CPU seconds per GiB of
   gunicorn, nginx (master + workers) and the store, and the gunicorn worker's RSS.
2. N Server-Sent Events watchers held open against that one process (over 100 images) while
   uploads run; events are appended to the images' Redis streams as the worker would, and
   the time until every watcher has each one is measured. Prints threads, RSS, latencies.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import threading
import time
from pathlib import Path

from redis import Redis

from bench.stack import Stack, running
from core.events import events_key
from core.storage import Store
from tests.http import Api
from tests.images import Body, png
from tests.keys import keys_of
from tests.servers import PeakRss, cpu_seconds, rss_kib

MiB = 1024 * 1024
KEY = "bench-key-0123456789abcdef"


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def sdk_get(store: Store, key: str) -> int:
    response = store.client.get_object(store.bucket, key)
    total = 0
    try:
        for chunk in response.stream(1024 * 1024):
            total += len(chunk)
    finally:
        response.close()
        response.release_conn()
    return total


def api_get(api: Api, path: str) -> int:
    with socket.create_connection((api.host, api.port)) as sock:
        sock.sendall(api.headers_for("GET", path))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        _, _, body = head.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        total = len(body)
        buf = bytearray(1024 * 1024)
        while total < length:
            got = sock.recv_into(buf)
            if not got:
                break
            total += got
    return total


def downloads(stack: Stack, size: int, rounds: int) -> None:
    body = Body(size)
    api, front = stack.api, stack.front_api
    created = api.upload(iter(body), headers={"Content-Length": str(size)})
    assert created.status == 201, created.body
    image_id = created.json["id"]
    key = keys_of(created.json).original
    path = f"/v1/images/{image_id}/original"
    pid = stack.web_worker_pid
    groups = {
        "gunicorn": [pid, stack.front_worker_pid],
        "nginx": stack.nginx_pids,
        "weed": [stack.s3.proc.pid],
    }
    wall: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    cpu = {row: dict.fromkeys(groups, 0.0) for row in ("b", "c")}
    peaks = []
    baseline = rss_kib(pid)
    for n in range(rounds):
        started = time.perf_counter()
        assert sdk_get(stack.store, key) == size
        wall["a"].append(time.perf_counter() - started)
        for row, through in (("b", api), ("c", front)):
            before = {name: cpu_of(group) for name, group in groups.items()}
            with PeakRss(pid) as peak:
                started = time.perf_counter()
                assert api_get(through, path) == size
                wall[row].append(time.perf_counter() - started)
            for name, group in groups.items():
                cpu[row][name] += cpu_of(group) - before[name]
            if row == "b":
                peaks.append(peak.peak)
        print(
            f"round {n + 1}: "
            + "  ".join(f"({k}) {size / MiB / v[-1]:.0f} MiB/s" for k, v in wall.items()),
            flush=True,
        )
    mibs = {k: size / MiB / statistics.median(v) for k, v in wall.items()}
    gib = size * rounds / 1024**3
    print(
        f"\n{size // MiB} MiB original, {rounds} rounds (median)   CPU s/GiB: gunicorn  nginx  weed"
    )
    names = {
        "a": "minio SDK get_object from the store",
        "b": "through the API (gunicorn relays)",
        "c": "through nginx (handed off)",
    }
    for k, name in names.items():
        cpus = "   ".join(f"{v / gib:5.2f}" for v in cpu[k].values()) if k in cpu else ""
        print(f"({k}) {name:37} {mibs[k]:8.1f} MiB/s   {cpus}")
    print(
        f"ratio (b)/(a) = {mibs['b'] / mibs['a']:.2f}   (c)/(a) = {mibs['c'] / mibs['a']:.2f}"
        "   target >= 0.9"
    )
    print(
        f"gunicorn worker RSS: {baseline / 1024:.0f} MiB before,"
        f" peak {max(peaks) / 1024:.0f} MiB during downloads\n"
    )


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


class Watchers:
    """N raw SSE connections multiplexed on one selector; records when each event arrives."""

    def __init__(self, api: Api, paths: list[str]) -> None:
        self.selector = selectors.DefaultSelector()
        self.arrivals: dict[str, list[float]] = {}
        self.buffers: dict[socket.socket, bytes] = {}
        for path in paths:
            sock = socket.create_connection((api.host, api.port))
            sock.sendall(api.headers_for("GET", path, "Accept: text/event-stream\r\n"))
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.buffers[sock] = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    self.selector.unregister(sock)
                    continue
                now = time.perf_counter()
                *messages, rest = (self.buffers[sock] + data).split(b"\n\n")
                self.buffers[sock] = rest
                for message in messages:
                    if b'"name":"probe-' in message:
                        probe = message.split(b'"name":"', 1)[1].split(b'"', 1)[0].decode()
                        self.arrivals.setdefault(probe, []).append(now)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in list(self.buffers):
            sock.close()


def watchers_bench(api: Api, redis: Redis, pid: int, count: int) -> None:
    made = [api.upload(png(8, 8)).json for _ in range(100)]  # no worker: all processing
    ids = [m["id"] for m in made]
    streams = [events_key("bench", m["id"], m["gen"]) for m in made]
    paths = [f"/v1/images/{ids[n % len(ids)]}/events" for n in range(count)]
    idle_rss, idle_threads = rss_kib(pid), threads_of(pid)
    watchers = Watchers(api, paths)
    time.sleep(3)
    print(
        f"{count} watchers open: gunicorn worker threads {idle_threads} -> {threads_of(pid)},"
        f" RSS {idle_rss / 1024:.0f} -> {rss_kib(pid) / 1024:.0f} MiB"
    )

    uploading = threading.Event()

    def upload_loop() -> None:
        body = Body(32 * MiB)
        while not uploading.is_set():
            api.upload(iter(body), headers={"Content-Length": str(body.size)})

    uploader = threading.Thread(target=upload_loop, daemon=True)
    uploader.start()
    latencies: list[float] = []
    per_image = count // len(ids) or 1
    for n in range(20):
        probe = f"probe-{n}"
        sent = time.perf_counter()
        pipe = redis.pipeline()
        for stream in streams:
            pipe.xadd(stream, {"type": "variant", "name": probe, "status": "ready"})
        pipe.execute()
        deadline = sent + 10
        while len(watchers.arrivals.get(probe, [])) < count and time.perf_counter() < deadline:
            time.sleep(0.005)
        got = watchers.arrivals.get(probe, [])
        latencies.extend(t - sent for t in got)
        if len(got) < count:
            print(f"  {probe}: only {len(got)} of {count} watchers got it within 10 s")
        time.sleep(0.2)
    uploading.set()
    uploader.join()
    latencies.sort()
    print(
        f"event latency over {len(latencies)} deliveries ({per_image} watchers per image,"
        f" uploads running): p50 {latencies[len(latencies) // 2] * 1000:.0f} ms,"
        f" p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms,"
        f" max {latencies[-1] * 1000:.0f} ms"
    )
    print(f"while watching: threads {threads_of(pid)}, RSS {rss_kib(pid) / 1024:.0f} MiB")
    watchers.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--watchers", type=int, default=500)
    args = parser.parse_args()
    overrides = {
        "PICSTREAM_MAX_UPLOAD_BYTES": "4GiB",
        "PICSTREAM_WEB_THREADS": str(args.watchers + 40),
        "PICSTREAM_MAX_EVENT_STREAMS": str(args.watchers + 10),
        "PICSTREAM_MAX_UPLOADS": "16",
    }
    with running("bench", KEY, front=True, **overrides) as stack:
        pid = stack.web_worker_pid
        downloads(stack, args.mib * MiB, args.rounds)
        watchers_bench(stack.api, Redis.from_url(stack.redis.extra["url"]), pid, args.watchers)


if __name__ == "__main__":
    main()
