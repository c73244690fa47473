"""Upload every file of the shared corpus through a real API and compare with its truth.

    .venv/bin/python -m bench.corpus_upload [CORPUS_DIR]   (default ../shared/corpus)

A development check, not a test (users who clone the repo don't have the corpus). Expected:
each file Pillow decodes in a format we accept -> 201 with the truth's format and display
size (or null size where the head cannot tell); a known format we don't accept -> 415; a bad
header -> a 4xx problem; never a 5xx.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.sniff_corpus import PILLOW_FORMATS
from bench.stack import running
from core.sniff import SUPPORTED

KEY = "corpus-key-0123456789abcdef"


def verdict(truth: dict, status: int, record: dict) -> str:
    fmt = PILLOW_FORMATS.get(truth["format"] or "")
    if status >= 500:
        return "FAIL 5xx"
    if fmt in SUPPORTED and truth["decodes"]:
        if status != 201:
            return f"FAIL expected 201, got {status}"
        if record["format"] != fmt:
            return f"FAIL format {record['format']} != {fmt}"
        dims = (record["width"], record["height"])
        if dims == (None, None):
            return "ok (size left to the worker)"
        if dims != (truth["display_width"], truth["display_height"]):
            return f"FAIL size {dims} != {truth['display_width']}x{truth['display_height']}"
        return "ok"
    if fmt and fmt not in SUPPORTED:
        return "ok" if status == 415 else f"FAIL expected 415, got {status}"
    if status == 201:
        return "ok (accepted; the worker will judge the pixels)"
    return "ok" if 400 <= status < 500 else f"FAIL {status}"


def main() -> int:
    corpus = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[2] / "shared/corpus")
    truth = json.loads((corpus / "truth.json").read_text())
    failures = 0
    with running("corpus", KEY) as stack:
        api = stack.api
        for item in truth:
            resp = api.upload((corpus / item["path"]).read_bytes())
            record = resp.json if resp.status == 201 else {}
            result = verdict(item, resp.status, record)
            failures += result.startswith("FAIL")
            got = (
                f"{record.get('format')} {record.get('width')}x{record.get('height')}"
                f" o{record.get('orientation')}"
                if record
                else resp.json.get("type", "").rsplit(":", 1)[-1]
            )
            print(f"{item['path']:48} {item['format']!s:9} {resp.status} {got:28} {result}")
    print(f"\n{len(truth)} files, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
