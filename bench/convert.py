"""Conversion speed and memory: picstream's pipeline vs sharp vs plain Pillow, same variants.

    .venv/bin/python -m bench.convert [--runs N] [--rounds N] [--no-50mp] [--only CLASS]
        [--no-pillow] [--inputs DIR] [--baseline DIR]
    .venv/bin/python -m bench.convert --corpus [DIR] [--rounds N]   (default ../shared/corpus)

Inputs are made here (nothing is downloaded), one per input class: a 12 MP camera-like JPEG
(4000x3000, q92, ~4.8 MB), a 4 MP PNG with alpha (2400x1666 RGBA), a 50 MP JPEG (8660x5774,
also the memory check), a 12 MP HEIC (4032x3024, x265 through pillow-heif, ~2.4 MB) and an
animated GIF (24 frames of 800x600, a camera pan). Every engine makes the variants the
worker plans for that input with the default profile (formats, widths, quality and effort
from core/profiles.py, so all of them do the same work):

- picstream: worker/convert.py, what a job runs without S3 and Redis (decode once,
  placeholder, libvips encoders, two encoder threads as PICSTREAM_CONVERT_THREADS defaults
  to, BLAKE3 of each variant);
- baseline (with --baseline DIR): the same, with core/ and worker/ imported from DIR, e.g.
  `git archive HEAD core worker | tar -x -C DIR`: before/after in one run, taking turns;
- sharp: bench/sharp/convert.js, one variant after the other ("seq") and all at once
  ("par", how sharp services usually run); skipped when node or bench/sharp/node_modules
  is missing (`cd bench/sharp && npm ci`). Its prebuilt libvips has no HEVC decoder, so for
  the HEIC it starts from the raw RGB pixels pillow-heif decoded ("heic-decode" times that
  decode alone; the verdict gives both ratios). Animated GIF: WebP variants animated,
  the others the first frame, as picstream's;
- Pillow: the obvious Pillow code (draft, exif_transpose, ImageCms, LANCZOS, save); not
  for the GIF (it would make stills).

Times: engines take turns (--rounds), each turn a fresh process that converts once to warm
up, then --runs times; the median over all runs is reported, wall clock and CPU time (all
threads of the process). On a shared machine the CPU time is the steadier number: wall
clock there also measures how much of the cores a process gets, which goes by its number
of runnable threads (sharp's parallel mode keeps four busy, picstream two). The load
average is printed with every input class. Peak RSS (ru_maxrss, interpreter included)
comes from a fresh process converting once, as a job's work-horse does. Targets printed:
picstream <= 0.8x the faster sharp mode, output bytes within +-2 % of sharp's, peak RSS
<= 300 MB. Not a test: nothing is asserted.

--corpus: every file of the corpus the upload accepts, converted as a job does, one after
the other: conversions per hour per core (from CPU time, and from wall clock / cores).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARP_DIR = ROOT / "bench" / "sharp"
RSS_TARGET_MB = 300


# ---------------------------------------------------------------- inputs


def camera_like(width: int, height: int, seed: int = 1) -> Any:
    """A stand-in for a photo: luma with large soft shapes, hard-edged regions and texture
    down to single pixels, colour that drifts slowly, sensor noise on top. Mean ~120, standard
    deviation ~47 (a daylight photo: 100-130 and 45-65); at q92 a 12 MP one is ~4.9 MB, where
    real 12 MP camera JPEGs are 4-6 MB. (Before: mean 246, as the noise added a second 128,
    so most of it clipped to white and encoders had little to do.)"""
    import pyvips

    def field(scales: tuple[tuple[int, float], ...], base: int) -> Any:
        layers = [
            pyvips.Image.perlin(width, height, cell_size=max(cell, 2), seed=base + i) * weight
            for i, (cell, weight) in enumerate(scales)
        ]
        return sum(layers[1:], layers[0])

    shapes = field(((width // 3, 1.0), (width // 8, 0.5)), seed * 1000)
    edges = (shapes > 0.05).ifthenelse(0.35, -0.35)  # objects with sharp outlines
    texture = field(
        ((width // 32, 0.5), (width // 128, 0.35), (24, 0.3), (6, 0.25), (2, 0.12)),
        seed * 1000 + 100,
    )
    luma = (shapes * 0.8 + edges * 0.6 + texture * 0.9) * 200 + 112
    cb = field(((width // 4, 1.0), (width // 20, 0.4)), seed * 1000 + 200) * 60
    cr = field(((width // 4, 1.0), (width // 20, 0.4)), seed * 1000 + 300) * 60
    rgb = (luma + cr * 1.402).bandjoin([luma - cb * 0.344 - cr * 0.714, luma + cb * 1.772])
    grain = pyvips.Image.gaussnoise(width, height, sigma=4, mean=0, seed=seed)  # luma noise
    chroma = [
        pyvips.Image.gaussnoise(width, height, sigma=2, mean=0, seed=seed + b) for b in (1, 2, 3)
    ]
    rgb = rgb + grain + chroma[0].bandjoin(chroma[1:])
    return rgb.cast("uchar").copy(interpretation="srgb")


INPUTS = {
    "12 MP JPEG": "camera-12mp.jpg",
    "4 MP PNG+alpha": "alpha-4mp.png",
    "50 MP JPEG": "camera-50mp.jpg",
    "12 MP HEIC": "iphone-12mp.heic",
    "GIF 24 frames": "animated.gif",
}
FORMATS = {".jpg": "jpeg", ".png": "png", ".heic": "heic", ".gif": "gif"}


def input_paths(folder: Path, with_50mp: bool, classes: list[str] | None = None) -> dict[str, Path]:
    """Paths of the inputs of `classes` (by default the JPEG and PNG ones, which
    bench/placeholder.py also uses)."""
    labels = classes or ["12 MP JPEG", "4 MP PNG+alpha", "50 MP JPEG"]
    return {
        label: folder / INPUTS[label] for label in labels if with_50mp or not label.startswith("50")
    }


def make_inputs(folder: Path, with_50mp: bool, classes: list[str] | None = None) -> None:
    import pyvips

    for label, path in input_paths(folder, with_50mp, classes).items():
        if label == "12 MP JPEG":
            camera_like(4000, 3000).jpegsave(str(path), Q=92)
        elif label == "4 MP PNG+alpha":
            photo = camera_like(2400, 1666, seed=2)
            # A soft-edged ellipse cut-out: the usual "product shot on transparency".
            x, y = pyvips.Image.xyz(2400, 1666).bandsplit()
            inside = ((x - 1200) / 1100) ** 2 + ((y - 833) / 760) ** 2
            alpha = ((1.15 - inside) * 255 / 0.15).cast("uchar")
            photo.bandjoin(alpha).copy(interpretation="srgb").pngsave(str(path), compression=3)
        elif label == "50 MP JPEG":
            camera_like(8660, 5774, seed=3).jpegsave(str(path), Q=90)
        elif label == "12 MP HEIC":
            make_heic(path)
        else:
            make_gif(path)


def make_heic(path: Path) -> None:
    """4032x3024, an iPhone's 12 MP, encoded by pillow-heif (x265) at quality 50: ~2.4 MB,
    as iPhone HEICs of 12 MP are (1.5-3.5 MB). sharp's prebuilt libvips has no HEVC decoder
    ("Support for this compression format has not been built in: HEVC"), so the
    decoded pixels are also written raw (`.rgb`, decoded by pillow-heif as the worker
    decodes them) for sharp to start from."""
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    data = camera_like(4032, 3024, seed=4).write_to_memory()
    Image.frombytes("RGB", (4032, 3024), data).save(path, "HEIF", quality=50)
    with Image.open(path) as decoded:
        raw_path(path).write_bytes(decoded.convert("RGB").tobytes())


def raw_path(path: Path) -> Path:
    return path.with_name(path.name + ".rgb")


def make_gif(path: Path) -> None:
    """24 frames of 800x600, a camera pan across a larger camera-like picture (what a GIF
    made from a clip holds), palette-quantised by libvips' GIF saver; 100 ms a frame."""
    import pyvips

    scene = camera_like(1400, 700, seed=5).copy_memory()
    frames = [scene.crop(i * 25, (i * 4) % 100, 800, 600) for i in range(24)]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", 600)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * len(frames))
    strip.gifsave(str(path), effort=1)


