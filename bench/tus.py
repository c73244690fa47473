"""Resumable (tus 1.0) uploads against a plain upload: throughput, memory, the cost of a resume.

    .venv/bin/python -m bench.tus [--mib 1024] [--rounds 2] [--part-mib 16]

Starts its own redis-server, SeaweedFS and gunicorn (1 worker process) on loopback
(bench/stack.py), then per round sends the same bytes (tests/images.py `Body`: a PNG header,
then deterministic filler; streamed as views of its filler block, never held whole) as:
(a) a plain upload through the API with Content-Length (the reference); (b) tus with 8 MiB
PATCHes; (c) tus with 64 MiB PATCHes (each PATCH streamed with Content-Length on one
persistent connection); (d) as (c), but the connection is cut once mid-way (closed after
half of the middle PATCH's declared bytes), then HEAD and PATCHes from the server's
Upload-Offset to the end, as a tus client resumes.

Each round runs the steps in order, the next one backwards (a trend in the machine's load then
favours no step). Prints MiB/s and the ratios to (a); the gunicorn worker's RSS before, at its
peak during and after each step; CPU seconds per GiB of the gunicorn worker, SeaweedFS, Redis
and this client, and their sum's ratio to (a)'s (the throughput ratio to expect when the cores
are the limit: steadier than wall clocks on a shared machine); Redis commands per part; and
for (d) the time beyond (c), what the first HEAD said, the bytes sent twice and the refused
resumes (a resume that meets the cut PATCH still saving gets 423: back off, HEAD, retry).

Checks after every upload: the BLAKE3 computed here while sending equals the Body's and the
image record's (API and record.json); the bucket holds only that image's original and
record.json (no tail object, no incomplete multipart upload); and whether the server hashed
the bytes as they passed or read the object back (core/tus.py logs "re-read" at info). The
objects are then deleted. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from blake3 import blake3

from bench.stack import Stack, running
from core.storage import Store
from tests.http import Api, Response
from tests.images import Body
from tests.servers import PeakRss, cpu_seconds, rss_kib

MiB = 1024 * 1024
GiB = 1024 * MiB
OWNER = "bench"
KEY = "bench-key-0123456789abcdef"
TUS = "1.0.0"
OFFSET_STREAM = "application/offset+octet-stream"
SEND_PIECE = MiB
# A refused or cut PATCH is retried this long (HEAD, then PATCH from the server's offset).
RESUME_DEADLINE = 120.0


class Stream:
    """The Body's bytes from any offset, as views of its filler block (no copies): its own
    iteration starts at 0 only, and a resume starts where the server says. That these are the
    Body's bytes is checked by every upload: the digest of what was sent must equal
    `Body.blake3`, which the Body computed over its own iteration."""

    def __init__(self, body: Body) -> None:
        self.size = body.size
        self.head = body.head
        self.block = memoryview(body.block)

    def pieces(self, start: int, end: int) -> Iterator[memoryview]:
        head, block = len(self.head), len(self.block)
        if start < head:
            yield memoryview(self.head)[start : min(end, head)]
            start = head
        while start < end:
            at = (start - head) % block
            n = min(SEND_PIECE, end - start, block - at)
            yield self.block[at : at + n]
            start += n


class Digest:
    """The BLAKE3 of the bytes as they are sent, each byte once however often it is sent
    (a resume sends from the server's offset, which is never past what was hashed)."""

    def __init__(self) -> None:
        self.hasher = blake3()
        self.covered = 0
        self.sent = 0

    def feed(self, offset: int, piece: memoryview) -> None:
        assert offset <= self.covered, "bytes must be sent in order"
        self.sent += len(piece)
        skip = self.covered - offset
        if skip < len(piece):
            self.hasher.update(piece[skip:])
            self.covered = offset + len(piece)

    def hexdigest(self) -> str:
        return str(self.hasher.hexdigest())


class Client:
    """HTTP/1.1 over one persistent connection (reopened when the server or we close it);
    bodies are sent piece by piece from a Stream, each piece fed to `digest` once sent."""

    def __init__(self, api: Api, digest: Digest, timeout: float = 300) -> None:
        self.api = api
        self.digest = digest
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            conn = http.client.HTTPConnection(self.api.host, self.api.port, timeout=self.timeout)
            conn.connect()
            assert conn.sock is not None
            # The last small piece of a body must not wait for an ACK (Nagle).
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn = conn
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, method: str, path: str, headers: dict[str, str]) -> Response:
        conn = self._connection()
        conn.request(method, path, headers=headers)
        return self._answer(conn)

    def _answer(self, conn: http.client.HTTPConnection) -> Response:
        resp = conn.getresponse()
        body = resp.read()
        if resp.will_close:
            self.close()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)

    def send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: tuple[Stream, int, int],
        cut_after: int | None = None,
    ) -> Response | None:
        """Send the stream's bytes [start, end) with Content-Length; with `cut_after`, close
        the socket once that many are sent. None when there is no answer (cut, or the
        connection failed)."""
        stream, start, end = body
        conn = self._connection()
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**headers, "Content-Length": str(end - start)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        stop = end if cut_after is None else start + cut_after
        try:
            for piece in stream.pieces(start, stop):
                conn.send(piece)
                self.digest.feed(start, piece)
                start += len(piece)
        except OSError:  # answered early (e.g. 423) and closed: read what it said, if anything
            pass
        if cut_after is not None:
            self.close()
            return None
        try:
            return self._answer(conn)
        except (OSError, http.client.HTTPException):
            self.close()
            return None


