"""Where the client's endpoint and API key come from.

In order: `--url` on the command line, then `PICSTREAM_URL` / `PICSTREAM_KEY` in the
environment, then the config file `picstream login` writes (`$XDG_CONFIG_HOME/picstream/
config.toml`, else `~/.config/picstream/config.toml`), then `http://127.0.0.1:8000` (what
`make run` serves) for the URL.

The file's key is sent only to the URL it was saved with: pointing the client at another
server (`--url`, `PICSTREAM_URL`) never hands that server the saved key; it needs
`PICSTREAM_KEY` or its own `picstream login`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8000"
# What can travel in an Authorization header and in a TOML basic string unescaped.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,4096}")


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Config:
    """The endpoint and key a command uses, and what the user should be told about them."""

    url: str
    key: str | None
    path: Path
    warnings: list[str] = field(default_factory=list)


def config_path(env: Mapping[str, str]) -> Path:
    """The config file: under XDG_CONFIG_HOME when it is an absolute path (the XDG rule),
    else under ~/.config."""
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else _home(env) / ".config"
    return root / "picstream" / "config.toml"


def _home(env: Mapping[str, str]) -> Path:
    home = env.get("HOME")
    return Path(home) if home else Path.home()


def normalise_url(url: str) -> str:
    """`scheme://host[:port][/path]` without a trailing slash; ConfigError otherwise."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"not an http(s) URL: {url!r} (e.g. {DEFAULT_URL})")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"the URL must not carry a query, fragment or user: {url!r}")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def check_key(key: str) -> str:
    """The key as it will be sent; ConfigError (without the key) when it cannot be."""
    key = key.strip()
    if not _KEY_RE.fullmatch(key):
        raise ConfigError("the API key must be printable ASCII without spaces")
    return key


def load(env: Mapping[str, str], url_flag: str | None = None) -> Config:
    """The settings for one command."""
    path = config_path(env)
    saved, warnings = _read(path)
    saved_url = normalise_url(saved["url"]) if saved.get("url") else None
    url = normalise_url(url_flag or env.get("PICSTREAM_URL") or saved_url or DEFAULT_URL)
    key = env.get("PICSTREAM_KEY") or None
    if key is None and saved.get("key") and url == saved_url:
        key = saved["key"]
    return Config(url, check_key(key) if key else None, path, warnings)


def _read(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}, []
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    warnings = []
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{path} holds an API key and others can read it: chmod 600 {path}")
    values = {k: v for k, v in data.items() if k in ("url", "key") and isinstance(v, str)}
    return values, warnings


def save(path: Path, url: str, key: str) -> None:
    """Write the file atomically, readable by its owner only from the moment it exists:
    mkstemp creates it 0600 (whatever the umask), and a rename puts it in place."""
    text = (
        "# picstream command-line client: written by `picstream login`.\n"
        f"url = {json.dumps(normalise_url(url))}\n"
        f"key = {json.dumps(check_key(key))}\n"
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
