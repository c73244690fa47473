"""The `picstream` commands (click): the composition root of the client. It reads the
environment once, builds the HTTP session, and turns every failure into one line on
stderr and a non-zero exit status (1: the server or the network said no; 2: a bad
argument; 130: interrupted).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cli import config, output
from cli.client import Api, ApiError, Interrupted, NetworkError
from cli.download import Downloader, VerifyError, target
from cli.events import Event, follow
from cli.pending import PendingUploads, state_path
from cli.upload import Bars, Options, Uploader, UsageError, collect

F = TypeVar("F", bound=Callable[..., Any])


class Commands(click.Group):
    """A group whose commands' failures end as one `Error: …` line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ApiError, NetworkError, config.ConfigError, VerifyError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        except Interrupted:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None


@dataclass
class Session:
    """What every command shares: the environment, `--url`, and the settings from them."""

    env: dict[str, str]
    url_flag: str | None
    _config: config.Config | None = field(default=None, init=False)

    @property
    def config(self) -> config.Config:
        if self._config is None:
            self._config = config.load(self.env, self.url_flag)
            for warning in self._config.warnings:
                click.echo(f"warning: {warning}", err=True)
        return self._config

    def api(self, connections: int = 8) -> Api:
        cfg = self.config
        if not cfg.key:
            raise click.ClickException(
                f"no API key for {cfg.url}: run `picstream login` or set PICSTREAM_KEY"
            )
        return Api(cfg.url, cfg.key, connections=connections)


pass_session = click.make_pass_decorator(Session)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    metavar="URL",
    help="The picstream server (else PICSTREAM_URL, else the one `login` saved, "
    f"else {config.DEFAULT_URL}).",
)
@click.version_option(package_name="picstream", prog_name="picstream")
@click.pass_context
def app(ctx: click.Context, url: str | None) -> None:
    """Upload images to a picstream server, and list, show, download, follow and delete
    them. The key comes from PICSTREAM_KEY or from `picstream login`."""
    ctx.obj = Session(dict(os.environ), url)


# ------------------------------------------------------------------------------- login


@app.command()
@click.option(
    "--url", "login_url", metavar="URL", help=f"The server [default: {config.DEFAULT_URL}]."
)
@click.option(
    "--key",
    help="The API key. Prompted for when missing; read from stdin when that is not a "
    "terminal (`picstream login < var/dev-api-key`).",
)
@pass_session
def login(session: Session, login_url: str | None, key: str | None) -> None:
    """Check a key against the server and save both in the config file (mode 0600)."""
    cfg = session.config
    url = login_url or session.url_flag
    if url is None:
        url = click.prompt("Server URL", default=cfg.url) if sys.stdin.isatty() else cfg.url
    url = config.normalise_url(url)
    if key is None:
        if sys.stdin.isatty():
            key = click.prompt("API key", hide_input=True)
        else:
            key = sys.stdin.readline()
    key = config.check_key(key)
    api = Api(url, key)
    try:
        api.json("GET", "/v1/images", params={"limit": 1})
    except ApiError as exc:
        reason = f"{exc.title}, HTTP {exc.status}"
        raise click.ClickException(f"{url} did not accept the key ({reason})") from None
    finally:
        api.close()
    config.save(cfg.path, url, key)
    click.echo(f"Logged in to {url}; saved in {cfg.path}", err=True)
    overriding = [name for name in ("PICSTREAM_URL", "PICSTREAM_KEY") if session.env.get(name)]
    if overriding:
        click.echo(f"note: {' and '.join(overriding)} set in the environment win over it", err=True)


# ------------------------------------------------------------------------------ upload


