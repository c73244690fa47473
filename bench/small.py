"""Small uploads: the API against the minio SDK's put_object of the same bytes, same run.

    .venv/bin/python -m bench.small [--sizes 100k,1m,4m] [--clients 1,8,32] [--seconds 6]
                                    [--web-workers 2]

Starts redis-server, SeaweedFS and gunicorn on loopback (no conversion workers: their CPU
would be measured against the API), then for each image size and number of concurrent
clients, in alternating order: (direct) `put_object` of the image to the store by the SDK,
each client thread with its own key and the SDK's connection pool; (api) the same bytes
POSTed to /v1/images, each client on its own keep-alive connection, as an app would. Each
cell runs for --seconds; prints uploads/s, p50/p99 latency, the API/direct ratio, CPU
milliseconds per upload of gunicorn, SeaweedFS, Redis and the clients (this process), and
the gunicorn workers' RSS before and after. Every API answer must be 201 (anything else is
counted and printed).

The machine is shared and noisy: compare ratios within a run, not numbers across runs."""

from __future__ import annotations

import argparse
import http.client
import io
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import urllib3
from minio import Minio

from bench.stack import Stack, running
from tests import servers
from tests.servers import cpu_seconds, rss_kib

KEY = "bench-key-0123456789abcdef"
SIZES = {"100k": 100_000, "1m": 1_000_000, "4m": 4_000_000}


def jpeg_of_about(size: int) -> bytes:
    """A real JPEG (noise, q85) within 15 % of `size` bytes."""
    import pyvips

    side = 256
    for _ in range(30):
        image = pyvips.Image.gaussnoise(side, side, mean=128, sigma=40).cast("uchar")
        data: bytes = image.bandjoin([image, image]).jpegsave_buffer(Q=85)
        if abs(len(data) - size) <= 0.15 * size:
            return data
        side = max(16, int(side * (size / len(data)) ** 0.5))
    return data


@dataclass
class Cell:
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def drive(clients: int, seconds: float, one: Callable[[int], Callable[[], str | None]]) -> Cell:
    """`clients` threads each calling its uploader until `seconds` have passed."""
    cell = Cell()
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(n: int) -> None:
        upload = one(n)
        start.wait()
        while time.perf_counter() < stop_at[0]:
            began = time.perf_counter()
            failure = upload()
            took = time.perf_counter() - began
            with lock:
                if failure is None:
                    cell.latencies.append(took)
                else:
                    cell.failures[failure] = cell.failures.get(failure, 0) + 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    cell.elapsed = time.perf_counter() - began
    return cell


def direct_uploader(
    stack: Stack, data: bytes, clients: int
) -> Callable[[int], Callable[[], str | None]]:
    endpoint = stack.env["S3_ENDPOINT"].split("://", 1)[1]
    pool = urllib3.PoolManager(maxsize=max(clients, 10), retries=False)
    sdk = Minio(
        endpoint,
        access_key=servers.S3_KEY,
        secret_key=servers.S3_SECRET,
        secure=False,
        region=stack.settings.s3_region,
        http_client=pool,
    )
    counter = iter(range(10**9))

    def one(n: int) -> Callable[[], str | None]:
        def upload() -> str | None:
            key = f"direct/{n}/{next(counter)}.jpg"
            sdk.put_object(stack.settings.s3_bucket, key, io.BytesIO(data), len(data), "image/jpeg")
            return None

        return upload

    return one


def api_uploader(stack: Stack, data: bytes) -> Callable[[int], Callable[[], str | None]]:
    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": "image/jpeg",
        "Content-Length": str(len(data)),
    }

    def one(n: int) -> Callable[[], str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", stack.api.port, timeout=60)

        def upload() -> str | None:
            try:
                conn.request("POST", "/v1/images", body=data, headers=headers)
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                return type(exc).__name__
            if resp.will_close:
                conn.close()
            return None if resp.status == 201 else str(resp.status)

        return upload

    return one


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}


def measure(
    stack: Stack,
    label: str,
    make: Callable[[int], Callable[[], str | None]],
    clients: int,
    seconds: float,
    pids: dict[str, list[int]],
) -> tuple[Cell, dict[str, float]]:
    before = cpu_of(pids)
    cell = drive(clients, seconds, make)
    after = cpu_of(pids)
    done = max(len(cell.latencies), 1)
    per_upload = {name: (after[name] - before[name]) / done * 1000 for name in pids}
    return cell, per_upload


def row(label: str, cell: Cell, cpu: dict[str, float], ratio: str) -> str:
    failures = ", ".join(f"{k}x{v}" for k, v in sorted(cell.failures.items())) or "-"
    cpu_text = " ".join(f"{name}={ms:.1f}" for name, ms in cpu.items())
    return (
        f"  {label:<7}{cell.rate:>9.1f}/s  p50 {cell.pct(0.5):>7.1f} ms  p99 {cell.pct(0.99):>7.1f}"
        f" ms  {ratio:>6}  cpu ms/upload: {cpu_text}  failed: {failures}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100k,1m,4m")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--web-workers", type=int, default=2)
    args = parser.parse_args()
    overrides = {
        "PICSTREAM_WEB_WORKERS": str(args.web_workers),
        # Above the clients: every upload is admitted, none answered 503 Busy.
        "PICSTREAM_MAX_UPLOADS": "40",
    }
    with running("bench", KEY, **overrides) as stack:
        web_pids = servers.worker_pids(stack.web)
        pids = {
            "gunicorn": web_pids,
            "weed": [stack.s3.proc.pid],
            "redis": [stack.redis.proc.pid],
            "client": [os.getpid()],
        }
        print(f"gunicorn workers: {len(web_pids)}, load average {os.getloadavg()[0]:.2f}")
        rss_start = sum(rss_kib(pid) for pid in web_pids)
        for size_name in args.sizes.split(","):
            data = jpeg_of_about(SIZES[size_name])
            for clients in (int(c) for c in args.clients.split(",")):
                print(f"{size_name} ({len(data)} bytes), {clients} clients:")
                cells: dict[str, tuple[Cell, dict[str, float]]] = {}
                order = ["direct", "api"] if clients % 2 else ["api", "direct"]
                for path in order:
                    make = (
                        direct_uploader(stack, data, clients)
                        if path == "direct"
                        else api_uploader(stack, data)
                    )
                    cells[path] = measure(stack, path, make, clients, args.seconds, pids)
                direct, api = cells["direct"][0], cells["api"][0]
                ratio = f"{api.rate / direct.rate:.2f}" if direct.rate else "-"
                print(row("direct", *cells["direct"], ""))
                print(row("api", *cells["api"], ratio))
        rss_end = sum(rss_kib(pid) for pid in web_pids)
        print(
            f"gunicorn RSS: {rss_start / 1024:.0f} MiB at start, {rss_end / 1024:.0f} MiB at"
            f" the end; load average {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
