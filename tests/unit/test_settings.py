from __future__ import annotations

from pathlib import Path

import pytest

from admin.cli import CONCERNS as ADMIN_CONCERNS
from core.errors import InvalidWebhookUrl, WebhookHostNotAllowed
from core.settings import (
    WEB_PROCESS,
    WORKER_PROCESS,
    Concern,
    ConcernNotRead,
    ConfigError,
    Settings,
)
from core.webhooks import check_url, host_allowed

BASE = {"S3_ENDPOINT": "http://127.0.0.1:8333", "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}


def test_defaults() -> None:
    s = Settings.from_env(BASE)
    assert (s.port, s.part_size, s.max_pixels, s.s3_bucket) == (
        8000,
        16 * 2**20,
        10**8,
        "picstream",
    )
    assert (s.s3_host, s.s3_secure) == ("127.0.0.1:8333", False)
    assert s.api_keys == ()


def test_sizes_and_keys() -> None:
    s = Settings.from_env(
        {
            **BASE,
            "PICSTREAM_PART_SIZE": "8MiB",
            "PICSTREAM_MAX_UPLOAD_BYTES": "2GiB",
            "PICSTREAM_API_KEYS": f"alice:{'a' * 20}, alice:{'b' * 20},bob:{'c' * 20}",
        }
    )
    assert s.part_size == 8 * 2**20 and s.max_upload_bytes == 2 * 2**30
    assert s.api_keys == (("alice", "a" * 20), ("alice", "b" * 20), ("bob", "c" * 20))
    assert "aaaa" not in repr(s)  # a logged Settings shows no secret


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"S3_ENDPOINT": ""}, "S3_ENDPOINT"),
        ({"S3_ENDPOINT": "ftp://x"}, "S3_ENDPOINT"),
        ({"PORT": "eighty"}, "PORT"),
        ({"PICSTREAM_PART_SIZE": "1MiB"}, "PICSTREAM_PART_SIZE"),  # below S3's 5 MiB minimum
        ({"PICSTREAM_PART_SIZE": "16 furlongs"}, "PICSTREAM_PART_SIZE"),
        ({"PICSTREAM_API_KEYS": "alice:short"}, "PICSTREAM_API_KEYS"),
        ({"PICSTREAM_API_KEYS": "al/ice:aaaaaaaaaaaaaaaaaaaa"}, "PICSTREAM_API_KEYS"),
        ({"PICSTREAM_API_KEYS": "nocolon"}, "PICSTREAM_API_KEYS"),
        ({"PICSTREAM_ALLOWED_FORMATS": "jpeg,svg"}, "PICSTREAM_ALLOWED_FORMATS"),
        ({"S3_BUCKET": "Bad_Bucket"}, "S3_BUCKET"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"PICSTREAM_READ_TIMEOUT": "-1"}, "PICSTREAM_READ_TIMEOUT"),
        ({"PICSTREAM_WEBHOOK_QUEUE": "no spaces"}, "PICSTREAM_WEBHOOK_QUEUE"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({**BASE, **env})


def test_key_errors_never_echo_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "PICSTREAM_API_KEYS": "alice:sekrit"})
    assert "sekrit" not in str(info.value)


SECRET = {"PICSTREAM_WEBHOOK_SECRET": "s" * 32}


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        ("hooks.example", "https://hooks.example/x"),
        ("hooks.example", "https://HOOKS.example:8443/x"),  # a bare host allows every port
        ("hooks.example:8443", "https://hooks.example:8443/x"),
        ("[::1]:9000", "http://[::1]:9000/hook"),
        ("[::1]", "http://[::1]:9000/hook"),
        ("[0:0::1]:9000", "http://[::1]:9000/hook"),  # compared in canonical form
        ("[::1]:9000", "http://[0:0:0:0:0:0:0:1]:9000/hook"),
    ],
)
def test_webhook_hosts_match(hosts: str, url: str) -> None:
    env = {**BASE, **SECRET, "PICSTREAM_WEBHOOK_HOSTS": hosts}
    settings = Settings.from_env({**env, "PICSTREAM_WEBHOOKS": f"alice={url}"})
    assert host_allowed(url, settings.webhook_hosts)
    assert check_url(url, settings.webhook_hosts) == url


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        ("hooks.example:8443", "https://hooks.example/x"),
        ("hooks.example:8443", "https://hooks.example:8444/x"),
        ("[::1]:9000", "http://[::1]:9001/hook"),
        ("[::1]:9000", "http://[::2]:9000/hook"),
        ("[::1]:9000", "http://127.0.0.1:9000/hook"),
    ],
)
def test_webhook_hosts_refuse(hosts: str, url: str) -> None:
    env = {**BASE, **SECRET, "PICSTREAM_WEBHOOK_HOSTS": hosts}
    with pytest.raises(ConfigError, match="not on PICSTREAM_WEBHOOK_HOSTS"):
        Settings.from_env({**env, "PICSTREAM_WEBHOOKS": f"alice={url}"})
    with pytest.raises(WebhookHostNotAllowed, match="not on PICSTREAM_WEBHOOK_HOSTS"):
        check_url(url, frozenset({hosts}))


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example:99999/",
        "http://hooks.example:abc/",
        "http://127.0.0.1:1:80/",
        "http://hooks.example:0/",
    ],
)
def test_unreadable_webhook_ports(url: str) -> None:
    hosts = frozenset({"hooks.example", "127.0.0.1", "[::1]"})
    with pytest.raises(InvalidWebhookUrl, match="invalid host or port"):
        check_url(url, hosts)
    env = {**BASE, **SECRET, "PICSTREAM_WEBHOOK_HOSTS": ",".join(hosts)}
    with pytest.raises(ConfigError, match="PICSTREAM_WEBHOOKS"):
        Settings.from_env({**env, "PICSTREAM_WEBHOOKS": f"alice={url}"})


