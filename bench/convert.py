"""Conversion speed and memory: picstream's pipeline vs sharp vs plain Pillow, same variants.

    .venv/bin/python -m bench.convert [--runs N] [--rounds N] [--no-50mp]

Inputs are made here (nothing is downloaded): a 12 MP camera-like JPEG (4000x3000, q92,
~5 MB), a 4 MP PNG with alpha (2400x1666 RGBA) and, for the memory check, a 50 MP JPEG
(8660x5774). Every engine makes the default profile's variants of each (formats, widths,
quality and effort taken from core/profiles.py, so all three do the same work):

- picstream: worker/convert.py, what a job runs (decode once, libvips encoders, two
  encoder threads as PICSTREAM_CONVERT_THREADS defaults to);
- sharp: bench/sharp/convert.js, one variant after the other ("seq") and all at once
  ("par", how sharp services usually run); skipped when node or bench/sharp/node_modules
  is missing (`cd bench/sharp && npm install`);
- Pillow: the obvious Pillow code (draft, exif_transpose, ImageCms, LANCZOS, save).

Times: engines take turns (--rounds), each turn a fresh process that converts once to warm
up, then --runs times; the median over all runs is reported. Peak RSS (ru_maxrss,
interpreter included) comes from a fresh process converting once, as a job's work-horse
does. A job's S3 and Redis round trips are not included. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARP_DIR = ROOT / "bench" / "sharp"
RSS_TARGET_MB = 300


# ---------------------------------------------------------------- inputs


def camera_like(width: int, height: int, seed: int = 1) -> Any:
    """Perlin noise at five scales plus sensor noise: compresses like a photo (a real
    12 MP camera JPEG at q92 is 4-6 MB; this one ~5 MB) and costs encoders as much."""
    import pyvips

    bands = []
    scales = ((width // 4, 0.35), (width // 16, 0.25), (width // 64, 0.2), (12, 0.2), (4, 0.15))
    for band in range(3):
        layers = [
            pyvips.Image.perlin(
                width, height, cell_size=max(cell, 2), seed=seed * 100 + band * 10 + i
            )
            * weight
            for i, (cell, weight) in enumerate(scales)
        ]
        bands.append(sum(layers[1:], layers[0]))
    image = bands[0].bandjoin(bands[1:]) * 200 + 128
    image = image + pyvips.Image.gaussnoise(width, height, sigma=7)
    return image.cast("uchar").copy(interpretation="srgb")


def input_paths(folder: Path, with_50mp: bool) -> dict[str, Path]:
    paths = {"12 MP JPEG": folder / "camera-12mp.jpg", "4 MP PNG+alpha": folder / "alpha-4mp.png"}
    if with_50mp:
        paths["50 MP JPEG"] = folder / "camera-50mp.jpg"
    return paths


def make_inputs(folder: Path, with_50mp: bool) -> None:
    import pyvips

    inputs = input_paths(folder, with_50mp)
    camera_like(4000, 3000).jpegsave(str(inputs["12 MP JPEG"]), Q=92)
    photo = camera_like(2400, 1666, seed=2)
    # A soft-edged ellipse cut-out: the usual "product shot on transparency".
    x, y = pyvips.Image.xyz(2400, 1666).bandsplit()
    inside = ((x - 1200) / 1100) ** 2 + ((y - 833) / 760) ** 2
    alpha = ((1.15 - inside) * 255 / 0.15).cast("uchar")
    photo.bandjoin(alpha).copy(interpretation="srgb").pngsave(
        str(inputs["4 MP PNG+alpha"]), compression=3
    )
    if with_50mp:
        camera_like(8660, 5774, seed=3).jpegsave(str(inputs["50 MP JPEG"]), Q=90)


def plan_json() -> dict[str, Any]:
    from core.profiles import default_profiles

    profile = default_profiles().require(None)
    specs = [
        {
            "name": s.name,
            "format": s.format,
            "width": s.size.width,
            "quality": s.quality,
            "effort": s.effort,
        }
        for s in profile.plan(None, None, alpha=True)
    ]
    return {"specs": specs, "background": "#{:02x}{:02x}{:02x}".format(*profile.background)}


# ---------------------------------------------------------------- engines (child processes)


def run_picstream(path: str) -> int:
    from core.profiles import default_profiles
    from worker.convert import DecodeLimits, Rendered, open_image

    fmt = "png" if path.endswith(".png") else "jpeg"
    profile = default_profiles().require(None)
    settings_threads = 2  # PICSTREAM_CONVERT_THREADS default
    limits = DecodeLimits(max_pixels=100_000_000, max_frames=100)
    conversion = open_image(path, fmt, profile, limits)
    made = list(conversion.render_all(settings_threads))
    return sum(len(r.data) for r in made if isinstance(r, Rendered))


def run_pillow(path: str, plan: dict[str, Any]) -> int:
    from PIL import Image, ImageCms, ImageOps

    Image.MAX_IMAGE_PIXELS = 100_000_000
    with Image.open(path) as opened:
        largest = max(s["width"] for s in plan["specs"])
        opened.draft("RGB", (largest, largest))  # JPEG DCT scaling: Pillow's shrink-on-load
        image = ImageOps.exif_transpose(opened)
    icc = image.info.get("icc_profile")
    if icc:
        srgb = ImageCms.createProfile("sRGB")
        image = ImageCms.profileToProfile(image, io.BytesIO(icc), srgb, outputMode=image.mode)
    total = 0
    for spec in plan["specs"]:
        width = min(spec["width"], image.width)
        height = max(1, round(image.height * width / image.width))
        variant = image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if spec["format"] == "avif":  # libavif speed = aom cpu-used = 9 - libvips effort
            variant.save(buf, "AVIF", quality=spec["quality"], speed=9 - spec["effort"])
        elif spec["format"] == "webp":
            variant.save(buf, "WEBP", quality=spec["quality"], method=spec["effort"])
        else:
            if variant.mode == "RGBA":
                flat = Image.new("RGB", variant.size, plan["background"])
                flat.paste(variant, mask=variant.getchannel("A"))
                variant = flat
            variant.save(buf, "JPEG", quality=spec["quality"], optimize=True, progressive=True)
        total += buf.tell()
    return total


def child(engine: str, path: str, runs: int) -> None:
    plan = plan_json()
    convert = (
        (lambda: run_picstream(path)) if engine == "picstream" else (lambda: run_pillow(path, plan))
    )
    size = convert()  # warm-up (imports, first-call setup); with runs=0 the only one
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        size = convert()
        times.append((time.perf_counter() - start) * 1000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "bytes": size, "maxrss_kib": rss}))


# ---------------------------------------------------------------- driver


def measure(engine: str, path: Path, runs: int) -> dict[str, Any] | None:
    if engine.startswith("sharp"):
        mode = "parallel" if engine.endswith("par") else "sequential"
        argv = [
            "node",
            str(SHARP_DIR / "convert.js"),
            str(path),
            str(runs),
            mode,
            json.dumps(plan_json()),
        ]
    else:
        argv = [
            sys.executable,
            "-m",
            "bench.convert",
            "--child",
            engine,
            str(path),
            "--runs",
            str(runs),
        ]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        print(f"  {engine} failed: {done.stderr.strip()[-500:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def sharp_available() -> bool:
    return shutil.which("node") is not None and (SHARP_DIR / "node_modules" / "sharp").is_dir()


def report(engine: str, timed: dict[str, Any], fresh: dict[str, Any] | None) -> float:
    median = statistics.median(timed["times"])
    rss = f"{fresh['maxrss_kib'] / 1024:5.0f} MB" if fresh else "    ?"
    print(
        f"  {engine:10} {median:7.0f} ms/image {1000 / median:6.2f} images/s/process"
        f"   peak RSS {rss}   output {timed['bytes'] / 1024:5.0f} KiB",
        flush=True,
    )
    return median


def bench_input(label: str, path: Path, engines: list[str], runs: int, rounds: int) -> None:
    """Engines take turns, `rounds` times, so a burst of load elsewhere on a shared machine
    hits all of them alike; the median is over every run of every round."""
    print(f"{label} ({path.stat().st_size / 1e6:.1f} MB):", flush=True)
    timed: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for engine in engines:
            result = measure(engine, path, runs)
            if result is not None:
                timed.setdefault(engine, {**result, "times": []})["times"] += result["times"]
    medians: dict[str, float] = {}
    for engine, result in timed.items():
        # Peak RSS of ONE conversion in a fresh process, like a job's work-horse: a long
        # run in one process also measures the allocator's fragmentation.
        fresh = measure(engine, path, 0)
        medians[engine] = report(engine, result, fresh)
        if label.startswith("50") and engine == "picstream" and fresh:
            rss = fresh["maxrss_kib"] / 1024
            verdict = "OK" if rss <= RSS_TARGET_MB else "ABOVE TARGET"
            print(f"  -> picstream peak RSS {rss:.0f} MB: {verdict} (target {RSS_TARGET_MB} MB)")
    sharp = [medians[e] for e in ("sharp-seq", "sharp-par") if e in medians]
    if sharp and "picstream" in medians:
        ratio = medians["picstream"] / min(sharp)
        print(f"  -> picstream takes {ratio:.2f}x the time of the faster sharp mode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs per engine per round")
    parser.add_argument("--rounds", type=int, default=3, help="turns each engine takes")
    parser.add_argument("--no-50mp", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--make-inputs", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.runs)
        return
    if args.make_inputs:
        make_inputs(Path(args.make_inputs), with_50mp=not args.no_50mp)
        return

    engines = ["picstream", "pillow"]
    if sharp_available():
        engines[1:1] = ["sharp-seq", "sharp-par"]
    else:
        print("sharp skipped: needs node and `cd bench/sharp && npm install`")
    specs = plan_json()["specs"]
    print(
        f"machine: {os.cpu_count()} cores; median of {args.rounds} rounds x {args.runs} runs,"
        " each engine process warmed up first"
    )
    print("variants: " + ", ".join(f"{s['name']} q{s['quality']} e{s['effort']}" for s in specs))
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        # Made in a child: Linux children inherit the parent's peak RSS (ru_maxrss survives
        # fork and exec), so this process must never hold a big image itself.
        argv = [sys.executable, "-m", "bench.convert", "--make-inputs", tmp]
        subprocess.run(argv + (["--no-50mp"] if args.no_50mp else []), cwd=ROOT, check=True)
        for label, path in input_paths(Path(tmp), with_50mp=not args.no_50mp).items():
            big = label.startswith("50")
            bench_input(label, path, engines, 1 if big else args.runs, args.rounds)


if __name__ == "__main__":
    main()
