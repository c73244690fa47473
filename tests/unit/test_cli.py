"""The command-line client's pure parts: SSE parsing, tus metadata, where settings come
from, which files an upload names. Everything that talks HTTP is tested through the real
console script in tests/integration/test_cli.py."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from cli import config
from cli.download import etag_digest
from cli.events import Event, outcome_of, parse
from cli.tus import encode_metadata
from cli.upload import UsageError, collect


def test_sse_parsing_follows_the_event_stream_rules() -> None:
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "id: 1-0",
        "event: status",
        'data: {"status": "processing",',
        'data:  "record": {"id": "a"}}',
        "",
        "",
        "event: variant",  # no id: the last one persists
        'data:{"name": "w256.webp", "status": "ready"}',
        "",
        "id: 2-0",
        "event: status",
        'data: {"status": "failed", "error": "bad pixels", "record": {"id": "a"}}',
    ]
    events = list(parse([*lines, ""]))
    assert [(e.id, e.name) for e in events] == [
        ("1-0", "status"),
        ("1-0", "variant"),
        ("2-0", "status"),
    ]
    assert events[0].payload() == {"status": "processing", "record": {"id": "a"}}
    assert events[1].payload()["name"] == "w256.webp" and not events[1].final
    assert events[2].final
    outcome = outcome_of(events[2])
    assert (outcome.status, outcome.error, outcome.record) == ("failed", "bad pixels", {"id": "a"})
    assert outcome_of(Event("3-0", "deleted", '{"status": "deleted"}')).status == "deleted"
    assert list(parse(["data: unterminated"])) == []  # an event ends only at a blank line


def test_tus_metadata_is_base64_of_utf8_and_leaves_out_what_is_not_given() -> None:
    header = encode_metadata({"filename": "été, 1.jpg", "profile": None, "alt": ""})
    pairs = dict(pair.split(" ") for pair in header.split(","))
    assert set(pairs) == {"filename", "alt"}
    assert base64.b64decode(pairs["filename"]).decode() == "été, 1.jpg"
    assert pairs["alt"] == ""


def test_settings_come_from_flags_then_environment_then_the_file(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "conf")}
    assert config.load(env) == config.Config(
        config.DEFAULT_URL, None, tmp_path / "conf" / "picstream" / "config.toml", []
    )
    config.save(config.config_path(env), "HTTP://Example.com:8080/", "saved-key")
    assert (config.load(env).url, config.load(env).key) == ("http://example.com:8080", "saved-key")
    # The environment wins; the saved key is never sent to another server.
    assert config.load({**env, "PICSTREAM_KEY": "env-key"}).key == "env-key"
    other = config.load({**env, "PICSTREAM_URL": "http://other:1"})
    assert (other.url, other.key) == ("http://other:1", None)
    assert config.load(env, url_flag="http://other:1").key is None
    assert config.load(env, url_flag="http://example.com:8080").key == "saved-key"
    # A relative XDG_CONFIG_HOME is ignored (the XDG rule).
    assert config.config_path({"HOME": "/h", "XDG_CONFIG_HOME": "rel"}) == Path(
        "/h/.config/picstream/config.toml"
    )


@pytest.mark.parametrize(
    "url", ["ftp://example.com", "example.com", "http://", "http://h/?q=1", "http://u:p@h"]
)
def test_urls_that_cannot_be_a_server_are_refused(url: str) -> None:
    with pytest.raises(config.ConfigError):
        config.normalise_url(url)


def test_keys_that_cannot_travel_in_a_header_are_refused_without_echoing_them() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.check_key("has space-secret")
    assert "secret" not in str(info.value)


def test_etags_name_the_blake3() -> None:
    assert etag_digest('"ab12"') == "ab12"
    assert etag_digest('W/"ab12"') == "ab12"
    assert etag_digest(None) is None


def test_an_upload_names_each_file_once_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("b/2.png", "b/1.png", "b/.hidden/x.png", "b/.DS_Store", "a.png"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(b"x")
    assert collect(["b", "a.png", "b/1.png", "*.png"]) == [
        Path("b/1.png"),
        Path("b/2.png"),
        Path("a.png"),
    ]
    assert collect(["**/2.png"]) == [Path("b/2.png")]
    with pytest.raises(UsageError, match="no such file or directory: nope"):
        collect(["nope"])
    with pytest.raises(UsageError, match="no file matches"):
        collect(["*.gif"])