def plan_json(path: str | None = None) -> dict[str, Any]:
    """The variants the worker plans for this input (all of them when `path` is None), for
    the other engines to make the same ones: sharp's `withoutEnlargement` alone would make
    w1024 and w2048 of an 800 px GIF twice at 800 px, where the worker makes one."""
    from core.profiles import default_profiles

    profile = default_profiles().require(None)
    width = height = None
    alpha: bool | None = True
    animated = False
    if path is not None:
        import pyvips
        from PIL import Image

        if path.endswith(".heic"):
            import pillow_heif

            pillow_heif.register_heif_opener()
            with Image.open(path) as im:
                width, height, alpha = im.width, im.height, "A" in im.mode
        else:
            header = pyvips.Image.new_from_file(path)
            pages = header.get("n-pages") if header.get_typeof("n-pages") else 1
            width, height, alpha = header.width, header.height, bool(header.hasalpha())
            animated = pages > 1  # without n=-1 the header is the first frame's
    specs = [
        {
            "name": s.name,
            "format": s.format,
            "width": s.size.width,
            "quality": s.quality,
            "effort": s.effort,
        }
        for s in profile.plan(width, height, alpha=alpha)
    ]
    plan: dict[str, Any] = {
        "specs": specs,
        "background": "#{:02x}{:02x}{:02x}".format(*profile.background),
        "animated": animated and profile.animate,
    }
    if path is not None and path.endswith(".heic"):
        plan["raw"] = {"path": str(raw_path(Path(path))), "width": width, "height": height}
    return plan


