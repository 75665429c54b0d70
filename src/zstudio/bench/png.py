"""PNG encoding benchmark on the host's CPU: seconds per encode by method and thread count, file sizes, for a
noise-like and a photo-like picture (1024x1024 RGB by default), and the atomic write (`write_file`: fsync + link).

    python -m zstudio.bench.png --json OUT                      # the full run (about a minute on 2 cores)
    python -m zstudio.bench.png --size 64 --repeats 1 --json OUT    # the tests' smoke run

`write_file` is timed in a temporary folder inside `--dir` (default: the outputs folder, ZSTUDIO_OUTPUTS), since
fsync costs what that disk costs; `--image FILE` adds a picture of one's own.

Methods: Pillow's encoder (`Image.save`, its adaptive filter, one core) at zlib levels 0, 1 and 6, and
zstudio.speed.png's parallel encoder at level 1 with 1, 2, 4, ... threads (one band per thread), deflating with
`isal` (where installed) and with the stdlib's zlib. Also, per thread count, the filtering alone; and one core's raw
deflate of the filtered rows at level 1 with zlib, `isal` (ISA-L) and `zlib-ng` (each where installed).
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import platform
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, PngImagePlugin, features

from ..outputs import write_file
from ..settings import load_settings
from ..speed import png
from .run import emit

TEXTS = [("parameters", "a prompt\nNegative prompt: \nSteps: 8, Seed: 1"), ("zstudio", '{"params": {}}' * 40)]
DEFLATE_BACKENDS = {"zlib": "zlib", "isal": "isal.isal_zlib", "zlib-ng": "zlib_ng.zlib_ng"}


def noise_like(size: int, seed: int = 0) -> Image.Image:
    """What random weights draw: noise at the latent's scale (1/8 of the side) upsampled, plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    side = max(1, size // 8)
    low = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(low).astype(np.int16) + rng.normal(0, 12, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_like(size: int, seed: int = 0) -> Image.Image:
    """A natural-image stand-in: smooth gradients, 40 blurred shapes, mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([200 * y + 30, 120 + 80 * np.sin(6 * x), 180 * (1 - x) + 40 * y], -1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(max(1, size // 20), max(2, size // 4), 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    pixels = np.asarray(image).astype(np.int16) + rng.normal(0, 2, (size, size, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls after one warm call, and the last result."""
    out = fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), out


def pillow_png(image: Image.Image, level: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in TEXTS:
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=level)
    return buffer.getvalue()


def thread_counts(limit: int) -> list[int]:
    counts = [1]
    while counts[-1] * 2 <= limit:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == limit else [*counts, limit]


def measure(image: Image.Image, repeats: int, threads: list[int], directory: Path) -> dict[str, Any]:
    pixels = np.asarray(image).reshape(image.height, -1)
    rows: dict[str, Any] = {}
    for level in (0, 1, 6):
        seconds, data = timed(lambda level=level: pillow_png(image, level), repeats)
        rows[f"pillow level {level}"] = {"seconds": round(seconds, 4), "bytes": len(data)}
    libraries = {name: module for name, module in _libraries().items() if name != "zlib-ng" and module}
    for lib_name, lib in libraries.items():
        for n in threads:
            seconds, data = timed(lambda n=n, lib=lib: png.encode_png(image, TEXTS, png.LEVEL, n, n, lib), repeats)
            rows[f"parallel level 1 {lib_name}, {n} threads"] = {"seconds": round(seconds, 4), "bytes": len(data)}
    for n in threads:
        seconds, _ = timed(lambda n=n: _filter_in_threads(pixels, n), repeats)
        rows[f"filter only, {n} threads"] = {"seconds": round(seconds, 4)}
    filtered = png.filter_rows(pixels, 0, image.height, 3)
    for name, module in _libraries().items():
        if module is None:
            rows[f"deflate only level 1, {name}, 1 thread"] = {"installed": False}
            continue
        seconds, data = timed(lambda m=module: _deflate(m, filtered), repeats)
        rows[f"deflate only level 1, {name}, 1 thread"] = {"seconds": round(seconds, 4), "bytes": len(data)}
    blob = png.encode_png(image, TEXTS)
    written: list[Path] = []
    seconds, _ = timed(lambda: written.append(write_file(blob, directory, ".png")), repeats)
    rows["write_file (write + fsync + link)"] = {"seconds": round(seconds, 4), "bytes": len(blob)}
    for path in written:
        path.unlink(missing_ok=True)
    return rows


def _filter_in_threads(pixels: np.ndarray, threads: int) -> list[bytes]:
    """The encoder's filtering step alone, one band per thread on the encoder's own pool."""
    edges = [pixels.shape[0] * i // threads for i in range(threads + 1)]
    band = lambda i: png.filter_rows(pixels, edges[i], edges[i + 1], 3)  # noqa: E731
    return list(png._executor(threads).map(band, range(threads)))


def _deflate(library: ModuleType, data: bytes) -> bytes:
    deflate = library.compressobj(1, library.DEFLATED, -15)
    return deflate.compress(data) + deflate.flush()


def _libraries() -> dict[str, ModuleType | None]:
    """Each deflate library by name: its module, or None where it is not installed."""
    found: dict[str, ModuleType | None] = {}
    for name, module_name in DEFLATE_BACKENDS.items():
        try:
            found[name] = importlib.import_module(module_name)
        except ImportError:
            found[name] = None
    return found


def run(size: int, repeats: int, max_threads: int, directory: Path, images: list[Path]) -> dict[str, Any]:
    threads = thread_counts(max_threads)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".bench-png-") as tmp:
        pictures = {"noise-like": noise_like(size), "photo-like": photo_like(size)}
        for path in images:
            with Image.open(path) as image:
                pictures[path.name] = image.convert("RGB")
        results = {name: measure(image, repeats, threads, Path(tmp)) for name, image in pictures.items()}
    return {
        "benchmark": "png",
        "size": f"{size}x{size} RGB",
        "repeats": repeats,
        "host": {
            "cpu_count": os.cpu_count(),
            "threads_used_by_default": png.host_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "versions": {
            "pillow": PIL.__version__,
            "pillow zlib": features.version("zlib"),
            "python zlib": zlib.ZLIB_RUNTIME_VERSION,
            "encoder's deflate": png.deflate_library().__name__,
        },
        "write_dir": str(directory.resolve()),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.png", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="picture side in pixels (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed encodes per method, median reported")
    parser.add_argument("--max-threads", type=int, default=min(os.cpu_count() or 1, 16),
                        help="largest thread count tried (default: the host's cores, at most 16)")  # fmt: skip
    parser.add_argument("--dir", type=Path, help="where write_file is timed (default: the outputs folder's disk)")
    parser.add_argument("--image", type=Path, action="append", default=[], help="also measure this picture")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    directory = args.dir or load_settings().outputs  # fsync costs what the disk that keeps the pictures costs
    return emit(run(args.size, args.repeats, args.max_threads, directory, args.image), args.json)


if __name__ == "__main__":
    main()