@app.command()
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, 32),
    default=4,
    show_default=True,
    help="Files sent at once.",
)
@click.option("--profile", help="The conversion profile [default: the server's `default`].")
@click.option("--id", "image_id", help="A chosen image id (one file only).")
@click.option("--alt", help="Alternative text for the image(s).")
@click.option("--wait", is_flag=True, help="Follow each image until it is ready or failed.")
@json_option
@pass_session
def upload(
    session: Session,
    paths: tuple[str, ...],
    concurrency: int,
    profile: str | None,
    image_id: str | None,
    alt: str | None,
    wait: bool,
    as_json: bool,
) -> None:
    """Upload files, directories (recursively) and globs, resumably.

    Each file goes up over tus in 16 MiB requests. Running the same command again after
    it was interrupted or killed continues every unfinished file where the server has it.
    Exit status 0 only if every file was uploaded (and, with --wait, became ready).
    """
    try:
        files = collect(paths)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    if image_id is not None and len(files) != 1:
        raise click.UsageError(f"--id names one image, but {len(files)} files were given")
    if not files:
        raise click.UsageError("no files to upload")
    options = Options(profile, image_id, alt, wait, concurrency)
    api = session.api(connections=2 * concurrency + 2)
    # One clear error for a wrong key or a server that is down, rather than the same one
    # for every file after its retries.
    api.json("GET", "/v1/images", params={"limit": 1})
    pending = PendingUploads(state_path(session.env))
    err = output.console(stderr=True)
    total = sum(f.stat().st_size for f in files)
    stop = threading.Event()
    try:
        with Bars(None if as_json or not err.is_terminal else err, len(files), total) as bars:
            results = Uploader(api, pending, options, bars, stop).run(files)
    except Interrupted:
        left = len(pending.entries())
        click.echo(
            f"interrupted: {left} unfinished upload(s) kept; run the same command again to resume",
            err=True,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # upload threads may be blocked in a read: do not wait for them
    api.close()
    failed = sum(not r.succeeded(wait) for r in results)
    if as_json:
        output.print_json([r.as_json() for r in results])
    else:
        output.console().print(output.upload_summary(r.as_json() for r in results))
        done = "ready" if wait else "uploaded"
        click.echo(f"{len(results) - failed} {done}, {failed} failed", err=True)
    sys.exit(1 if failed else 0)


# ---------------------------------------------------------------------------- reading


@app.command("ls")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=50, show_default=True, help="Images per page."
)
@click.option("--all", "all_pages", is_flag=True, help="Every page, not just the first.")
@click.option("--cursor", help="Start from this `next_cursor` of an earlier page.")
@json_option
@pass_session
def list_images(
    session: Session, limit: int, all_pages: bool, cursor: str | None, as_json: bool
) -> None:
    """List your images, newest first."""
    api = session.api()
    records: list[dict[str, Any]] = []
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        page = api.json("GET", "/v1/images", params=params)
        records += page["images"]
        cursor = page.get("next_cursor")
        if not all_pages or not cursor:
            break
    if as_json:
        output.print_json({"images": records, "next_cursor": cursor})
        return
    if not records:
        click.echo("no images", err=True)
        return
    output.console().print(output.images(records))
    if cursor:
        click.echo(f"more: --all, or --cursor {cursor}", err=True)


@app.command()
@click.argument("image_id", metavar="ID")
@json_option
@pass_session
def show(session: Session, image_id: str, as_json: bool) -> None:
    """Show an image's record and its variants."""
    record = session.api().json("GET", f"/v1/images/{image_id}")
    if as_json:
        output.print_json(record)
        return
    out = output.console()
    for part in output.record(record):
        out.print(part)


@app.command()
@click.argument("image_id", metavar="ID")
@click.argument("variant", required=False)
@click.option(
    "-o",
    "--output",
    "out",
    metavar="FILE",
    help="Where to write (`-`: stdout) [default: ID.EXT or ID.VARIANT].",
)
@json_option
@pass_session
def get(
    session: Session, image_id: str, variant: str | None, out: str | None, as_json: bool
) -> None:
    """Download the original, or a VARIANT such as w1024.webp.

    A FILE that exists partially is continued (Range + If-Range), and the result is
    checked against the server's BLAKE3.
    """
    api = session.api()
    what = target(api.json("GET", f"/v1/images/{image_id}"), variant)
    if out == "-":
        done = Downloader(api).to_stdout(what)
    else:
        err = output.console(stderr=True)
        show_bar = err.is_terminal and not as_json
        with Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=err,
            disable=not show_bar,
        ) as progress:
            task = progress.add_task(Path(out or what.name).name, total=what.size)
            downloader = Downloader(api, lambda n, total: progress.update(task, completed=n))
            done = downloader.to_file(what, Path(out or what.name))
    if as_json:
        output.print_json(done.as_json())
    elif out != "-":
        resumed = f", resumed at {output.size(done.resumed_from)}" if done.resumed_from else ""
        click.echo(f"{done.file}: {output.size(done.size)}, BLAKE3 verified{resumed}", err=True)