# ---------------------------------------------------------------- engines (child processes)


def run_picstream(path: str) -> int:
    """What a job runs, without S3 and Redis: decode, placeholder, every variant, hashes."""
    from blake3 import blake3

    from core.profiles import default_profiles
    from worker.convert import DecodeLimits, Rendered, open_image

    profile = default_profiles().require(None)
    settings_threads = 2  # PICSTREAM_CONVERT_THREADS default
    limits = DecodeLimits(max_pixels=100_000_000, max_frames=100)
    conversion = open_image(path, FORMATS[Path(path).suffix], profile, limits)
    conversion.placeholder()
    made = list(conversion.render_all(settings_threads))
    for r in made:
        if isinstance(r, Rendered):
            blake3(r.data, max_threads=1).digest()
    return sum(len(r.data) for r in made if isinstance(r, Rendered))


def run_pillow(path: str, plan: dict[str, Any]) -> int:
    import pillow_heif
    from PIL import Image, ImageCms, ImageOps

    pillow_heif.register_heif_opener()
    Image.MAX_IMAGE_PIXELS = 100_000_000
    with Image.open(path) as opened:
        largest = max(s["width"] for s in plan["specs"])
        opened.draft("RGB", (largest, largest))  # JPEG DCT scaling: Pillow's shrink-on-load
        image = ImageOps.exif_transpose(opened) or opened
    icc = image.info.get("icc_profile")
    if icc:
        srgb = ImageCms.createProfile("sRGB")
        image = (
            ImageCms.profileToProfile(image, io.BytesIO(icc), srgb, outputMode=image.mode) or image
        )
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


def run_heic_decode(path: str) -> int:
    """Only the HEIC decode to RGB pixels (pillow-heif), the part sharp cannot do."""
    import pillow_heif
    from PIL import Image

    pillow_heif.register_heif_opener()
    with Image.open(path) as opened:
        return len(opened.convert("RGB").tobytes())


def child(engine: str, path: str, runs: int) -> None:
    plan = plan_json(path)
    actions: dict[str, Callable[[], int]] = {
        "picstream": lambda: run_picstream(path),
        "pillow": lambda: run_pillow(path, plan),
        "heic-decode": lambda: run_heic_decode(path),
    }
    convert = actions[engine]
    size = convert()  # warm-up (imports, first-call setup); with runs=0 the only one
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        size = convert()
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "cpu": cpu, "bytes": size, "maxrss_kib": rss}))


# ---------------------------------------------------------------- driver


BASELINE: list[Path] = []  # --baseline DIR


