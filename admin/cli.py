"""`picstream-admin`: operator commands. The composition root of a one-shot process: it reads
the same environment as the web and worker processes (see the README's settings), and checks
only what the command uses: the store and Redis, and the queues for the commands that queue
conversions.

    picstream-admin rebuild    recreate Redis records from the bucket's record copies
    picstream-admin janitor    one janitor sweep now
    picstream-admin migrate    move images stored before incarnations to the current layout

Each is safe on a live system and idempotent; exit status 0 on success, 1 when a
dependency failed, 2 on bad settings. `--env-file FILE` adds KEY=VALUE settings from a file
(e.g. `var/dev.env`, which `make run` writes) over the environment.
"""

from __future__ import annotations

import argparse
import os
import sys

from core import janitor
from core.errors import PicstreamError
from core.jobs import requeue_for
from core.logs import configure as configure_logs
from core.migrate import migrate_all
from core.rebuild import rebuild
from core.records import Records, connect
from core.settings import Concern, ConfigError, Settings
from core.storage import Store

# What each command reads from the environment: rebuild and migrate queue conversions.
CONCERNS = {
    "rebuild": (Concern.STORAGE, Concern.JOBS),
    "janitor": (Concern.STORAGE, Concern.JOBS),
    "migrate": (Concern.STORAGE, Concern.JOBS),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="picstream-admin", description=__doc__.split("\n")[0])
    parser.add_argument("--env-file", help="KEY=VALUE settings to use over the environment")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("rebuild", help="recreate Redis records from the bucket's copies")
    commands.add_parser("janitor", help="one janitor sweep now")
    commands.add_parser("migrate", help="move pre-incarnation images to the current layout")
    args = parser.parse_args(argv)
    try:
        env = {**os.environ, **(read_env_file(args.env_file) if args.env_file else {})}
        settings = Settings.from_env(env, CONCERNS[args.command])
    except (ConfigError, OSError) as exc:
        print(f"picstream-admin: {exc}", file=sys.stderr)
        return 2
    configure_logs("info", settings.log_format)  # PICSTREAM_LOG_FORMAT, scrubbed
    store = Store.from_settings(settings)
    records = Records(connect(settings))
    try:
        if args.command == "rebuild":
            print(f"rebuild: {rebuild(store, records, settings)}")
        elif args.command == "janitor":
            requeue = requeue_for(records.redis, settings)
            print(f"janitor: {janitor.run_once(store, records, requeue=requeue)}")
        else:
            print(f"migrate: {migrate_all(store, records, settings)} image(s) moved")
    except PicstreamError as exc:
        print(f"picstream-admin {args.command}: {exc.detail}", file=sys.stderr)
        return 1
    return 0


def read_env_file(path: str) -> dict[str, str]:
    """`KEY=VALUE` lines; blank lines and `#` comments skipped; no quoting or expansion."""
    values = {}
    with open(path, encoding="utf-8") as lines:
        for n, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{path}, line {n}: expected KEY=VALUE")
            values[key.strip()] = value.strip()
    return values


def run() -> None:
    sys.exit(main())