class TusClient(Client):
    """The tus 1.0 calls of a client that knows the upload's length."""

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api.key}", "Tus-Resumable": TUS, **extra}

    def create(self, length: int) -> str:
        resp = self.call("POST", "/v1/tus", self.headers(**{"Upload-Length": str(length)}))
        location = resp.header("location")
        assert resp.status == 201 and location, (resp.status, resp.body)
        return location

    def offset(self, path: str) -> int:
        resp = self.call("HEAD", path, self.headers())
        offset = resp.header("upload-offset")
        assert resp.status == 200 and offset is not None, (resp.status, resp.body)
        return int(offset)

    def patch(
        self, path: str, stream: Stream, start: int, end: int, cut_after: int | None = None
    ) -> Response | None:
        headers = self.headers(**{"Upload-Offset": str(start), "Content-Type": OFFSET_STREAM})
        return self.send("PATCH", path, headers, (stream, start, end), cut_after)


@dataclass
class Outcome:
    """What one upload did, seen from the client."""

    image_id: str
    digest: Digest
    notes: dict[str, float] = field(default_factory=dict)


def plain(api: Api, stream: Stream) -> Outcome:
    """(a) One POST with Content-Length, sent the way the PATCHes are."""
    client = Client(api, Digest())
    try:
        headers = {"Authorization": f"Bearer {api.key}", "Content-Type": "application/octet-stream"}
        resp = client.send("POST", "/v1/images", headers, (stream, 0, stream.size))
        assert resp is not None and resp.status == 201, resp and (resp.status, resp.body)
        return Outcome(str(resp.json["id"]), client.digest)
    finally:
        client.close()


def tus(api: Api, stream: Stream, patch: int) -> Outcome:
    """(b)/(c) Create, then PATCHes of `patch` bytes on one connection."""
    client = TusClient(api, Digest())
    try:
        path = client.create(stream.size)
        resp = _patch_to_end(client, path, stream, 0, patch)
        assert resp is not None and resp.status == 204, resp and (resp.status, resp.body)
        return Outcome(_image_id(resp), client.digest)
    finally:
        client.close()