def measure(engine: str, path: Path, runs: int) -> dict[str, Any] | None:
    child_args = ["--child", engine, str(path), "--runs", str(runs)]
    if engine == "baseline":
        # picstream's pipeline with `core` and `worker` imported from another tree.
        paths = [str(BASELINE[0]), str(ROOT)]
        code = f"import sys; sys.path[:0] = {paths!r}; from bench.convert import main; main()"
        child_args[1] = "picstream"
        argv = [sys.executable, "-c", code, *child_args]
    elif engine.startswith("sharp"):
        mode = "parallel" if engine.endswith("par") else "sequential"
        argv = [
            "node",
            str(SHARP_DIR / "convert.js"),
            str(path),
            str(runs),
            mode,
            json.dumps(plan_json(str(path))),
        ]
    else:
        argv = [sys.executable, "-m", "bench.convert", *child_args]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        print(f"  {engine} failed: {done.stderr.strip()[-500:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def sharp_available() -> bool:
    return shutil.which("node") is not None and (SHARP_DIR / "node_modules" / "sharp").is_dir()


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(engine: str, timed: dict[str, Any], fresh: dict[str, Any] | None) -> dict[str, float]:
    wall, cpu = statistics.median(timed["times"]), statistics.median(timed["cpu"])
    rss = fresh["maxrss_kib"] / 1024 if fresh else float("nan")
    print(
        f"  {engine:11} {wall:7.0f} ms/image (CPU {cpu:6.0f} ms)  {1000 / wall:5.2f} images/s"
        f"   peak RSS {rss:4.0f} MB   output {timed['bytes'] / 1024:6.0f} KiB",
        flush=True,
    )
    return {"wall": wall, "cpu": cpu, "rss": rss, "bytes": timed["bytes"]}


def engines_for(label: str, sharp: bool) -> list[str]:
    engines = ["picstream"] + (["baseline"] if BASELINE else [])
    if sharp:
        engines += ["sharp-seq", "sharp-par"]
    if "GIF" not in label:  # Pillow's obvious code has no animation: not the same work
        engines.append("pillow")
    if "HEIC" in label:
        engines.append("heic-decode")
    return engines


def bench_input(label: str, path: Path, engines: list[str], runs: int, rounds: int) -> None:
    """Engines take turns, `rounds` times, so a burst of load elsewhere on a shared machine
    hits all of them alike; the median is over every run of every round."""
    print(f"{label} ({path.stat().st_size / 1e6:.1f} MB), {load()}:", flush=True)
    timed: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for engine in engines:
            result = measure(engine, path, runs)
            if result is not None:
                entry = timed.setdefault(engine, {**result, "times": [], "cpu": []})
                entry["times"] += result["times"]
                entry["cpu"] += result.get("cpu") or result["times"]
    got: dict[str, dict[str, float]] = {}
    for engine, result in timed.items():
        # Peak RSS of ONE conversion in a fresh process, like a job's work-horse: a long
        # run in one process also measures the allocator's fragmentation.
        fresh = measure(engine, path, 0)
        got[engine] = report(engine, result, fresh)
    verdicts(label, got)
    print(f"  ({load()} at the end)", flush=True)


def verdicts(label: str, got: dict[str, dict[str, float]]) -> None:
    ours = got.get("picstream")
    if ours is None:
        return
    rss = ours["rss"]
    print(
        f"  -> picstream peak RSS {rss:.0f} MB: {'OK' if rss <= RSS_TARGET_MB else 'ABOVE'}"
        f" (target <= {RSS_TARGET_MB} MB)"
    )
    modes = [e for e in ("sharp-seq", "sharp-par") if e in got]
    if not modes:
        return
    decode = got.get("heic-decode", {"wall": 0.0, "cpu": 0.0})
    if "HEIC" in label:
        print(
            f"     sharp cannot read HEIC (no HEVC decoder in its libvips): sharp starts from"
            f" the raw pixels pillow-heif decoded; that decode alone takes"
            f" {decode['wall']:.0f} ms (CPU {decode['cpu']:.0f})"
        )
    best = min(modes, key=lambda e: got[e]["wall"])
    sharp = got[best]
    size = 100 * (ours["bytes"] / sharp["bytes"] - 1)
    size_ok = "OK" if abs(size) <= 2 else "OUTSIDE +-2 %"
    print(f"  -> output bytes vs sharp: {size:+.1f} % {size_ok}")
    wall, cpu = ours["wall"] / sharp["wall"], ours["cpu"] / sharp["cpu"]
    verdict = "OK" if wall <= 0.8 else "ABOVE 0.8"
    print(f"  -> picstream / faster sharp mode ({best}): wall {wall:.2f} {verdict}, CPU {cpu:.2f}")
    if "HEIC" in label:
        wall_d = ours["wall"] / (sharp["wall"] + decode["wall"])
        cpu_d = ours["cpu"] / (sharp["cpu"] + decode["cpu"])
        print(f"  -> picstream / (pillow-heif decode + {best}): wall {wall_d:.2f}, CPU {cpu_d:.2f}")


# ---------------------------------------------------------------- corpus throughput


def corpus_throughput(corpus: Path, rounds: int) -> None:
    """Every corpus file the upload accepts, converted as a job does (default profile, two
    encoder threads), one after the other in this process: conversions per hour per core.
    Per core from CPU time (what one core gives when the worker has it to itself) and from
    wall-clock time divided by the cores."""
    from core.errors import PicstreamError
    from core.sniff import Sniffed, sniff
    from worker.convert import DECODABLE, ConversionError

    files: list[tuple[str, str]] = []
    for item in json.loads((corpus / "truth.json").read_text()):
        path = corpus / item["path"]
        try:
            sniffed = sniff(path.read_bytes(), final=True)
        except PicstreamError:  # refused at upload (415/422)
            continue
        if isinstance(sniffed, Sniffed) and sniffed.format in DECODABLE:
            files.append((str(path), sniffed.format))
    ok = failed = 0
    walls: list[float] = []
    cpus: list[float] = []
    for round_ in range(rounds + 1):  # round 0 warms up
        wall = cpu = 0.0
        for path, fmt in files:
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                run_job(path, fmt)
                ok += round_ == 0
            except ConversionError:
                failed += round_ == 0
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
        if round_:
            walls.append(wall)
            cpus.append(cpu)
    cores = os.cpu_count() or 1
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    n = len(files)
    print(
        f"corpus {corpus}: {n} files accepted by the upload ({ok} converted, {failed} failed"
        f" with a reason), median of {rounds} rounds, {load()}"
    )
    print(
        f"  wall {wall:.1f} s, CPU {cpu:.1f} s for all {n}: {wall / n * 1000:.0f} ms,"
        f" CPU {cpu / n * 1000:.0f} ms per conversion"
    )
    print(
        f"  {3600 * n / cpu:.0f} conversions/hour/core by CPU time;"
        f" {3600 * n / wall / cores:.0f} by wall clock / {cores} cores"
    )


def run_job(path: str, fmt: str) -> None:
    from blake3 import blake3

    from core.profiles import default_profiles
    from worker.convert import DecodeLimits, Rendered, open_image

    limits = DecodeLimits(max_pixels=100_000_000, max_frames=100)
    conversion = open_image(path, fmt, default_profiles().require(None), limits)
    conversion.placeholder()
    for r in conversion.render_all(2):
        if isinstance(r, Rendered):
            blake3(r.data, max_threads=1).digest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs per engine per round")
    parser.add_argument("--rounds", type=int, default=3, help="turns each engine takes")
    parser.add_argument("--no-50mp", action="store_true")
    parser.add_argument("--only", action="append", choices=list(INPUTS), help="input classes")
    parser.add_argument("--no-pillow", action="store_true", help="skip the plain Pillow engine")
    parser.add_argument(
        "--corpus",
        nargs="?",
        const=str(ROOT.parent / "shared" / "corpus"),
        help="conversions/hour/core on the shared corpus (default ../shared/corpus)",
    )
    parser.add_argument("--inputs", metavar="DIR", help="make the inputs here once and keep them")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run picstream with core/ and worker/ from DIR (e.g. `git archive` of a commit)",
    )
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--make-inputs", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    classes = args.only or list(INPUTS)
    if args.child:
        child(args.child[0], args.child[1], args.runs)
        return
    if args.make_inputs:
        make_inputs(Path(args.make_inputs), with_50mp=not args.no_50mp, classes=classes)
        return
    if args.corpus:
        corpus_throughput(Path(args.corpus), args.rounds)
        return

    if args.baseline:
        BASELINE.append(Path(args.baseline).resolve())
    sharp = sharp_available()
    if not sharp:
        print("sharp skipped: needs node and `cd bench/sharp && npm ci`")
    specs = plan_json()["specs"]
    print(
        f"machine: {os.cpu_count()} cores, {load()}; median of {args.rounds} rounds x"
        f" {args.runs} runs, each engine process warmed up first"
    )
    print("variants: " + ", ".join(f"{s['name']} q{s['quality']} e{s['effort']}" for s in specs))
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        folder = Path(args.inputs or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        missing = [c for c, p in input_paths(folder, True, classes).items() if not p.exists()]
        # Made in a child: Linux children inherit the parent's peak RSS (ru_maxrss survives
        # fork and exec), so this process must never hold a big image itself.
        argv = [sys.executable, "-m", "bench.convert", "--make-inputs", str(folder)]
        argv += [a for c in missing for a in ("--only", c)]
        if missing:
            subprocess.run(argv + (["--no-50mp"] if args.no_50mp else []), cwd=ROOT, check=True)
        for label, path in input_paths(folder, not args.no_50mp, classes).items():
            big = label.startswith("50")
            engines = [e for e in engines_for(label, sharp) if e != "pillow" or not args.no_pillow]
            bench_input(label, path, engines, 1 if big else args.runs, args.rounds)


if __name__ == "__main__":
    main()
