"""The `picstream` command-line client end to end: the installed console script run as a
process against a real gunicorn (and, for --wait, a real `python -m worker`), with its
config and state under the test's own HOME."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from blake3 import blake3

from tests import images, servers
from tests.faults import Forwarder, pump
from tests.http import Api
from tests.integration.conftest import ALICE_KEY, BOB_KEY, MiB

PICSTREAM = Path(sys.executable).parent / "picstream"
TUS = {"Tus-Resumable": "1.0.0"}


@dataclass
class Cli:
    """Runs `.venv/bin/picstream` with an environment of its own (HOME, XDG dirs, and by
    default PICSTREAM_URL/PICSTREAM_KEY for the session's gunicorn)."""

    env: dict[str, str]
    cwd: Path
    home: Path

    def __call__(
        self,
        *args: str,
        env: dict[str, str | None] | None = None,
        input: str | None = None,
        umask: int = -1,
        timeout: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PICSTREAM), *args],
            env=self.environ(env),
            cwd=self.cwd,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            umask=umask,
        )

    def environ(self, changes: dict[str, str | None] | None = None) -> dict[str, str]:
        merged: dict[str, str | None] = {**self.env, **(changes or {})}
        return {k: v for k, v in merged.items() if v is not None}

    def json(self, *args: str, env: dict[str, str | None] | None = None) -> Any:
        done = self(*args, "--json", env=env)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return json.loads(done.stdout)

    def popen(self, *args: str, env: dict[str, str | None] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(PICSTREAM), *args],
            env=self.environ(env),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @property
    def config_file(self) -> Path:
        return Path(self.env["XDG_CONFIG_HOME"]) / "picstream" / "config.toml"

    @property
    def state_file(self) -> Path:
        return Path(self.env["XDG_STATE_HOME"]) / "picstream" / "uploads.json"


def make_cli(tmp_path: Path, port: int) -> Cli:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "LANG": "C.UTF-8",
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "PICSTREAM_URL": f"http://127.0.0.1:{port}",
        "PICSTREAM_KEY": ALICE_KEY,
    }
    return Cli(env, work, home)


@pytest.fixture()
def cli(tmp_path: Path, gunicorn: servers.Server) -> Cli:
    return make_cli(tmp_path, gunicorn.port)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def dead_port() -> int:
    """A loopback port nothing listens on."""
    return servers.free_port()


def assert_no_key(done: subprocess.CompletedProcess[str], *keys: str) -> None:
    for key in keys or (ALICE_KEY,):
        assert key not in done.stdout and key not in done.stderr


# ------------------------------------------------------------------------------ login


