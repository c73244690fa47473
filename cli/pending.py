"""The uploads in progress on this machine: a small JSON file mapping a file (path, size,
mtime, and the server and options it goes to) to its tus upload URL.

An entry is written as soon as the server has created the upload and removed once the
upload has become an image or was refused for good, so running the same `picstream
upload` again after a crash, a kill or Ctrl-C resumes each unfinished file from the
server's offset instead of sending it again. A file changed since (size or mtime) gets a
new key, so its old upload is never continued with other bytes.

`$XDG_STATE_HOME/picstream/uploads.json` (else ~/.local/state/...), 0600. Several
processes may use it at once: every change is a read-modify-write under an flock, written
to a temporary file and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# tus uploads expire on the server within a day (README: at most 23 h); entries older
# than this can only answer 404/410.
MAX_AGE = 2 * 86400


def state_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME", "")
    if base and os.path.isabs(base):
        root = Path(base)
    else:
        root = Path(env.get("HOME") or Path.home()) / ".local" / "state"
    return root / "picstream" / "uploads.json"


def upload_key(
    server: str, path: Path, size: int, mtime_ns: int, options: Mapping[str, Any]
) -> str:
    """What identifies one upload of one version of a file to one server with one set of
    options (profile, id, alt are fixed when the upload is created)."""
    ident = [server, str(path), size, mtime_ns, sorted(options.items())]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


class PendingUploads:
    """The state file; thread-safe and shared safely between processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        """The upload URL of an unfinished upload, if one was recorded."""
        with self._locked():
            entry = self._read().get(key)
        return str(entry["url"]) if entry else None

    def put(self, key: str, url: str, file: Path, size: int) -> None:
        with self._locked():
            entries = self._read()
            entries[key] = {"url": url, "file": str(file), "size": size, "started": time.time()}
            self._write(entries)

    def forget(self, key: str) -> None:
        with self._locked():
            entries = self._read()
            if entries.pop(key, None) is not None:
                self._write(entries)

    def entries(self) -> dict[str, dict[str, Any]]:
        with self._locked():
            return self._read()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock = self.path.with_name(self.path.name + ".lock")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: start afresh rather than refuse to upload
        uploads = data.get("uploads") if isinstance(data, dict) else None
        if not isinstance(uploads, dict):
            return {}
        now = time.time()
        return {
            k: v
            for k, v in uploads.items()
            if isinstance(v, dict)
            and isinstance(v.get("url"), str)
            and now - float(v.get("started", 0)) < MAX_AGE
        }

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        text = json.dumps({"version": 1, "uploads": entries}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".uploads.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