@pytest.mark.parametrize("url", ["http://[::1/", "http://[not-an-address]/"])
def test_unreadable_webhook_hosts(url: str) -> None:
    with pytest.raises(InvalidWebhookUrl, match="invalid host or port"):
        check_url(url, frozenset({"[::1]"}))


@pytest.mark.parametrize(
    "queues",
    [
        {"PICSTREAM_WEBHOOK_QUEUE": "convert"},
        {"PICSTREAM_WEBHOOK_QUEUE": "reconvert"},
        {"PICSTREAM_QUEUE": "jobs", "PICSTREAM_WEBHOOK_QUEUE": "jobs"},
    ],
)
def test_the_webhook_queue_is_a_queue_of_its_own(queues: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="PICSTREAM_WEBHOOK_QUEUE must differ"):
        Settings.from_env({**BASE, **queues})


def test_each_concern_reads_as_one_view() -> None:
    s = Settings.from_env(
        {
            **BASE,
            **SECRET,
            "S3_SECRET_KEY": "storage-secret-0123",
            "PICSTREAM_WEBHOOK_HOSTS": "hooks.example",
            "PICSTREAM_SIGNING_KEY": "k" * 32,
        }
    )
    assert (s.conversion.queue, s.webhooks.queue, s.conversion.bulk_queue) == (
        "convert",
        "webhooks",
        "reconvert",
    )
    assert s.webhooks.hosts == frozenset({"hooks.example"}) and s.webhooks.secret == b"s" * 32
    assert (s.storage.endpoint, s.storage.secret_key) == (
        "http://127.0.0.1:8333",
        "storage-secret-0123",
    )
    assert (s.web.port, s.web.threads, s.conversion.threads) == (8000, 96, 2)
    assert s.conversion.profiles is s.profiles and s.conversion.profiles_path == ""
    # A logged view shows no secret, as a logged Settings shows none.
    shown = repr(s) + repr(s.storage) + repr(s.web) + repr(s.webhooks)
    for secret in ("storage-secret-0123", "s" * 32, "k" * 32):
        assert secret not in shown


# ------------------------------------------------------------------ each process its concerns
PROCESSES = {
    "web": WEB_PROCESS,
    "worker": WORKER_PROCESS,
    "admin janitor": ADMIN_CONCERNS["janitor"],
    "admin rebuild": ADMIN_CONCERNS["rebuild"],
}
WEB, WORKER, ADMIN = {"web"}, {"worker"}, {"admin janitor", "admin rebuild"}