@app.command()
@click.argument("image_id", metavar="ID")
@json_option
@pass_session
def watch(session: Session, image_id: str, as_json: bool) -> None:
    """Print an image's events until its conversion ends (exit 0 when it is ready)."""

    def show_event(event: Event) -> None:
        if as_json:
            click.echo(json.dumps({"id": event.id, "event": event.name, "data": event.payload()}))
            return
        data = event.payload()
        if event.name == "variant":
            line = f"variant {data.get('name')}: {data.get('status')}"
        else:
            line = f"{event.name}: {data.get('status', '')}"
        if data.get("error"):
            line += f" ({data['error']})"
        click.echo(line)

    outcome = follow(session.api(), image_id, on_event=show_event)
    sys.exit(0 if outcome.status == "ready" else 1)


# ---------------------------------------------------------------------------- changing


@app.command()
@click.argument("image_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_session
def rm(session: Session, image_id: str, yes: bool, as_json: bool) -> None:
    """Delete an image: its original, every variant and its record."""
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError("not deleting without --yes (no terminal to ask on)")
        click.confirm(f"Delete image {image_id} and all its files?", abort=True)
    resp = session.api().call("DELETE", f"/v1/images/{image_id}")
    later = resp.status_code == 202
    if as_json:
        output.print_json({"id": image_id, "deleted": True, "files_removed_later": later})
    else:
        note = " (its files are removed once the store is back)" if later else ""
        click.echo(f"deleted {image_id}{note}", err=True)


@app.command()
@click.argument("image_id", metavar="ID")
@click.option("--profile", help="Convert with this profile [default: the image's own].")
@click.option("--wait", is_flag=True, help="Follow the image until it is ready or failed.")
@json_option
@pass_session
def reconvert(
    session: Session, image_id: str, profile: str | None, wait: bool, as_json: bool
) -> None:
    """Convert an image again (after a profile change, or with another profile)."""
    api = session.api()
    params = {"profile": profile} if profile else None
    record = api.json("POST", f"/v1/images/{image_id}/reconvert", params=params)
    if wait:
        outcome = follow(api, image_id)
        record = outcome.record or api.json("GET", f"/v1/images/{image_id}")
    if as_json:
        output.print_json(record)
    else:
        pending = record.get("pending") or {}
        used = pending.get("profile") or profile or record.get("profile")
        click.echo(f"{image_id}: {record['status']} (profile {used})", err=True)
    if wait and record["status"] != "ready":
        sys.exit(1)


# ------------------------------------------------------------------------------ tokens


@app.group(cls=Commands)
def token() -> None:
    """Upload tokens: credentials that can only upload, for browsers and apps."""


@token.command("create")
@click.option("--expires-in", type=click.IntRange(1), metavar="SECONDS", help="Lifetime.")
@click.option("--uploads", type=click.IntRange(1), help="How many uploads it grants.")
@click.option("--max-bytes", type=click.IntRange(1), help="The largest image it uploads.")
@click.option("--format", "formats", multiple=True, help="An image format it uploads (repeat).")
@click.option("--profile", help="The only profile its uploads use.")
@click.option("--id", "image_id", help="The only image id it uploads under.")
@click.option("--callback", metavar="URL", help="The webhook every upload with it gets.")
@json_option
@pass_session
def token_create(
    session: Session,
    expires_in: int | None,
    uploads: int | None,
    max_bytes: int | None,
    formats: tuple[str, ...],
    profile: str | None,
    image_id: str | None,
    callback: str | None,
    as_json: bool,
) -> None:
    """Mint an upload token and print it (--json: with its jti and limits)."""
    asked: dict[str, Any] = {
        "expires_in": expires_in,
        "uploads": uploads,
        "max_bytes": max_bytes,
        "formats": list(formats) or None,
        "profile": profile,
        "id": image_id,
        "callback": callback,
    }
    body = {k: v for k, v in asked.items() if v is not None}
    minted = session.api().json("POST", "/v1/upload-tokens", json_body=body)
    if as_json:
        output.print_json(minted)
    else:
        click.echo(minted["token"])


@token.command("revoke")
@click.argument("jti")
@pass_session
def token_revoke(session: Session, jti: str) -> None:
    """Revoke an upload token by its jti (uploads with it are refused from now on)."""
    session.api().call("DELETE", f"/v1/upload-tokens/{jti}")
    click.echo(f"revoked {jti}", err=True)


def run() -> None:
    """The console script."""
    app(prog_name="picstream")
