"""REDIS_URL naming Sentinels, and when a commit counts as replicated."""

from __future__ import annotations

import pytest

from core.records import enough
from core.settings import ConfigError, SentinelTarget, Settings, sentinel_target

BASE = {"S3_ENDPOINT": "http://127.0.0.1:9000", "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    target = sentinel_target("redis+sentinel://:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:5/main/3")
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 5)),
        service="main",
        db=3,
        password="s@cret",
    )


def test_a_sentinel_url_may_leave_out_the_database_and_carry_a_user() -> None:
    target = sentinel_target("redis+sentinel://app:pw@s1:26379/picstream")
    assert target is not None
    assert (target.service, target.db, target.username, target.password) == (
        "picstream",
        0,
        "app",
        "pw",
    )


def test_a_plain_redis_url_names_no_sentinels() -> None:
    assert sentinel_target("redis://127.0.0.1:6379/0") is None
    assert sentinel_target("unix:///run/redis.sock") is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "must name the master"),
        ("redis+sentinel://s1:26379/", "must name the master"),
        ("redis+sentinel://s1:26379/main/zero", "database must be a number"),
        ("redis+sentinel://s1:26379/main/0/1", "database must be a number"),
        ("redis+sentinel://s1:99999/main", "out of range"),
        ("redis+sentinel://:pw@s1,,s2/main", "is not a Sentinel host:port"),
        ("redis+sentinel://:pw@/main", "is not a Sentinel host:port"),
        ("redis+sentinel://s1/main?ssl=1", "query and fragment"),
    ],
)
def test_a_malformed_sentinel_url_is_one_clear_line_without_the_password(
    url: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({**BASE, "REDIS_URL": url})
    text = str(raised.value)
    assert text.startswith("REDIS_URL")
    assert message in text
    assert "\n" not in text
    assert "pw" not in text


def test_other_schemes_are_refused_without_repeating_the_url() -> None:
    with pytest.raises(ConfigError, match="must be a redis://") as raised:
        Settings.from_env({**BASE, "REDIS_URL": "http://:hunter2@redis:6379/0"})
    assert "hunter2" not in str(raised.value)


def test_the_wait_settings_default_to_one_replica_within_a_second() -> None:
    settings = Settings.from_env({**BASE, "REDIS_URL": "redis+sentinel://s1/main"})
    assert (settings.redis_wait_replicas, settings.redis_wait_timeout) == (1, 1.0)
    short = Settings.from_env({**BASE, "PICSTREAM_REDIS_TIMEOUT": "1"})
    assert short.redis_wait_timeout == 0.5  # below the socket timeout, which it must be


def test_the_wait_must_end_before_the_client_stops_reading() -> None:
    env = {**BASE, "PICSTREAM_REDIS_TIMEOUT": "2", "PICSTREAM_REDIS_WAIT_TIMEOUT": "2"}
    with pytest.raises(ConfigError, match="PICSTREAM_REDIS_WAIT_TIMEOUT must be below"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("wanted", "online", "acked", "durable"),
    [
        (1, 1, 1, True),  # the replica has it
        (1, 1, 0, False),  # the replica is online but behind: taken back, 503
        (1, 0, 0, True),  # no replica (single Redis, or it died): nobody to fail over to
        (2, 1, 1, True),  # as many as are online
        (2, 2, 1, False),
        (0, 2, 0, True),  # waiting switched off
    ],
)
def test_when_a_commit_counts_as_replicated(
    wanted: int, online: int, acked: int, durable: bool
) -> None:
    assert enough(wanted, online, acked) is durable