def test_login_writes_a_private_config_file_that_the_environment_overrides(
    cli: Cli, api: Api, gunicorn: servers.Server
) -> None:
    url = f"http://127.0.0.1:{gunicorn.port}"
    no_env: dict[str, str | None] = {"PICSTREAM_URL": None, "PICSTREAM_KEY": None}
    assert api.upload(images.png(), query="?filename=alice.png").status == 201

    # Nothing configured: the client says how to get a key.
    done = cli("ls", env=no_env)
    assert done.returncode == 1
    assert "no API key for http://127.0.0.1:8000" in done.stderr
    assert "picstream login" in done.stderr

    # Even with umask 0 the file is created 0600 (never readable by others), its dir 0700.
    done = cli("login", "--url", url + "/", "--key", ALICE_KEY, env=no_env, umask=0)
    assert done.returncode == 0, done.stderr
    assert_no_key(done)
    mode = stat.S_IMODE(cli.config_file.stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert stat.S_IMODE(cli.config_file.parent.stat().st_mode) == 0o700
    text = cli.config_file.read_text()
    assert f'url = "{url}"' in text and f'key = "{ALICE_KEY}"' in text

    # The file alone is enough...
    listed = cli.json("ls", env=no_env)
    assert [i["filename"] for i in listed["images"]] == ["alice.png"]
    # ...PICSTREAM_KEY overrides its key (bob sees none of alice's images)...
    assert cli.json("ls", env={"PICSTREAM_URL": None, "PICSTREAM_KEY": BOB_KEY})["images"] == []
    # ...and PICSTREAM_URL its URL.
    port = dead_port()
    done = cli("ls", env={"PICSTREAM_URL": f"http://127.0.0.1:{port}"})
    assert done.returncode == 1
    assert f"could not reach http://127.0.0.1:{port}" in done.stderr
    # The saved key goes only to the server it was saved for.
    done = cli("--url", f"http://127.0.0.1:{port}", "ls", env=no_env)
    assert done.returncode == 1 and f"no API key for http://127.0.0.1:{port}" in done.stderr

    # A key the server refuses is not saved.
    done = cli("login", "--url", url, "--key", "not-the-key-0123456789", env=no_env)
    assert done.returncode == 1
    assert "did not accept the key" in done.stderr and "HTTP 401" in done.stderr
    assert_no_key(done, "not-the-key-0123456789")
    assert f'key = "{ALICE_KEY}"' in cli.config_file.read_text()

    # Without --key (and no terminal) the key is read from stdin: `login < var/dev-api-key`.
    cli.config_file.chmod(0o644)
    done = cli(
        "login",
        "--url",
        url,
        env={"PICSTREAM_URL": None, "PICSTREAM_KEY": None},
        input=BOB_KEY + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(cli.config_file.stat().st_mode) == 0o600  # replaced, not rewritten
    assert cli.json("ls", env=no_env)["images"] == []


# ----------------------------------------------------------------------------- upload


def write_batch(root: Path) -> tuple[list[Path], dict[str, bytes]]:
    """17 decodable PNGs (distinct sizes) in nested directories, and 3 files that are not
    images; a hidden file that a directory upload skips."""
    good = []
    for i in range(17):
        path = root / f"set{i % 3}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(images.png(3 + i, 2 + i))
        good.append(path)
    bad = {
        "notes.txt": b"shopping list: bread, milk\n",
        "fake.jpg": bytes(range(256)) * 40,
        "scan.pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 20,
    }
    for name, data in bad.items():
        (root / "set1" / name).write_bytes(data)
    (root / ".DS_Store").write_bytes(b"\0" * 100)
    return good, bad


def test_upload_a_directory_reports_every_file_and_fails_for_the_bad_ones(
    cli: Cli, api: Api
) -> None:
    good, bad = write_batch(cli.cwd / "photos")
    expected = {name: api.upload(data).json["detail"] for name, data in bad.items()}

    results = cli("upload", "photos", "--concurrency", "4", "--json")
    assert results.returncode == 1, results.stderr
    rows = json.loads(results.stdout)
    assert len(rows) == 20  # the hidden file is not among them
    by_name = {Path(r["file"]).name: r for r in rows}
    for path in good:
        row = by_name[path.name]
        assert row["id"] and row["status"] == "processing" and row["error"] is None, row
        assert row["size"] == path.stat().st_size
        assert row["record"]["blake3"] == blake3(path.read_bytes()).hexdigest()
        assert row["record"]["filename"] == path.name
    for name, detail in expected.items():
        row = by_name[name]
        assert row["id"] is None and row["status"] == "error"
        assert row["error"] == detail, row  # the server's 415 problem detail
    listed = cli.json("ls", "--all", "--limit", "5")
    assert sorted(i["filename"] for i in listed["images"]) == sorted(p.name for p in good)
    assert not cli.state_file.exists() or json.loads(cli.state_file.read_text())["uploads"] == {}

    # The same as a table for people: one row per file, then the count.
    done = cli("upload", "photos/set1", "photos/set2/img02.png")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["file", "id", "size", "status", "error"]
    ok_rows = [line for line in lines if " processing " in line]
    assert len(ok_rows) == 6 + 1  # set1 holds img01, img04, ... img16; plus img02
    for name, detail in expected.items():
        row = next(line for line in lines if name in line)
        assert " error " in row and detail in row
    assert "7 uploaded, 3 failed" in done.stderr


def test_upload_options_and_bad_arguments(cli: Cli, api: Api) -> None:
    (cli.cwd / "a.png").write_bytes(images.png(5, 4))
    (cli.cwd / "b.png").write_bytes(images.png(6, 4))
    [row] = cli.json(
        "upload", "a.png", "--id", "chosen-1", "--profile", "default", "--alt", "A red square"
    )
    assert row["id"] == "chosen-1" and row["record"]["profile"] == "default"
    assert row["record"]["alt"] == "A red square"
    assert api.request("GET", "/v1/images/chosen-1").status == 200

    # A glob the shell did not expand; each file once, however often it is named.
    rows = cli.json("upload", "*.png", "a.png")
    assert sorted(Path(r["file"]).name for r in rows) == ["a.png", "b.png"]

    done = cli("upload", "a.png", "b.png", "--id", "x")
    assert done.returncode == 2 and "--id names one image" in done.stderr
    done = cli("upload", "missing.png")
    assert done.returncode == 2 and "no such file or directory: missing.png" in done.stderr
    done = cli("upload", "a.png", "--profile", "no-such-profile", "--json")
    assert done.returncode == 1
    [row] = json.loads(done.stdout)
    assert row["status"] == "error" and "no-such-profile" in row["error"]


# --------------------------------------------------------------------- resume after kill


class Valve(Forwarder):
    """A TCP forwarder that lets `limit(n)` client bytes through and then stops reading
    from the client (a network that stalls mid-upload: the client's sends block) while the
    server's answers still flow back. `open()` cuts the held connections and lets
    everything through; `passed` counts the client bytes forwarded."""

    def __init__(self, target_port: int) -> None:
        self.budget: int | None = None
        self.passed = 0
        self.held: list[tuple[socket.socket, socket.socket]] = []
        self.holding = threading.Event()
        self._count = threading.Lock()
        super().__init__(target_port)

    def limit(self, budget: int) -> None:
        with self._count:
            self.budget, self.passed = budget, 0

    def open(self) -> None:
        with self._count:
            self.budget, self.passed = None, 0
            held, self.held = self.held, []
        for client, upstream in held:
            for sock in (upstream, client):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _serve(self, client: socket.socket) -> None:
        upstream = self._connect(client)
        if upstream is None:
            return
        down = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        down.start()
        threading.Thread(target=self._up, args=(client, upstream, down), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, down: threading.Thread) -> None:
        try:
            while True:
                with self._count:
                    allowed = 65536 if self.budget is None else self.budget - self.passed
                    if allowed <= 0:
                        self.held.append((client, upstream))
                        self.holding.set()
                        return
                chunk = client.recv(min(allowed, 65536))
                if not chunk:
                    break
                with self._count:
                    self.passed += len(chunk)
                upstream.sendall(chunk)
        except OSError:
            # The server closed with our bytes unread (an early answer): once that answer is
            # relayed, close the client's end too, as the server's own close would have.
            down.join(timeout=10)
            with contextlib.suppress(OSError):
                client.close()
            return
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_WR)


@pytest.fixture()
def own_api(
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]], env: dict[str, str]
) -> tuple[servers.Server, Api]:
    """A gunicorn of this test's own, so its access log shows only this test's requests."""
    return start_api(env)


