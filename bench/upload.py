"""Upload throughput and memory: the API against the minio SDK alone, same run, same store.

    .venv/bin/python -m bench.upload [--mib 1024] [--rounds 2]

Starts its own redis-server, SeaweedFS and gunicorn (1 worker process) on loopback, and the
production front (nginx from deploy/nginx.conf in front of a second gunicorn), then per
round: (a) the SDK's put_object of the stream straight to the store; (b) the same bytes
through the API with Content-Length; (c) chunked, 1 MiB chunks; (d) the API's ingest loop
alone (hash + sniff into a null sink, no network); (e) through nginx with Content-Length.
Prints MiB/s, CPU seconds per GiB of each process (gunicorn: both workers, nginx: master +
workers), the ratios to (a), the gunicorn workers' RSS before and at their peak during
(b)/(c)/(e), and which body readers the direct gunicorn took. The machine is shared and
noisy: compare ratios within a run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator

from api.gunicorn import CHUNKED_MISSED, RECV_INTO_MISSED
from bench.stack import running
from core.ingest import Ingest, Limits, NullSink, ReadSource
from core.settings import Settings
from core.storage import Store
from tests.http import Api
from tests.images import Body
from tests.servers import PeakRss, cpu_seconds, rss_kib

MiB = 1024 * 1024
KEY = "bench-key-0123456789abcdef"


class StreamReader:
    """A file-like read(n) over a Body's pieces (what the SDK and the ingest loop consume)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces = pieces
        self.buf = b""

    def read(self, n: int = -1) -> bytes:
        while len(self.buf) < n:
            try:
                self.buf += next(self.pieces)
            except StopIteration:
                break
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size in MiB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--part-mib", type=int, default=16)
    args = parser.parse_args()
    size = args.mib * MiB
    part = args.part_mib * MiB
    body = Body(size, piece=MiB)

    overrides = {
        "PICSTREAM_PART_SIZE": str(part),
        "PICSTREAM_MAX_UPLOAD_BYTES": str(size + MiB),
        "PICSTREAM_WEB_THREADS": "8",
        "PICSTREAM_MAX_UPLOADS": "4",
        "PICSTREAM_MAX_EVENT_STREAMS": "2",
        "PICSTREAM_READ_TIMEOUT": "60",
    }
    with running("bench", KEY, front=True, **overrides) as stack:
        pids = {
            "bench": [os.getpid()],
            "gunicorn": [stack.web_worker_pid, stack.front_worker_pid],
            "nginx": stack.nginx_pids,
            "weed": [stack.s3.proc.pid],
        }
        apis = {"b": stack.api, "c": stack.api, "e": stack.front_api}
        workers = {
            "b": stack.web_worker_pid,
            "c": stack.web_worker_pid,
            "e": stack.front_worker_pid,
        }
        run_rounds(args.rounds, size, part, body, stack.store, apis, workers, pids, stack.settings)
        print(readers_taken(stack.web.output()))


def readers_taken(log: str) -> str:
    """Which body readers the direct gunicorn used: api/gunicorn.py warns when it falls back
    to gunicorn's copying reader (the stack logs warnings only, not the fast path's info)."""
    missed = {"Content-Length": RECV_INTO_MISSED in log, "chunked": CHUNKED_MISSED in log}
    return "bodies read with recv_into: " + ", ".join(
        f"{kind} {'NO (copied by gunicorn)' if no else 'yes'}" for kind, no in missed.items()
    )


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def run_rounds(
    rounds: int,
    size: int,
    part: int,
    body: Body,
    store: Store,
    apis: dict[str, Api],
    workers: dict[str, int],
    pids: dict[str, list[int]],
    settings: Settings,
) -> None:
    labels = ("a", "b", "c", "d", "e")
    wall: dict[str, list[float]] = {k: [] for k in labels}
    cpu: dict[str, dict[str, float]] = {k: dict.fromkeys(pids, 0.0) for k in labels}
    peaks: dict[str, list[int]] = {k: [] for k in workers}
    baseline = {k: rss_kib(pid) for k, pid in workers.items()}
    limits = Limits(
        part, size + MiB, settings.max_pixels, settings.max_head_bytes, settings.allowed_formats
    )

    def sdk() -> None:
        store.client.put_object(
            store.bucket, "sdk/original", StreamReader(iter(body)), length=-1, part_size=part
        )

    def through(api: Api, chunked: bool) -> None:
        headers = {} if chunked else {"Content-Length": str(size)}
        resp = api.upload(iter(body), chunked=chunked, headers=headers)
        assert resp.status == 201, resp.body
        assert resp.json["blake3"] == body.blake3

    def ingest_only() -> None:
        Ingest(ReadSource(StreamReader(iter(body)).read), limits, NullSink()).run()

    steps: dict[str, Callable[[], None]] = {
        "a": sdk,
        "b": lambda: through(apis["b"], False),
        "c": lambda: through(apis["c"], True),
        "d": ingest_only,
        "e": lambda: through(apis["e"], False),
    }
    for n in range(rounds):
        for label, step in steps.items():
            before = {name: cpu_of(group) for name, group in pids.items()}
            with PeakRss(workers.get(label, workers["b"])) as peak:
                wall[label].append(timed(step))
            for name, group in pids.items():
                cpu[label][name] += (cpu_of(group) - before[name]) / rounds
            if label in workers:
                peaks[label].append(peak.peak)
                print(
                    f"  ({label}) gunicorn worker peak RSS {peak.peak / 1024:.0f} MiB", flush=True
                )
        print(
            f"round {n + 1}: "
            + "  ".join(f"({k}) {size / MiB / v[-1]:.0f} MiB/s" for k, v in wall.items()),
            flush=True,
        )
    report(size, part, rounds, wall, cpu, peaks, baseline)


def report(
    size: int,
    part: int,
    rounds: int,
    wall: dict[str, list[float]],
    cpu: dict[str, dict[str, float]],
    peaks: dict[str, list[int]],
    baseline: dict[str, int],
) -> None:
    mibs = {k: size / MiB / statistics.median(v) for k, v in wall.items()}
    names = {
        "a": "minio SDK put_object to the store",
        "b": "through the API, Content-Length",
        "c": "through the API, chunked",
        "d": "ingest alone (hash + sniff, null)",
        "e": "through nginx, Content-Length",
    }
    gib = size / 1024**3
    print(f"\n{size // MiB} MiB body, {part // MiB} MiB parts, {rounds} rounds (median)")
    print(
        "                                         MiB/s   CPU s/GiB: "
        + " ".join(f"{name:>9}" for name in next(iter(cpu.values())))
    )
    for k, name in names.items():
        cpus = " ".join(f"{v / gib:9.2f}" for v in cpu[k].values())
        print(f"({k}) {name:35} {mibs[k]:8.1f}              {cpus}")
    print(
        f"ratio (b)/(a) = {mibs['b'] / mibs['a']:.2f}   (c)/(a) = {mibs['c'] / mibs['a']:.2f}"
        f"   (e)/(a) = {mibs['e'] / mibs['a']:.2f}   target (b)/(a), (c)/(a) >= 1.0"
    )
    for label, where, rows in (("b", "direct", "bc"), ("e", "behind nginx", "e")):
        top = max(peak for row in rows for peak in peaks[row])
        growth = top - baseline[label]
        print(
            f"gunicorn worker RSS ({where}): {baseline[label] / 1024:.0f} MiB before,"
            f" peak {top / 1024:.0f} MiB -> growth {growth / 1024:.0f} MiB"
            f" = {growth * 1024 / part:.1f} x part size   target <= 3.0"
        )


if __name__ == "__main__":
    main()
