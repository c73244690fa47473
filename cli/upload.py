"""`picstream upload`: files, directories and globs to images, N at a time, resumably.

Each file goes up over tus (cli/tus.py). Its upload URL is recorded (cli/pending.py) as
soon as the server has made it, so the same command run again after a kill continues every
unfinished file from the offset the server holds. With `wait`, each image is then followed
over its event stream until its conversion ends. The result of every file — its image,
or the server's reason for refusing it — is collected; one file's failure never stops
the others.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from cli.client import Api, ApiError, Interrupted, NetworkError, transient
from cli.events import follow
from cli.pending import PendingUploads, upload_key
from cli.tus import FileChanged, Standing, TusClient

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Options:
    """What every file of one `picstream upload` is uploaded with."""

    profile: str | None = None
    image_id: str | None = None
    alt: str | None = None
    wait: bool = False
    concurrency: int = 4

    def fixed(self) -> dict[str, str | None]:
        """What an upload is created with and cannot change afterwards."""
        return {"profile": self.profile, "id": self.image_id, "alt": self.alt}

    def metadata(self, file: Path) -> dict[str, str | None]:
        """The tus `Upload-Metadata` of one file."""
        return {"filename": file.name, **self.fixed()}


@dataclass
class Result:
    """What became of one file."""

    file: str
    size: int
    id: str | None = None
    status: str = "error"  # the image's status, or `error` when it was not uploaded
    error: str | None = None
    resumed_from: int = 0
    record: dict[str, Any] | None = field(default=None, repr=False)

    def succeeded(self, waited: bool) -> bool:
        return self.id is not None and (self.status == "ready" if waited else not self.error)

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "size": self.size,
            "id": self.id,
            "status": self.status,
            "error": self.error,
            "resumed_from": self.resumed_from,
            "record": self.record,
        }


class UsageError(ValueError):
    """An argument that names no file."""


def collect(args: Sequence[str]) -> list[Path]:
    """The files the arguments name, in order, each once: a file as it is, a directory's
    files recursively (sorted; names starting with `.` skipped), a glob's matches (for
    patterns the shell did not expand, e.g. quoted `'**/*.jpg'`)."""
    found: dict[Path, Path] = {}  # resolved -> as named (what the summary shows)
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            matches = list(_walk(path))
        elif path.is_file():
            matches = [path]
        elif path.exists():
            raise UsageError(f"not a regular file: {arg}")
        elif _GLOB_CHARS & set(arg):
            pattern = os.path.expanduser(arg)
            matches = [
                f for m in sorted(glob.glob(pattern, recursive=True)) for f in _expand(Path(m))
            ]
            if not matches:
                raise UsageError(f"no file matches {arg}")
        else:
            raise UsageError(f"no such file or directory: {arg}")
        for match in matches:
            found.setdefault(match.resolve(), match)
    return list(found.values())


def _expand(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from _walk(path)
    elif path.is_file():
        yield path


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and path.is_file():
                yield path


class Bars:
    """The progress display: one bar per file being sent, and a total (bytes, speed).
    Thread-safe; draws nothing when `console` is None (no terminal, or --json)."""

    def __init__(self, console: Console | None, files: int, total: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=console is None,
        )
        self.files = files
        self.finished = 0
        self.converting = 0
        self._lock = threading.Lock()
        self.total = self.progress.add_task(self._total_text(), total=total)

    def __enter__(self) -> Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _total_text(self) -> str:
        waiting = f", {self.converting} converting" if self.converting else ""
        return f"total ({self.finished}/{self.files} files{waiting})"

    def conversions(self, change: int) -> None:
        """One more (+1) or one fewer (-1) image followed until its conversion ends."""
        with self._lock:
            self.converting += change
            text = self._total_text()
        self.progress.update(self.total, description=text)

    def start(self, name: str, size: int) -> FileBar:
        """A bar for one file, used by the one thread that sends it."""
        label = name if len(name) <= 32 else name[:14] + "…" + name[-17:]
        return FileBar(self, self.progress.add_task(label, total=size))

    def skip(self, task: TaskID, done: int) -> None:
        """Start a file's bar at `done` bytes that the server already had (a resumed upload):
        progress, not speed, so neither bar counts them in its rate."""
        with self._lock:
            total = next(t for t in self.progress.tasks if t.id == self.total)
            self.progress.reset(self.total, completed=int(total.completed) + done)
        self.progress.reset(task, completed=done)

    def ended(self, task: TaskID) -> None:
        with self._lock:
            self.finished += 1
            text = self._total_text()
        self.progress.remove_task(task)
        self.progress.update(self.total, description=text)


class FileBar:
    """One file's bar. Called with a byte count: that many of the file's bytes are sent
    (or, after a failure, held by the server); the total moves by the difference."""

    def __init__(self, bars: Bars, task: TaskID) -> None:
        self.bars = bars
        self.task = task
        self.done = 0

    def __call__(self, done: int) -> None:
        delta, self.done = done - self.done, done
        self.bars.progress.update(self.task, completed=done)
        self.bars.progress.advance(self.bars.total, delta)

    def skip_to(self, done: int) -> None:
        """The server already holds the first `done` bytes."""
        self.bars.skip(self.task, done)
        self.done = done

    def end(self) -> None:
        """The file's bytes are settled: its bar goes, the total counts the file."""
        self.bars.ended(self.task)