def test_a_killed_upload_resumes_where_the_server_has_it(
    tmp_path: Path, own_api: tuple[servers.Server, Api]
) -> None:
    server, api = own_api
    valve = Valve(server.port)
    cli = make_cli(tmp_path, valve.port)
    big = cli.cwd / "big.jpg"
    big.write_bytes(images.jpeg(4000, 3000, scan=os.urandom(30 * MiB)))
    size = big.stat().st_size

    # First run: 12 MiB get through, then the network stalls; once the server has stored
    # a part (5 MiB in tests) the client is SIGKILLed.
    valve.limit(12 * MiB)
    first = cli.popen("upload", "big.jpg")
    try:
        wait_until(lambda: cli.state_file.exists(), 30, "the upload to be recorded")
        [entry] = json.loads(cli.state_file.read_text())["uploads"].values()
        assert entry["file"] == str(big) and entry["size"] == size
        upload_path = entry["url"].split(str(valve.port), 1)[1]

        def offset() -> int:
            resp = api.request("HEAD", upload_path, headers=TUS)
            return int(resp.header("upload-offset") or 0) if resp.status == 200 else 0

        wait_until(lambda: offset() >= 5 * MiB, 30, "the server to store a part")
        assert first.poll() is None, first.communicate()
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    valve.open()  # the server sees the cut and keeps what arrived

    # Second run, the same command: it continues the recorded upload from the server's
    # offset (with progress bars on a terminal).
    tty = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    try:
        done = cli("upload", "big.jpg", "--json", env=tty, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed upload did not finish; server log:\n{server.output()[-4000:]}")
    assert done.returncode == 0, (done.stdout, done.stderr)
    [row] = json.loads(done.stdout)
    resumed = row["resumed_from"]
    assert resumed >= 5 * MiB, row
    # Only the rest crossed the wire (plus the requests' heads), not the whole file again.
    assert valve.passed < size - resumed + 64 * 1024, (valve.passed, size, resumed)
    log = server.output()
    assert log.count('"POST /v1/tus HTTP/1.1" 201') == 1, log[-3000:]
    assert json.loads(cli.state_file.read_text())["uploads"] == {}
    # --json prints no progress bars; the record is right to the last byte.
    assert "total" not in done.stderr
    record = api.request("GET", f"/v1/images/{row['id']}").json
    assert record["size"] == size
    assert record["blake3"] == blake3(big.read_bytes()).hexdigest()
    valve.close()


def test_progress_bars_on_a_terminal(cli: Cli) -> None:
    (cli.cwd / "a.png").write_bytes(images.png(7, 7))
    done = cli("upload", "a.png", env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"})
    assert done.returncode == 0, done.stderr
    assert "total (1/1 files)" in done.stderr
    assert "1 uploaded, 0 failed" in done.stderr


# ------------------------------------------------------------------------------- reading


def test_get_resumes_a_partial_download_and_verifies_it(
    cli: Cli, api: Api, gunicorn: servers.Server
) -> None:
    data = images.jpeg(640, 480, scan=os.urandom(3 * MiB))
    image_id = api.upload(data).json["id"]
    out = cli.cwd / "photo.jpg"

    out.write_bytes(data[:MiB])  # what a killed download left
    got = cli.json("get", image_id, "-o", "photo.jpg")
    assert out.read_bytes() == data
    assert got == {
        "file": "photo.jpg",
        "size": len(data),
        "blake3": blake3(data).hexdigest(),
        "resumed_from": MiB,
    }
    assert f'"GET /v1/images/{image_id}/original HTTP/1.1" 206' in gunicorn.output()

    # A partial file of other bytes fails verification and is fetched again whole.
    out.write_bytes(b"\0" * MiB)
    got = cli.json("get", image_id, "-o", "photo.jpg")
    assert out.read_bytes() == data and got["resumed_from"] == 0

    # Complete already: nothing to do; the default name is ID.EXT; `-` is stdout.
    assert cli.json("get", image_id, "-o", "photo.jpg")["resumed_from"] == len(data)
    done = cli("get", image_id)
    assert done.returncode == 0 and "BLAKE3 verified" in done.stderr
    assert (cli.cwd / f"{image_id}.jpg").read_bytes() == data
    raw = subprocess.run(
        [str(PICSTREAM), "get", image_id, "-o", "-"],
        env=cli.environ(),
        cwd=cli.cwd,
        capture_output=True,
        timeout=60,
    )
    assert raw.returncode == 0 and raw.stdout == data

    done = cli("get", image_id, "w256.webp")
    assert done.returncode == 1 and "no ready variant 'w256.webp'" in done.stderr


def test_ls_show_reconvert_rm_and_tokens(cli: Cli, api: Api) -> None:
    ids = [
        api.upload(images.png(4 + i, 3), query=f"?filename=p{i}.png").json["id"] for i in range(3)
    ]
    newest_first = ids[::-1]

    page = cli.json("ls", "--limit", "2")
    assert [i["id"] for i in page["images"]] == newest_first[:2] and page["next_cursor"]
    rest = cli.json("ls", "--limit", "2", "--cursor", page["next_cursor"])
    assert [i["id"] for i in rest["images"]] == newest_first[2:]
    every = cli.json("ls", "--all", "--limit", "2")
    assert [i["id"] for i in every["images"]] == newest_first and every["next_cursor"] is None
    done = cli("ls", "--limit", "2")
    assert done.returncode == 0
    assert all(i in done.stdout for i in newest_first[:2]) and "--cursor" in done.stderr

    record = cli.json("show", ids[0])
    assert record["id"] == ids[0] and record["filename"] == "p0.png"
    done = cli("show", ids[0])
    assert done.returncode == 0
    assert "p0.png" in done.stdout and "variants" in done.stdout

    again = cli.json("reconvert", ids[0])
    assert again["status"] == "processing" and again["pending"]["profile"] == "default"
    done = cli("reconvert", ids[0], "--profile", "nope")
    assert done.returncode == 1 and "Bad request" in done.stderr

    done = cli("rm", ids[1])  # no terminal to confirm on: refused
    assert done.returncode == 2 and "--yes" in done.stderr
    assert api.request("GET", f"/v1/images/{ids[1]}").status == 200
    done = cli("rm", ids[1], "--yes")
    assert done.returncode == 0, done.stderr
    assert api.request("GET", f"/v1/images/{ids[1]}").status == 404
    done = cli("rm", ids[1], "--yes")
    assert done.returncode == 1 and "Not found" in done.stderr

    done = cli("token", "create", "--uploads", "2", "--format", "png", "--expires-in", "120")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith("pst_") and "\n" not in token
    assert api.upload(images.png(), key=token).status == 201
    assert api.upload(images.gif(), key=token).status == 415  # png only
    minted = cli.json("token", "create", "--max-bytes", "1000", "--profile", "default")
    assert minted["max_bytes"] == 1000 and minted["profile"] == "default" and minted["jti"]
    done = cli("token", "revoke", minted["jti"])
    assert done.returncode == 0
    assert api.upload(images.png(), key=minted["token"]).json["type"].endswith("token-revoked")


def test_errors_are_one_clear_line_and_never_show_the_key(cli: Cli) -> None:
    wrong = "wrong-key-0123456789abcdef"
    done = cli("ls", env={"PICSTREAM_KEY": wrong})
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "Missing or invalid API key" in line and "(HTTP 401)" in line
    assert "picstream login" in line
    assert_no_key(done, wrong)

    port = dead_port()
    done = cli("show", "x", env={"PICSTREAM_URL": f"http://127.0.0.1:{port}"})
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert f"could not reach http://127.0.0.1:{port}" in line
    assert_no_key(done)

    done = cli("show", "no-such-image")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("Error: Not found") and "(HTTP 404)" in line

    for command in ("upload", "ls", "show", "get", "watch", "rm", "reconvert", "login"):
        assert cli(command, "--help").returncode == 0
    assert cli("token", "create", "--help").returncode == 0


# ---------------------------------------------------------------------- conversion (--wait)


@pytest.fixture()
def worker(env: dict[str, str], workdir: Path) -> Iterator[servers.Server]:
    """A real `python -m worker` (stopped after the test)."""
    server = servers.start_worker(env, workdir / "workers", "cli-worker")
    yield server
    server.stop()


def undecodable_png() -> bytes:
    """A PNG whose header is valid (the upload accepts it) and whose pixels are not."""
    ihdr = images.chunk(b"IHDR", bytes.fromhex("0000000800000008 0802000000".replace(" ", "")))
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr
        + images.chunk(b"IDAT", b"not zlib")
        + images.chunk(b"IEND", b"")
    )


def test_upload_wait_follows_each_image_until_it_is_converted(
    cli: Cli, worker: servers.Server
) -> None:
    (cli.cwd / "one.png").write_bytes(images.png(30, 20))
    (cli.cwd / "two.png").write_bytes(images.png(40, 20))
    (cli.cwd / "broken.png").write_bytes(undecodable_png())

    done = cli("upload", "one.png", "two.png", "broken.png", "--wait", "--json")
    assert done.returncode == 1, (done.stdout, done.stderr, worker.output()[-2000:])
    rows = {Path(r["file"]).name: r for r in json.loads(done.stdout)}
    for name in ("one.png", "two.png"):
        assert rows[name]["status"] == "ready", rows[name]
        assert rows[name]["record"]["variants"]
    assert rows["broken.png"]["status"] == "failed" and rows["broken.png"]["error"]

    ready = rows["one.png"]["record"]
    assert cli("upload", "two.png", "--wait").returncode == 0

    # watch: a finished image's events at once, exit status by outcome.
    done = cli("watch", ready["id"])
    assert done.returncode == 0 and "status: ready" in done.stdout
    done = cli("watch", rows["broken.png"]["id"])
    assert done.returncode == 1 and "status: failed" in done.stdout
    events = [json.loads(line) for line in cli("watch", ready["id"], "--json").stdout.splitlines()]
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "ready"

    # A variant, verified against its BLAKE3.
    variant = next(v for v in ready["variants"] if v["name"].endswith(".webp"))
    got = cli.json("get", ready["id"], variant["name"], "-o", "v.webp")
    data = (cli.cwd / "v.webp").read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert got["blake3"] == variant["blake3"] == blake3(data).hexdigest()

    # reconvert --wait follows it to the end too.
    again = cli.json("reconvert", ready["id"], "--wait")
    assert again["status"] == "ready"
