"""End-to-end latency of a conversion: from the first byte of an upload to its `ready` event,
through the real stack with one worker, and where the worker spends that time.

    .venv/bin/python -m bench.e2e [--uploads N] [--inputs jpeg,heic,png]

bench/stack.py starts redis-server, SeaweedFS, gunicorn and one `python -m worker` on
loopback. Inputs are made here, by bench/convert.py's generators (nothing is downloaded): a
12 MP camera-like JPEG, a 12 MP HEIC (pillow-heif) and a 4 MP PNG with alpha. For each
input, one upload warms the worker up (not counted), then N uploads run one after the other,
each as a client would: `PUT /v1/images/{id}` with the whole body, then, once the `201` is
in, `GET /v1/images/{id}/events` (from the start of the stream, so nothing is missed) until
the final event. Reported per input, p50 and p95 over the N uploads:

- first byte -> `201` (the upload itself: the original and record.json to S3, the Redis
  commit that queues the job);
- `201` -> the first variant event, and -> the thumbnail (the first event of a variant of
  the smallest size), as the client received them;
- first byte -> the `ready` event, as the client received it.

The breakdown comes from the worker's own log (INFO): the work-horse's `pickup=`/`fork=`
(worker/__main__.py: queued -> taken by the rq worker -> running in the forked horse), the
job's timeline (worker/jobs.py `Timeline`: building its clients, reading the record,
download, decode, placeholder, the start update, then for each variant how long the job
waited for the encoder, its S3 PUT and its Redis update, `@name` = when it was announced
since the job began, the final update and the bucket copy of the record) and each
encode (worker/convert.py `render_all`, with `render=` the encoders' wall time; two run at
once, so they overlap). Medians over the N uploads. The encoders' wall time is set beside the
longest single encode (a 2048 px AVIF), which bounds it from below when it dominates. Event
delivery is the time from the Redis stream entry (its id is the ms it was written) to the
client having read the event.

The machine's load average is printed with every block of numbers: other work on a shared
2-core machine moves them. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import stack
from tests.http import Api, EventReader

ROOT = Path(__file__).resolve().parent.parent
OWNER, KEY = "bench", "bench-e2e-key-0123456789"
INPUTS = {"jpeg": "12 MP JPEG", "heic": "12 MP HEIC", "png": "4 MP PNG+alpha"}
# `2025-01-31 12:00:00,123 4242 INFO worker.jobs: message` (worker/__main__.py's format)
LOG_LINE = re.compile(r"^\S+ \S+ (\d+) INFO (\S+): (.*)$")
PAIR = re.compile(r"(\S+)=(-?\d+)")
# logger -> what marks its timing line (the horse's other lines hold no timings)
TIMING_LINES = {"worker.jobs": ": converted; ", "worker.convert": "encoded "}


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- one upload


@dataclass
class Sample:
    image_id: str
    upload: float  # first byte -> 201, seconds
    first_variant: float  # 201 -> first variant event received
    first_name: str
    thumbnail: float  # 201 -> first event of a smallest-size variant received
    thumbnail_name: str
    ready: float  # first byte -> ready event received
    delivery: list[float] = field(default_factory=list)  # stream entry -> received
    order: list[str] = field(default_factory=list)  # variant events, as received


def upload_and_follow(api: Api, body: bytes, image_id: str) -> Sample:
    started = time.time()
    conn = http.client.HTTPConnection(api.host, api.port, timeout=120)
    try:
        conn.putrequest("PUT", f"/v1/images/{image_id}")
        conn.putheader("Authorization", f"Bearer {api.key}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body)
        resp = conn.getresponse()
        answer = resp.read()
        created = time.time()
    finally:
        conn.close()
    if resp.status != 201:
        raise SystemExit(f"upload of {image_id}: {resp.status} {answer[:300]!r}")
    # From the start of the stream ("0-0"): events written before we connect are replayed.
    reader = EventReader(api, f"/v1/images/{image_id}/events", last_event_id="0-0")
    variants: list[tuple[float, str]] = []
    delivery: list[float] = []
    try:
        while (event := reader.next()) is not None:
            now = time.time()
            if event.id:
                delivery.append(now - int(event.id.split("-")[0]) / 1000)
            if event.event == "variant":
                variants.append((now, event.data["name"]))
            elif event.event == "status" and event.data["status"] in ("ready", "failed"):
                if event.data["status"] != "ready":
                    raise SystemExit(f"{image_id} failed: {event.data['record']['error']}")
                record = event.data["record"]
                break
        else:
            raise SystemExit(f"{image_id}: the event stream ended before the final event")
    finally:
        reader.close()
    smallest = min(v["width"] for v in record["variants"])
    small = {v["name"] for v in record["variants"] if v["width"] == smallest}
    thumb_at, thumb = next((t, n) for t, n in variants if n in small)
    return Sample(
        image_id,
        upload=created - started,
        first_variant=variants[0][0] - created,
        first_name=variants[0][1],
        thumbnail=thumb_at - created,
        thumbnail_name=thumb,
        ready=now - started,
        delivery=delivery,
        order=[n for _, n in variants],
    )


# ---------------------------------------------------------------- the worker's log


def worker_timings(log_text: str) -> dict[str, dict[str, list[float]]]:
    """image id -> step -> [ms, ...] from the work-horses' INFO lines (see the docstring).
    A horse's lines share its pid; its `pickup=` line comes first and names the image."""
    by_pid: dict[str, str] = {}
    found: dict[str, dict[str, list[float]]] = {}
    for line in log_text.splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        pid, logger, message = match.groups()
        if logger == "worker" and "pickup=" in message:
            image_id = message.split("(", 1)[1].split(")", 1)[0]
            by_pid[pid] = image_id
            found[image_id] = {}
        elif pid not in by_pid or TIMING_LINES.get(logger, "\0") not in message:
            continue
        steps = found[by_pid[pid]]
        for name, ms in PAIR.findall(message):
            if name != "request_id":  # core/logs.py's suffix on every line, not a timing
                steps.setdefault(name, []).append(float(ms))
    return found


