from __future__ import annotations

import pytest

from core.errors import InvalidWebhookUrl, WebhookHostNotAllowed
from core.settings import ConfigError, Settings
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