def resumed(api: Api, stream: Stream, patch: int) -> Outcome:
    """(d) As tus(), but the middle PATCH is cut after half its bytes; then HEAD and PATCH
    from the server's offset, retrying on 423 (the cut PATCH still holds the upload while it
    saves what it got) and 409 (the offset moved since the HEAD)."""
    client = TusClient(api, Digest())
    notes: dict[str, float] = {"heads": 0, "423": 0, "409": 0, "other": 0}
    try:
        path = client.create(stream.size)
        cut_at = (stream.size // patch // 2) * patch  # the PATCH holding the middle
        resp = _patch_to_end(client, path, stream, 0, patch, stop=cut_at)
        if cut_at:
            assert resp is not None and resp.status == 204, resp and (resp.status, resp.body)
        end = min(cut_at + patch, stream.size)
        half = (end - cut_at) // 2
        client.patch(path, stream, cut_at, end, cut_after=half)
        notes["sent_before_cut"] = cut_at + half
        cut = time.perf_counter()
        deadline = time.monotonic() + RESUME_DEADLINE
        refused = 0
        while True:
            assert time.monotonic() < deadline, "the upload could not be resumed"
            offset = client.offset(path)
            notes["heads"] += 1
            notes.setdefault("offset_after_cut", offset)
            notes.setdefault("first_head_s", time.perf_counter() - cut)
            notes["resumed_from"] = offset
            notes["stalled_s"] = time.perf_counter() - cut  # till the HEAD of the accepted resume
            resp = _patch_to_end(client, path, stream, offset, patch)
            if resp is not None and resp.header("picstream-image") is not None:
                break
            status = str(resp.status) if resp is not None else "other"
            notes[status if status in notes else "other"] += 1
            refused += 1
            time.sleep(0.05 * refused)  # as tus clients do: back off, HEAD, try again
        notes["sent_again"] = client.digest.sent - stream.size
        return Outcome(_image_id(resp), client.digest, notes)
    finally:
        client.close()


def _patch_to_end(
    client: TusClient, path: str, stream: Stream, offset: int, patch: int, stop: int | None = None
) -> Response | None:
    """PATCHes from `offset` to `stop` (default: the end); the last answer, or the first that
    is not a 204 (None: no answer)."""
    stop = stream.size if stop is None else stop
    resp = None
    while offset < stop:
        end = min(offset + patch, stream.size)
        resp = client.patch(path, stream, offset, end)
        if resp is None or resp.status != 204:
            return resp
        offset = int(resp.header("upload-offset") or -1)
        assert offset == end, (offset, end)
    return resp


def _image_id(resp: Response) -> str:
    location = resp.header("picstream-image")
    assert location and location.startswith("/v1/images/"), (resp.status, resp.headers)
    return location.removeprefix("/v1/images/")


@dataclass
class Step:
    label: str
    name: str
    run: Callable[[], Outcome]
    wall: list[float] = field(default_factory=list)
    rss_before: list[int] = field(default_factory=list)
    rss_peak: list[int] = field(default_factory=list)
    rss_after: list[int] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    redis_calls: dict[str, float] = field(default_factory=dict)
    rehashed: int = 0
    notes: list[dict[str, float]] = field(default_factory=list)


class Probe:
    """The processes' CPU, Redis's command counters and the gunicorn log, before and after."""

    def __init__(self, stack: Stack) -> None:
        self.pids = {
            "gunicorn": stack.web_worker_pid,
            "weed": stack.s3.proc.pid,
            "redis": stack.redis.proc.pid,
            "client": os.getpid(),
        }
        self.redis = redis.Redis.from_url(stack.env["REDIS_URL"])
        self.log = stack.web.log

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def commands(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name not in ("cmdstat_info",)
        }

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, size: int) -> str:
        with open(self.log, "rb") as f:
            f.seek(size)
            return f.read().decode(errors="replace")


def check(store: Store, api: Api, outcome: Outcome, expected: str) -> list[str]:
    """What is wrong with a finished upload (nothing: []); then delete its objects."""
    problems = []
    digest = outcome.digest.hexdigest()
    if digest != expected:
        problems.append(f"sent bytes hash {digest}, the Body's is {expected}")
    record = api.request("GET", f"/v1/images/{outcome.image_id}")
    if record.status != 200 or record.json.get("blake3") != digest:
        problems.append(f"record {record.status}: blake3 {record.json.get('blake3')} != {digest}")
    prefix = f"{OWNER}/{outcome.image_id}/"
    keys = sorted(store.keys(""))
    names = sorted(k.rsplit("/", 1)[-1] for k in keys)
    parents = {k.rsplit("/", 1)[0] for k in keys}
    if names != ["original", "record.json"] or len(parents) != 1 or not keys[0].startswith(prefix):
        problems.append(f"bucket holds {keys}, not just the original and record.json")
    else:
        stored = json.loads(store.read_bytes(f"{parents.pop()}/record.json"))
        if stored.get("blake3") != digest:
            problems.append(f"record.json blake3 {stored.get('blake3')} != {digest}")
    incomplete = store.incomplete_uploads()
    if incomplete:
        problems.append(f"incomplete multipart uploads left: {incomplete}")
    store.delete_prefix("")
    return problems


