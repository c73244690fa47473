"""What the commands print: tables for people (rich), JSON for scripts, sizes in binary units.

Nothing from the server or the file system is read as rich markup (a file named
`[red]x.jpg` stays that name): the consoles have markup off and styles are given as
`Text` styles. Tables go to stdout; progress and messages to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Columns a reader copies whole (ids, names) or reads at a glance: never broken over lines.
_NO_WRAP = frozenset({"id", "name", "created", "status", "format", "size", "pixels"})
STATUS_STYLE = {
    "ready": "green",
    "processing": "cyan",
    "pending": "cyan",
    "failed": "red",
    "error": "red",
    "deleted": "yellow",
}


def console(*, stderr: bool = False) -> Console:
    """A console that never interprets markup or emoji; when it is not a terminal (a pipe,
    a file) and COLUMNS is unset, wide enough that table rows do not wrap."""
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty() and not os.environ.get("COLUMNS"):
        width = 200
    return Console(
        stderr=stderr, markup=False, emoji=False, highlight=False, width=width, soft_wrap=False
    )


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def size(n: int | None) -> str:
    """`1.5 MiB`; `-` when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def status(value: str | None) -> Text:
    text = value or "-"
    return Text(text, style=STATUS_STYLE.get(text, ""))


def dimensions(item: Mapping[str, Any]) -> str:
    width, height = item.get("width"), item.get("height")
    return f"{width}x{height}" if width and height else "-"


def upload_summary(rows: Iterable[Mapping[str, Any]]) -> Table:
    """The end of `picstream upload`: file, id, size, status or error."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("file", "id", "size", "status", "error"):
        table.add_column(name, overflow="fold", no_wrap=name in _NO_WRAP)
    for row in rows:
        table.add_row(
            Text(row["file"]),
            Text(row.get("id") or "-"),
            size(row.get("size")),
            status(row.get("status")),
            Text(row.get("error") or "", style="red"),
        )
    return table


def images(records: Sequence[Mapping[str, Any]]) -> Table:
    """`picstream ls`: one row per image, newest first."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("id", "created", "status", "format", "size", "pixels", "filename"):
        table.add_column(name, overflow="fold", no_wrap=name in _NO_WRAP)
    for rec in records:
        table.add_row(
            Text(rec["id"]),
            Text(str(rec.get("created_at", ""))[:19].replace("T", " ")),
            status(rec.get("status")),
            Text(rec.get("format") or "-"),
            size(rec.get("size")),
            dimensions(rec),
            Text(rec.get("filename") or ""),
        )
    return table


def record(rec: Mapping[str, Any]) -> Iterable[Any]:
    """`picstream show`: the record's fields, then its variants."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("id", rec.get("id")),
        ("status", status(rec.get("status"))),
        ("error", rec.get("error")),
        ("filename", rec.get("filename")),
        ("format", rec.get("format")),
        ("size", size(rec.get("size"))),
        ("pixels", dimensions(rec)),
        ("profile", rec.get("profile")),
        ("created", rec.get("created_at")),
        ("blake3", rec.get("blake3")),
        ("alt", rec.get("alt")),
        ("url", rec.get("url")),
    ]
    for name, value in rows:
        if value is not None and value != "":
            fields.add_row(name, value if isinstance(value, Text) else Text(str(value)))
    yield fields
    variants = rec.get("variants") or []
    if not variants:
        yield Text("no variants yet")
        return
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title="variants",
        title_justify="left",
    )
    for name in ("name", "status", "format", "pixels", "size", "error"):
        table.add_column(name, overflow="fold", no_wrap=name in _NO_WRAP)
    for variant in variants:
        table.add_row(
            Text(variant.get("name", "")),
            status(variant.get("status")),
            Text(variant.get("format") or "-"),
            dimensions(variant),
            size(variant.get("size")),
            Text(variant.get("error") or "", style="red"),
        )
    yield table