def worker_log(running: stack.Stack) -> Path:
    # bench/stack.py starts the workers with their logs in `workers/` beside `web/`.
    path = running.web.log.parent.parent / "workers" / "worker-1.log"
    if not path.exists():
        raise SystemExit(f"the worker's log is not at {path}: has bench/stack.py changed?")
    return path


def wait_for_worker(running: stack.Stack, deadline: float = 60) -> None:
    """Until the rq worker has registered with Redis (it then waits for jobs)."""
    from redis import Redis

    client = Redis.from_url(running.env["REDIS_URL"])
    end = time.monotonic() + deadline
    while not client.smembers("rq:workers"):
        if time.monotonic() > end:
            raise SystemExit("the worker did not register within 60 s")
        time.sleep(0.1)
    client.close()


# ---------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.0f} ms"


def report(
    label: str, size: int, samples: list[Sample], timings: dict[str, dict[str, list[float]]]
) -> None:
    print(f"\n{label} ({size / 1e6:.1f} MB), {len(samples)} uploads, {load()}")
    rows = [
        ("first byte -> 201 (upload)", [s.upload for s in samples]),
        ("201 -> first variant event", [s.first_variant for s in samples]),
        ("201 -> thumbnail event", [s.thumbnail for s in samples]),
        ("first byte -> ready event", [s.ready for s in samples]),
    ]
    print(f"  {'':34} {'p50':>9} {'p95':>9}")
    for name, values in rows:
        print(f"  {name:34} {ms(pct(values, 0.5))} {ms(pct(values, 0.95))}")
    firsts = sorted({s.first_name for s in samples})
    thumbs = sorted({s.thumbnail_name for s in samples})
    print(f"  first variant announced: {', '.join(firsts)}; thumbnail: {', '.join(thumbs)}")
    print(f"  variant events (first upload): {' '.join(samples[0].order)}")
    delivery = [d for s in samples for d in s.delivery]
    print(f"  event delivery (stream entry -> client): p50 {ms(pct(delivery, 0.5))}")
    jobs = [timings.get(s.image_id, {}) for s in samples]
    schedule(jobs)
    breakdown(jobs)


