"""Every file of the shared corpus through upload AND conversion, checked against its truth.

    .venv/bin/python -m bench.corpus_convert [CORPUS_DIR]   (default ../shared/corpus)

Starts Redis, SeaweedFS, gunicorn and two `python -m worker` processes on loopback, uploads
every file, waits for each accepted image to leave `processing`, then checks each ready
image's variants: the record's size matches the object, the aspect ratio matches the
truth's display size, and the picture is upright (compared with Pillow's own upright
rendering: closer to it than to its 180-degree turn and its mirror image).

A development check, not a test (users who clone the repo don't have the corpus). Target:
nothing stuck in `processing`; every decodable file `ready` with the right aspect, upright;
corrupt ones `failed` with a reason; formats we do not convert refused at upload (415).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import pillow_heif
import pyvips
from PIL import Image, ImageChops, ImageOps, ImageStat

from bench.stack import running
from core.storage import Store
from tests.http import Api
from tests.keys import variant_key

KEY = "corpus-key-0123456789abcdef"
WAIT = 180.0  # seconds an image may stay in processing before it counts as stuck

pillow_heif.register_heif_opener()


def aspect_ok(width: int, height: int, truth_w: int, truth_h: int) -> bool:
    """Same shape up to rounding each side to whole pixels."""
    return abs(width * truth_h - height * truth_w) <= max(truth_w, truth_h)


def upright_reference(original: bytes, size: tuple[int, int]) -> Image.Image | None:
    """Pillow's upright rendering of the original at `size`, or None if Pillow can't."""
    try:
        with Image.open(io.BytesIO(original)) as opened:
            # Pillow warns about palette + tRNS unless it goes through RGBA.
            im = opened.convert("RGBA") if opened.mode == "P" else opened
            return ImageOps.exif_transpose(im).convert("RGB").resize(size, Image.Resampling.BOX)
    except Exception:  # noqa: BLE001 - any Pillow failure just means "no reference"
        return None


def diff(a: Image.Image, b: Image.Image) -> float:
    return float(sum(ImageStat.Stat(ImageChops.difference(a, b)).mean))


def upright(original: bytes, variant: bytes) -> str:
    """'yes', 'NO' or 'n/a' (no reference, or a picture that looks the same turned)."""
    with Image.open(io.BytesIO(variant)) as im:
        got = im.convert("RGB")
    ref = upright_reference(original, got.size)
    if ref is None:
        return "n/a"
    same = diff(got, ref)
    turned = min(
        diff(got, ref.rotate(180)), diff(got, ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    )
    if turned - same < 2:  # symmetric enough that orientation cannot be told
        return "n/a"
    return "yes" if same < turned else "NO"


def check_ready(
    store: Store, record: dict[str, Any], truth: dict[str, Any], original: bytes
) -> tuple[bool, str]:
    """(all good, what was found)."""
    problems: list[str] = []
    verdicts: set[str] = set()
    for variant in record["variants"]:
        data = store.read_bytes(variant_key(record, variant["name"]))
        image = pyvips.Image.new_from_buffer(data, "")
        if (image.width, _page_height(image)) != (variant["width"], variant["height"]):
            problems.append(f"{variant['name']} size differs from its record")
        if truth["display_width"] and not aspect_ok(
            variant["width"], variant["height"], truth["display_width"], truth["display_height"]
        ):
            problems.append(f"{variant['name']} aspect {variant['width']}x{variant['height']}")
        if variant["name"].endswith(".jpg"):
            verdicts.add(upright(original, data))
    if "NO" in verdicts:
        problems.append("NOT UPRIGHT")
    up = "NO" if "NO" in verdicts else ("yes" if "yes" in verdicts else "n/a")
    return not problems, "; ".join(problems) or f"aspect ok, upright {up}"


def _page_height(image: pyvips.Image) -> int:
    page = image.get("page-height") if image.get_typeof("page-height") else 0
    return int(page) if page and image.height % page == 0 else int(image.height)


def wait(api: Api, image_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        record: dict[str, Any] = api.request("GET", f"/v1/images/{image_id}").json
        if record["status"] != "processing" or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def run(corpus: Path, api: Api, store: Store) -> dict[str, int]:
    truth = json.loads((corpus / "truth.json").read_text())
    uploaded: list[tuple[dict[str, Any], bytes, dict[str, Any]]] = []
    counts = {"files": len(truth), "refused": 0, "ready": 0, "failed": 0, "stuck": 0, "bad": 0}
    for item in truth:  # upload everything first: the workers convert while we upload
        original = (corpus / item["path"]).read_bytes()
        resp = api.upload(original)
        if resp.status != 201:
            counts["refused"] += 1
            kind = resp.json.get("type", "").rsplit(":", 1)[-1]
            print(f"{item['path']:46} {resp.status} {kind}: {resp.json.get('detail', '')[:70]}")
            continue
        uploaded.append((item, original, resp.json))
    for item, original, record in uploaded:
        done = wait(api, record["id"])
        status = done["status"]
        if status == "processing":
            counts["stuck"] += 1
            line = "STUCK in processing"
        elif status == "failed":
            counts["failed"] += 1
            line = f"failed: {done['error'][:90]}"
        else:
            counts["ready"] += 1
            good, found = check_ready(store, done, item, original)
            counts["bad"] += not good
            line = f"ready, {len(done['variants'])} variants, {found}"
        print(f"{item['path']:46} {item['category']!s:24} {line}")
    return counts


def main() -> int:
    corpus = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[2] / "shared/corpus")
    with running("corpus", KEY, workers=2) as stack:
        counts = run(corpus, stack.api, stack.store)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["stuck"] or counts["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
