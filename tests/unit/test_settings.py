from __future__ import annotations

import pytest

from core.settings import ConfigError, Settings

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
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({**BASE, **env})


def test_key_errors_never_echo_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({**BASE, "PICSTREAM_API_KEYS": "alice:sekrit"})
    assert "sekrit" not in str(info.value)