def measure(step: Step, probe: Probe, pid: int, rounds: int, size: int) -> Outcome:
    cpu, calls, log_at = probe.cpu(), probe.commands(), probe.log_size()
    step.rss_before.append(rss_kib(pid))
    with PeakRss(pid) as peak:
        started = time.perf_counter()
        outcome = step.run()
        step.wall.append(time.perf_counter() - started)
    step.rss_peak.append(peak.peak)
    step.rss_after.append(rss_kib(pid))
    for name, seconds in probe.cpu().items():
        step.cpu[name] = step.cpu.get(name, 0.0) + (seconds - cpu[name]) / rounds
    for name, count in probe.commands().items():
        step.redis_calls[name] = step.redis_calls.get(name, 0) + (count - calls.get(name, 0))
    step.rehashed += probe.log_since(log_at).count("re-read")
    step.notes.append(outcome.notes)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="body size in MiB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--part-mib", type=int, default=16, help="PICSTREAM_PART_SIZE in MiB")
    args = parser.parse_args()
    size, part = args.mib * MiB, args.part_mib * MiB
    body = Body(size, piece=MiB)
    stream = Stream(body)
    with running(
        OWNER,
        KEY,
        PICSTREAM_PART_SIZE=str(part),
        PICSTREAM_MAX_UPLOAD_BYTES=str(size + MiB),
        PICSTREAM_WEB_THREADS="8",
        PICSTREAM_MAX_UPLOADS="4",
        PICSTREAM_MAX_EVENT_STREAMS="2",
        PICSTREAM_READ_TIMEOUT="60",
        PICSTREAM_LOG_LEVEL="info",  # core/tus.py says so at info when it re-reads to hash
    ) as stack:
        api = stack.api
        steps = [
            Step("a", "plain upload, Content-Length", lambda: plain(api, stream)),
            Step("b", "tus, 8 MiB PATCHes", lambda: tus(api, stream, 8 * MiB)),
            Step("c", "tus, 64 MiB PATCHes", lambda: tus(api, stream, 64 * MiB)),
            Step("d", "tus 64 MiB, cut once + resumed", lambda: resumed(api, stream, 64 * MiB)),
        ]
        probe = Probe(stack)
        pid = stack.web_worker_pid
        problems: list[str] = []
        load = os.getloadavg()[0]
        for n in range(args.rounds):
            # Every other round backwards, so a trend in the machine's load favours no step.
            for step in steps if n % 2 == 0 else steps[::-1]:
                outcome = measure(step, probe, pid, args.rounds, size)
                problems += [
                    f"({step.label}) {p}" for p in check(stack.store, api, outcome, body.blake3)
                ]
            print(f"round {n + 1}:", flush=True)
            for s in steps:
                print(
                    f"  ({s.label}) {size / MiB / s.wall[-1]:5.0f} MiB/s  worker RSS MiB"
                    f" {s.rss_before[-1] // 1024} -> peak {s.rss_peak[-1] // 1024}"
                    f" -> {s.rss_after[-1] // 1024} after",
                    flush=True,
                )
        print(f"load average (1 min): {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        report(size, part, args.rounds, steps, problems)
    if problems:
        raise SystemExit(1)


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


def code_version() -> str:
    """The commit and the digests of the tus modules (they may carry uncommitted changes)."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    files = ("core/tus.py", "api/tus.py")
    digests = [f"{name} {blake3((root / name).read_bytes()).hexdigest()[:12]}" for name in files]
    return f"HEAD {head or '?'}; " + ", ".join(digests)


def report(size: int, part: int, rounds: int, steps: list[Step], problems: list[str]) -> None:
    gib, parts = size / GiB, size / part
    mibs = {s.label: size / MiB / statistics.median(s.wall) for s in steps}
    total = {s.label: sum(s.cpu.values()) / gib for s in steps}
    print(f"\n{size // MiB} MiB body, PICSTREAM_PART_SIZE {part // MiB} MiB, {rounds} round(s)")
    print(f"machine: {machine()}\ncode: {code_version()}")
    print(
        f"{'':36} {'MiB/s':>6} {'/(a)':>5} | gunicorn worker RSS MiB:"
        f" {'before':>6} {'peak':>5} {'after':>5} {'growth':>6} {'=parts':>6}"
    )
    for s in steps:
        growth = max(p - b for p, b in zip(s.rss_peak, s.rss_before, strict=True)) / 1024
        print(
            f"({s.label}) {s.name:32} {mibs[s.label]:6.1f} {mibs[s.label] / mibs['a']:5.2f}"
            f" |                         "
            f"{statistics.median(s.rss_before) / 1024:6.0f} {max(s.rss_peak) / 1024:5.0f}"
            f" {statistics.median(s.rss_after) / 1024:5.0f} {growth:6.0f}"
            f" {growth * MiB / part:6.1f}"
        )
    print(
        f"\n{'CPU s/GiB':36} {'gunicorn':>8} {'weed':>6} {'redis':>6} {'client':>6}"
        f" {'all':>6} {'(a)/all':>7} | Redis cmds/part"
    )
    for s in steps:
        cpus = " ".join(f"{s.cpu[k] / gib:6.2f}" for k in ("gunicorn", "weed", "redis", "client"))
        per_part = sum(s.redis_calls.values()) / rounds / parts
        print(
            f"({s.label}) {s.name:32}   {cpus} {total[s.label]:6.2f}"
            f" {total['a'] / total[s.label]:7.2f} | {per_part:6.1f}"
        )
    walls = [s.wall for s in steps[:3]]
    per_round = ", ".join(f"{a / b:.2f}/{a / c:.2f}" for a, b, c in zip(*walls, strict=True))
    print(
        f"ratio (b)/(a) = {mibs['b'] / mibs['a']:.2f}   (c)/(a) = {mibs['c'] / mibs['a']:.2f}"
        f"   target >= 0.9 (medians; per round (b)/(c): {per_round})"
    )
    print(
        "(a)/all: (a)'s CPU s/GiB over the step's, the ratio to expect when the"
        " 2 cores are the limit (steadier than wall clocks on a shared machine)"
    )
    d, c = steps[3], steps[2]
    for n, (notes, dw, cw) in enumerate(zip(d.notes, d.wall, c.wall, strict=True)):
        print(
            f"(d) round {n + 1}: {dw - cw:+.2f} s vs (c); resumed {notes['stalled_s']:.2f} s"
            f" after the cut; cut after byte"
            f" {notes['sent_before_cut'] / MiB:.0f} MiB; first HEAD"
            f" {notes['first_head_s'] * 1000:.0f} ms later said"
            f" {notes['offset_after_cut'] / MiB:.1f} MiB, the last"
            f" {notes['resumed_from'] / MiB:.1f} MiB; {notes['sent_again'] / MiB:.1f} MiB"
            f" sent twice; {notes['heads']:.0f} HEAD(s); resumes refused: {notes['423']:.0f}"
            f" x 423, {notes['409']:.0f} x 409, {notes['other']:.0f} other/no answer"
        )
    for s in steps:
        top = sorted(s.redis_calls.items(), key=lambda kv: -kv[1])[:7]
        print(
            f"({s.label}) Redis commands per part: "
            + ", ".join(f"{name} {count / rounds / parts:.1f}" for name, count in top)
        )
    for s in steps:
        how = f"re-read from the store ({s.rehashed}x)" if s.rehashed else "inline, as bytes passed"
        print(f"({s.label}) server BLAKE3: {how}")
    if problems:
        print("CHECKS FAILED:\n  " + "\n  ".join(problems))
    else:
        print(
            "checks: every upload's BLAKE3 (hashed here while sending) = the Body's = the"
            " record's (API and record.json); the bucket held only original + record.json,"
            " no incomplete multipart upload"
        )


if __name__ == "__main__":
    main()