def schedule(jobs: list[dict[str, list[float]]]) -> None:
    """How the encoders' wall time compares with the longest single encode (its lower
    bound when that one dominates), and what follows the last encode before `ready`."""
    rows = []
    for job in jobs:
        encodes = [v[0] for name, v in job.items() if name.startswith("encode:")]
        if "render" not in job or not encodes or "total" not in job:
            continue
        done = max(v[0] for name, v in job.items() if name.startswith("@"))
        rows.append((job["render"][0], max(encodes), done, job["total"][0]))
    if not rows:
        return
    render, longest, done, total = (statistics.median(col) for col in zip(*rows, strict=True))
    print(
        f"  encoders: {render:.0f} ms wall, longest single encode {longest:.0f} ms"
        f" (median of {len(rows)} jobs); last variant announced at {done:.0f} ms of {total:.0f}"
    )


def breakdown(jobs: list[dict[str, list[float]]]) -> None:
    """Medians over the jobs; steps that ran several times in a job (waits) are summed."""
    jobs = [j for j in jobs if j]
    if not jobs:
        print("  (no timings in the worker's log)")
        return
    names: list[str] = []
    for job in jobs:
        names += [n for n in job if n not in names]
    print(f"  worker, median of {len(jobs)} jobs (ms; encodes overlap, 2 at once):")
    cells = []
    for name in names:
        values = [sum(job[name]) for job in jobs if name in job]
        cells.append(f"{name}={statistics.median(values):.0f}")
    line = "   "
    for cell in cells:
        if len(line) + len(cell) > 96:
            print(line)
            line = "   "
        line += " " + cell
    print(line)


# ---------------------------------------------------------------- main


def make_inputs(folder: Path, labels: list[str]) -> None:
    from bench import convert

    convert.make_inputs(folder, with_50mp=False, classes=labels)


def input_paths(folder: Path, labels: list[str]) -> dict[str, Path]:
    from bench import convert

    return convert.input_paths(folder, with_50mp=False, classes=labels)


def run(keys: str, uploads: int) -> None:
    labels = [INPUTS[name.strip()] for name in keys.split(",")]
    print(f"machine: {os.cpu_count()} cores; {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        folder = Path(tmp)
        # In a child: this process is a client and should stay small and cool.
        argv = [sys.executable, "-m", "bench.e2e", "--make-inputs", tmp, "--inputs", keys]
        subprocess.run(argv, cwd=ROOT, check=True)
        paths = input_paths(folder, labels)
        with stack.running(OWNER, KEY, workers=1, PICSTREAM_LOG_LEVEL="info") as running:
            wait_for_worker(running)
            log_path = worker_log(running)
            results: list[tuple[str, int, list[Sample]]] = []
            for label, path in paths.items():
                body = path.read_bytes()
                slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
                upload_and_follow(running.api, body, f"warm-{slug}")  # not counted
                samples = [
                    upload_and_follow(running.api, body, f"{slug}-{n}") for n in range(uploads)
                ]
                results.append((label, len(body), samples))
                print(f"{label}: done, {load()}", flush=True)
            timings = worker_timings(log_path.read_text(errors="replace"))
    for label, size, samples in results:
        report(label, size, samples, timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=20, help="uploads per input")
    parser.add_argument(
        "--inputs", default="jpeg,heic,png", help="comma-separated: " + ", ".join(INPUTS)
    )
    parser.add_argument("--make-inputs", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_inputs:
        labels = [INPUTS[name.strip()] for name in args.inputs.split(",")]
        make_inputs(Path(args.make_inputs), labels)
        return
    run(args.inputs, args.uploads)


if __name__ == "__main__":
    main()
