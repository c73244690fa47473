"""Check core.sniff against the real-world corpus and its ground truth (a dev script).

    .venv/bin/python bench/sniff_corpus.py [CORPUS_DIR]   # default: ../shared/corpus

For every file in truth.json it runs the sniffer three ways:
  * on the whole file with final=True: the answer that is compared with the truth;
  * streaming: start from 1 byte and follow NeedMore.at_least; it must reach the same
    answer, and "bytes" is the head length it needed (compare with the truth's
    display_offset: the bytes a streaming parser needs for dimensions + orientation);
  * for files under 4 KiB, on every prefix, one byte at a time, with final=False and
    final=True: never anything but Sniffed/NeedMore/NotAnImage/CorruptImage, never
    NeedMore on a final head, the same answer on every longer prefix once decided and,
    for images, no NeedMore asking past the first prefix that decides.
Exit status 1 when any file mismatches.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from core.errors import CorruptImage, NotAnImage  # noqa: E402
from core.sniff import SUPPORTED, NeedMore, Sniffed, sniff  # noqa: E402

STEP_LIMIT = 4096
# Pillow's format names -> ours.
PILLOW_FORMATS = {
    "JPEG": "jpeg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "AVIF": "avif",
    "HEIF": "heic",
    "TIFF": "tiff",
    "BMP": "bmp",
    "JPEG2000": "jp2",
    "PPM": "pnm",
}
# Files Pillow cannot identify, but which are images all the same.
EXTRA_FORMATS = {"imagesize_py/test.svg": "svg"}

Answer = Sniffed | str  # a Sniffed, or the name of the domain error raised


@dataclass
class Row:
    path: str
    truth: str
    ours: str
    needed: str
    offset: str
    calls: int
    status: str
    notes: list[str]


def run(head: bytes, final: bool) -> Sniffed | NeedMore | str:
    try:
        return sniff(head, final)
    except (NotAnImage, CorruptImage) as error:
        return type(error).__name__


def stream(data: bytes) -> tuple[Answer, int, int, list[str]]:
    """Follow NeedMore from a 1-byte head: (answer, head length used, sniff calls, notes)."""
    notes: list[str] = []
    n, calls = 1, 0
    while True:
        final = n >= len(data)
        found = run(data[:n], final)
        calls += 1
        if not isinstance(found, NeedMore):
            return found, n, calls, notes
        if final:
            notes.append("NeedMore on a final head")
            return "NeedMore", n, calls, notes
        if found.at_least <= n:
            notes.append(f"NeedMore({found.at_least}) at {n} does not grow")
            return "NeedMore", n, calls, notes
        n = min(found.at_least, len(data))


def step(data: bytes, answer: Answer, decided_at: int | None) -> list[str]:
    """Every prefix, one byte at a time (small files only). ``decided_at`` is where
    following at_least decided, or None for a rejected file: a bad signature may be
    rejected a few bytes before the end of the signature NeedMore asked for."""
    notes: list[str] = []
    first: int | None = None
    for n in range(1, len(data) + 1):
        head = data[:n]
        found = run(head, False)
        if isinstance(found, NeedMore):
            if first is not None:
                notes.append(f"NeedMore at {n} after deciding at {first}")
                break
            if found.at_least <= n:
                notes.append(f"NeedMore({found.at_least}) at {n} does not grow")
                break
        elif first is None:
            first = n
            if found != answer and n < len(data):
                notes.append(f"at {n} decided {describe(found)} != {describe(answer)}")
        elif found != answer and n < len(data):
            notes.append(f"at {n}: {describe(found)} != {describe(answer)}")
            break
        if isinstance(run(head, True), NeedMore):
            notes.append(f"NeedMore on final head of {n}")
            break
    if decided_at is None:
        return notes
    if first is not None and first != decided_at:
        notes.append(f"byte steps decide at {first}, following at_least at {decided_at}")
    overshoot = overshoots(data, first)
    if overshoot:
        notes.append(overshoot)
    return notes


def overshoots(data: bytes, first: int | None) -> str:
    """A NeedMore before the deciding prefix must not ask past it."""
    if first is None:
        return ""
    for n in range(1, first):
        found = run(data[:n], False)
        if isinstance(found, NeedMore) and found.at_least > first:
            return f"NeedMore({found.at_least}) at {n} asks past {first}"
    return ""


def describe(answer: Answer | NeedMore) -> str:
    if isinstance(answer, Sniffed):
        size = f"{answer.width}x{answer.height}" if answer.width is not None else "?x?"
        return f"{answer.format} {size} o{answer.orientation}"
    if isinstance(answer, NeedMore):
        return f"NeedMore({answer.at_least})"
    return answer


def expected(record: dict[str, object]) -> tuple[str | None, int | None, int | None, int]:
    """(format or None for "must raise", display width, display height, orientation)."""
    path = str(record["path"])
    fmt = PILLOW_FORMATS.get(str(record["format"])) if record["format"] else None
    fmt = EXTRA_FORMATS.get(path, fmt)
    width, height = record["display_width"], record["display_height"]
    orientation = record["orientation"]
    return (
        fmt,
        width if isinstance(width, int) else None,
        height if isinstance(height, int) else None,
        orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1,
    )


def judge(record: dict[str, object], answer: Answer) -> tuple[str, str]:
    """(truth description, OK/MISMATCH)."""
    fmt, width, height, orientation = expected(record)
    if fmt is None:
        return "error", "OK" if isinstance(answer, str) else "MISMATCH"
    truth = f"{fmt} {width}x{height} o{orientation}"
    if not isinstance(answer, Sniffed) or answer.format != fmt:
        return truth, "MISMATCH"
    if answer.width is None and fmt not in SUPPORTED:
        size_ok = True  # best effort for recognised-only formats
    else:
        size_ok = (answer.width, answer.height) == (width, height)
    same = size_ok and answer.orientation == orientation
    return truth, "OK" if same else "MISMATCH"


def check(corpus: Path, record: dict[str, object]) -> Row:
    path = str(record["path"])
    data = (corpus / path).read_bytes()
    whole = run(data, True)
    answer: Answer = "NeedMore" if isinstance(whole, NeedMore) else whole
    streamed, needed, calls, notes = stream(data)
    if streamed != answer:
        notes.append(f"streaming gave {describe(streamed)}")
    if len(data) < STEP_LIMIT:
        notes += step(data, answer, needed if isinstance(answer, Sniffed) else None)
    truth, status = judge(record, answer)
    if notes:
        status = "MISMATCH"
    offset = record.get("display_offset")
    return Row(path, truth, describe(answer), str(needed), str(offset), calls, status, notes)


def main() -> int:
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "corpus"
    records = json.loads((corpus / "truth.json").read_text())
    started = time.perf_counter()
    rows = [check(corpus, record) for record in records]
    elapsed = time.perf_counter() - started
    header = ("path", "truth", "ours", "bytes", "truth_off", "calls", "status")
    widths = (44, 24, 24, 7, 9, 5, 8)
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        cells = (row.path, row.truth, row.ours, row.needed, row.offset, str(row.calls), row.status)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        for note in row.notes:
            print(f"    ! {note}")
    bad = sum(row.status != "OK" for row in rows)
    print(f"\n{len(rows)} files: {len(rows) - bad} OK, {bad} MISMATCH ({elapsed:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
