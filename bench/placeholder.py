"""What the placeholder (ThumbHash + average colour) costs a conversion, per image.

    .venv/bin/python -m bench.placeholder [--runs N]

For each input, what a job does: `open_image` with the default profile (the one decode),
then `Conversion.placeholder()` from the decoded image in memory, and the variants
(`render_all` with two encoder threads, PICSTREAM_CONVERT_THREADS' default). Printed: the
placeholder's median ms, split into the shrink to <= 100x100 (libvips) and the encoding
(pure Python), next to the median ms of the whole conversion (decode + placeholder +
variants; S3 and Redis round trips not included). CPU times (all threads of this process)
are printed too: on a shared machine they move less than wall-clock times, so the share of
the placeholder is given in CPU time.

Inputs are made here: a 12 MP camera-like JPEG and a 4 MP PNG with alpha (bench/convert.py
makes both), a 20-frame animated GIF (the placeholder shows its first frame) and a 12 MP
HEIC (decoded by Pillow + pillow-heif, as the worker does). Files of ../shared/corpus are
added when that folder exists. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyvips
from PIL import Image

from bench.convert import camera_like, input_paths, make_inputs
from core.profiles import default_profiles
from core.sniff import Sniffed, sniff
from worker.convert import Conversion, DecodeLimits, Rendered, open_image
from worker.placeholder import average_colour, rgba_to_thumbhash, small_rgba

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"
CORPUS_FILES = (
    "exif-orientation-examples/Landscape_6.jpg",
    "imagesize_py/test-rotated.heic",
    "pngsuite/basn6a08.png",
)
LIMITS = DecodeLimits(max_pixels=100_000_000, max_frames=100)
THREADS = 2


def make_gif(path: Path) -> None:
    """20 frames of 800x600 camera-like noise, palette-quantised by libvips' GIF saver."""
    frames = [camera_like(800, 600, seed=10 + i) for i in range(20)]
    strip = pyvips.Image.arrayjoin(frames, across=1)
    strip = strip.copy()
    strip.set_type(pyvips.GValue.gint_type, "page-height", 600)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * 20)
    strip.gifsave(str(path), effort=1)


def make_heic(path: Path) -> None:
    """4032x3024, an iPhone's 12 MP, encoded by pillow-heif (x265)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    data = camera_like(4032, 3024, seed=4).write_to_memory()
    Image.frombytes("RGB", (4032, 3024), data).save(path, "HEIF", quality=85)


def inputs(folder: Path) -> dict[str, Path]:
    make_inputs(folder, with_50mp=False)
    made = input_paths(folder, with_50mp=False)
    made["GIF 20 frames 800x600"] = folder / "animated.gif"
    make_gif(made["GIF 20 frames 800x600"])
    made["12 MP HEIC"] = folder / "iphone-12mp.heic"
    make_heic(made["12 MP HEIC"])
    if CORPUS.is_dir():
        for name in CORPUS_FILES:
            if (CORPUS / name).is_file():
                made[f"corpus {Path(name).name}"] = CORPUS / name
    return made


def fmt_of(path: Path) -> str:
    sniffed = sniff(path.read_bytes(), final=True)
    assert isinstance(sniffed, Sniffed), path
    return sniffed.format


def median_ms(action: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median wall-clock and CPU (this process, every thread) ms of `action`."""
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        action()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def convert_whole(path: Path, fmt: str) -> None:
    conversion = open_image(str(path), fmt, default_profiles().require(None), LIMITS)
    conversion.placeholder()
    made = list(conversion.render_all(THREADS))
    assert all(isinstance(r, Rendered) for r in made), made


def bench(label: str, path: Path, runs: int) -> None:
    fmt = fmt_of(path)
    conversion: Conversion = open_image(str(path), fmt, default_profiles().require(None), LIMITS)
    base = conversion.base
    placeholder = conversion.placeholder()  # warm-up (and the first-call cosine tables)
    width, height, rgba = small_rgba(base)
    total, total_cpu = median_ms(conversion.placeholder, runs * 3)
    shrink, _ = median_ms(lambda: small_rgba(base), runs * 3)
    encode, _ = median_ms(
        lambda: (rgba_to_thumbhash(width, height, rgba), average_colour(rgba)), runs * 3
    )
    convert_whole(path, fmt)  # warm-up
    whole, whole_cpu = median_ms(lambda: convert_whole(path, fmt), runs)
    print(
        f"{label:30} {conversion.width:>4}x{conversion.height:<4} from {base.width:>4}x"
        f"{base.height:<4} -> {width:>3}x{height:<3} {placeholder.color if placeholder else None}"
        f"\n    placeholder {total:5.1f} ms (CPU {total_cpu:5.1f}; shrink {shrink:4.1f} + encode"
        f" {encode:4.1f})   whole conversion {whole:6.0f} ms (CPU {whole_cpu:6.0f})"
        f"   placeholder/whole CPU {100 * total_cpu / whole_cpu:4.1f} %",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="whole conversions per input")
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} cores; default profile; medians "
        f"(placeholder: {args.runs * 3} runs, conversion: {args.runs} runs)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-placeholder-") as tmp:
        for label, path in inputs(Path(tmp)).items():
            bench(label, path, args.runs)


if __name__ == "__main__":
    main()