@pytest.mark.parametrize(
    ("variable", "bad", "refused_by"),
    [
        # Storage: every process.
        ("S3_BUCKET", "Bad_Bucket", WEB | WORKER | ADMIN),
        ("REDIS_URL", "localhost:6379", WEB | WORKER | ADMIN),
        ("PICSTREAM_REDIS_TIMEOUT", "soon", WEB | WORKER | ADMIN),
        ("PICSTREAM_LOG_LEVEL", "chatty", WEB | WORKER | ADMIN),
        # The queues: whoever queues or runs jobs (admin rebuild and migrate queue them, the
        # janitor queues lost conversions again).
        ("PICSTREAM_QUEUE", "no spaces", WEB | WORKER | ADMIN),
        ("PICSTREAM_WEBHOOK_QUEUE", "convert", WEB | WORKER | ADMIN),
        ("PICSTREAM_RETRY_INTERVALS", "5,x", WEB | WORKER | ADMIN),
        ("PICSTREAM_JOB_TIMEOUT", "0", WEB | WORKER | ADMIN),
        # The web alone.
        ("PICSTREAM_WEB_THREADS", "abc", WEB),
        ("PICSTREAM_CORS_ORIGINS", "https://app.example.com/", WEB),
        ("PICSTREAM_MAX_UPLOADS", "95", WEB),  # the budgets leave no thread free
        ("PICSTREAM_PART_SIZE", "1MiB", WEB),
        ("S3_PUBLIC_ENDPOINT", "ftp://cdn", WEB),
        ("PICSTREAM_API_KEYS", "alice:short", WEB),
        ("PICSTREAM_TOKEN_TTL", "999999", WEB),
        ("PORT", "eighty", WEB),
        # Both decode limits: the web checks headers, the worker decodes.
        ("PICSTREAM_MAX_PIXELS", "many", WEB | WORKER),
        # The worker alone.
        ("PICSTREAM_MAX_FRAMES", "lots", WORKER),
        ("PICSTREAM_CONVERT_THREADS", "0", WORKER),
        ("PICSTREAM_JOB_MEMORY", "1 furlong", WORKER),
        ("PICSTREAM_JANITOR_INTERVAL", "-5", WORKER),
        ("PICSTREAM_WEBHOOK_SECRET", "short", WORKER),
        ("PICSTREAM_WEBHOOKS", "alice", WORKER),
        ("PICSTREAM_WEBHOOK_RETRY_INTERVALS", "never", WORKER),
        # The allow-list: the web checks callback URLs against it, the worker deliveries.
        ("PICSTREAM_WEBHOOK_HOSTS", "not a host", WEB | WORKER),
    ],
)
def test_each_process_checks_the_settings_it_uses(
    variable: str, bad: str, refused_by: set[str]
) -> None:
    env = {**BASE, variable: bad}
    for process, concerns in PROCESSES.items():
        if process in refused_by:
            with pytest.raises(ConfigError, match=variable):
                Settings.from_env(env, concerns)
        else:
            Settings.from_env(env, concerns)  # starts: it never uses the variable
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)  # every concern: the dev launcher, tests


def test_the_profiles_file_is_read_by_the_processes_that_use_profiles(tmp_path: Path) -> None:
    env = {**BASE, "PICSTREAM_PROFILES": str(tmp_path / "missing.toml")}
    for concerns in (WEB_PROCESS, WORKER_PROCESS):
        with pytest.raises(ConfigError, match="PICSTREAM_PROFILES: cannot read"):
            Settings.from_env(env, concerns)
    for concerns in ADMIN_CONCERNS.values():
        assert Settings.from_env(env, concerns).profiles_path == ""  # never opened


def test_the_web_reads_the_webhook_allow_list_but_not_the_delivery_settings() -> None:
    # The signing key is the worker's: the web never delivers.
    env = {**BASE, "PICSTREAM_WEBHOOK_HOSTS": "hooks.example"}
    assert Settings.from_env(env, WEB_PROCESS).webhook_hosts == frozenset({"hooks.example"})
    with pytest.raises(ConfigError, match="PICSTREAM_WEBHOOK_SECRET"):
        Settings.from_env(env, WORKER_PROCESS)


def test_a_view_of_settings_the_process_did_not_read_is_refused() -> None:
    web = Settings.from_env(BASE, WEB_PROCESS)
    worker = Settings.from_env(BASE, WORKER_PROCESS)
    assert web.web.threads == 96 and worker.conversion.threads == 2
    assert worker.webhooks.queue == "webhooks" and worker.storage.janitor_interval == 300
    for view in ("conversion", "webhooks", "storage"):
        with pytest.raises(ConcernNotRead, match=f"settings.{view} draws on"):
            getattr(web, view)
    with pytest.raises(ConcernNotRead, match="the web settings"):
        _ = worker.web


def test_storage_is_read_by_every_process() -> None:
    for concerns in (*PROCESSES.values(), ()):
        with pytest.raises(ConfigError, match="S3_ENDPOINT is required"):
            Settings.from_env({"S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}, concerns)
    assert Settings.from_env(BASE, ()).concerns == frozenset({Concern.STORAGE})


def test_the_example_production_settings_are_valid() -> None:
    """deploy/env.example is what operators copy: every value in it must start a process."""
    path = Path(__file__).resolve().parents[2] / "deploy" / "env.example"
    lines = path.read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    env.pop("PICSTREAM_PROFILES")  # a file on the production machine
    settings = Settings.from_env(env)
    assert settings.redis_url == env["REDIS_URL"]