class Uploader:
    """Uploads files to one server and collects their results."""

    def __init__(
        self,
        api: Api,
        pending: PendingUploads,
        options: Options,
        bars: Bars,
        stop: threading.Event,
    ) -> None:
        self.api = api
        self.pending = pending
        self.options = options
        self.bars = bars
        self.stop = stop
        self.tus = TusClient(api, stop)

    def run(self, files: Sequence[Path]) -> list[Result]:
        """Every file's result, in the order given. Interrupted (Ctrl-C) leaves every
        unfinished upload recorded for the next run."""
        results: list[Result | None] = [None] * len(files)
        n = max(1, self.options.concurrency)
        uploads = ThreadPoolExecutor(n, thread_name_prefix="upload")
        waits = ThreadPoolExecutor(n, thread_name_prefix="wait")
        futures: list[Future[Future[None] | None]] = []

        def job(i: int, file: Path) -> Future[None] | None:
            result = results[i] = self.upload(file)
            if self.options.wait and result.id is not None:
                return waits.submit(self.wait, result)
            return None

        try:
            futures = [uploads.submit(job, i, f) for i, f in enumerate(files)]
            for fut in futures:
                later = fut.result()
                if later is not None:
                    later.result()
        except KeyboardInterrupt:
            self.stop.set()
            uploads.shutdown(wait=False, cancel_futures=True)
            waits.shutdown(wait=False, cancel_futures=True)
            wait_all(futures, timeout=3)  # let running uploads notice and stop
            raise Interrupted() from None
        uploads.shutdown()
        waits.shutdown()
        return [r for r in results if r is not None]

    def upload(self, file: Path) -> Result:
        """One file, resumed when an earlier run left its upload unfinished."""
        try:
            stat = file.stat()
        except OSError as exc:
            return Result(str(file), 0, error=exc.strerror or str(exc))
        result = Result(str(file), stat.st_size)
        fixed = self.options.fixed()
        key = upload_key(self.api.url, file.resolve(), stat.st_size, stat.st_mtime_ns, fixed)
        report = self.bars.start(file.name, stat.st_size)
        try:
            image = self._send(file, result, key, report)
            record = self.api.json("GET", image)
            result.id, result.status, result.record = record["id"], record["status"], record
        except ApiError as exc:
            result.error = exc.reason
        except (NetworkError, FileChanged) as exc:
            result.error = str(exc)
        except OSError as exc:
            result.error = f"{exc.strerror or exc}"
        report.end()  # not when interrupted: that file is not done
        return result

    def _send(self, file: Path, result: Result, key: str, report: FileBar) -> str:
        """The image path of the file's upload: resumed, or created (once more if the
        recorded upload is gone, e.g. expired)."""
        for attempt in (1, 2):
            url, standing = self._recorded(key)
            result.resumed_from = standing.offset if standing else 0
            if url is None:
                url = self.tus.create(result.size, self.options.metadata(file))
                self.pending.put(key, url, file.resolve(), result.size)
            elif standing and standing.image:  # it became an image; the answer was lost
                report.skip_to(result.size)
                self.pending.forget(key)
                return standing.image
            report.skip_to(result.resumed_from)
            try:
                image = self.tus.send(url, file, result.size, result.resumed_from, report)
            except ApiError as exc:
                if exc.status in (404, 410) and attempt == 1:
                    self.pending.forget(key)
                    continue
                if not transient(exc):
                    self.pending.forget(key)  # the server ended this upload
                raise
            self.pending.forget(key)
            return image
        raise AssertionError("unreachable")

    def _recorded(self, key: str) -> tuple[str | None, Standing | None]:
        """The upload an earlier run recorded for this file and where it stands; (None,
        None) when there is none to go on with."""
        url = self.pending.get(key)
        if url is None:
            return None, None
        try:
            return url, self.tus.standing(url)
        except ApiError as exc:
            if exc.status in (404, 410):  # expired, ended, or another owner's
                self.pending.forget(key)
                return None, None
            raise

    def wait(self, result: Result) -> None:
        """Follow the image until its conversion ends; the result takes the outcome."""
        assert result.id is not None
        self.bars.conversions(+1)
        try:
            outcome = follow(self.api, result.id, stop=self.stop)
        except ApiError as exc:
            result.status, result.error = "error", exc.reason
            return
        except NetworkError as exc:
            result.status, result.error = "error", str(exc)
            return
        except Interrupted:
            return
        finally:
            self.bars.conversions(-1)
        result.status, result.error = outcome.status, outcome.error
        if outcome.record is not None:
            result.record = outcome.record
