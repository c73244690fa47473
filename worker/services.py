"""What the jobs of a worker process talk to, as its composition root built it.

`python -m worker` (worker/__main__.py) reads the environment once and calls
`JobServices.configure(settings)` before it takes a job; tests that run jobs in-process do
the same with their own Settings. Jobs never read the environment: they ask
`JobServices.current()` (or `configured_settings()`, when they need no client).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from core.records import Records, connect
from core.settings import Settings
from core.storage import Store


class NotConfigured(RuntimeError):
    """A job ran in a process whose composition root never configured the jobs."""


@dataclass(frozen=True, slots=True)
class JobServices:
    """The settings of the process and the clients built from them. The clients are built
    once per process that runs jobs, after the fork (a minio client or a Redis connection
    must not cross one): rq runs each job in a fresh work-horse."""

    settings: Settings
    store: Store
    records: Records

    _settings: ClassVar[Settings | None] = None
    _built: ClassVar[tuple[int, JobServices] | None] = None

    @classmethod
    def configure(cls, settings: Settings | None) -> None:
        """The settings every job of this process uses from now on (None: none, as before
        the composition root ran)."""
        cls._settings = settings
        cls._built = None

    @classmethod
    def configured_settings(cls) -> Settings:
        if cls._settings is None:
            raise NotConfigured(
                "JobServices.configure(settings) was not called: jobs run under"
                " `python -m worker`, which configures them"
            )
        return cls._settings

    @classmethod
    def current(cls) -> JobServices:
        """The process's services, built on first use in each process."""
        settings = cls.configured_settings()
        pid = os.getpid()
        if cls._built is None or cls._built[0] != pid:
            cls._built = (pid, cls.build(settings))
        return cls._built[1]

    @classmethod
    def build(cls, settings: Settings) -> JobServices:
        return cls(settings, Store.from_settings(settings), Records(connect(settings)))
