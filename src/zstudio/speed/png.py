"""A parallel PNG encoder: the saved picture costs the call tens of milliseconds, not a fifth of a second.

Pillow filters and deflates a picture's rows one after another on one core, with zlib. Here the rows are split into
bands; each band is filtered (numpy) and deflated (ISA-L's deflate through `isal`, else the stdlib's zlib) in its own
thread, and both release the GIL. Every band but the last ends with `Z_FULL_FLUSH` (byte-aligned, not final), so the
raw deflate streams concatenate into one valid zlib stream, as pigz does; the bands' Adler-32 sums are combined into
the stream's own. The file is an ordinary PNG: signature, IHDR, the same iTXt chunks Pillow writes, one IDAT, IEND.

`ENCODERS` names the choices (setting `ZSTUDIO_PNG_ENCODER`): `parallel` (this module) or `pillow` (Pillow's
`Image.save` at zlib level 1), which also takes every picture this encoder does not handle (modes other than L, RGB
and RGBA, or pictures carrying an ICC profile or transparency). Measured in docs/perf-notes.md (session 8).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

ENCODERS = ("parallel", "pillow")
DEFAULT_ENCODER = "parallel"
LEVEL = 1  # isal's level 0 wrote 23-56% larger files; higher levels cost more time than they save bytes
MAX_THREADS = 8  # 1024x1024 RGB in bands of ~400 KB; bench.png sweeps 1-16 threads on a host to check
MIN_BAND_BYTES = 64 * 1024  # a small picture is not cut into slivers
COLOUR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}  # mode -> (PNG colour type, bytes per pixel)
SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADLER_BASE = 65521

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


@functools.cache
def deflate_library() -> ModuleType:
    """ISA-L's deflate (`isal.isal_zlib`: 3-22x the stdlib's speed at level 1, 2-4% smaller), else `zlib`."""
    try:
        from isal import isal_zlib
    except ImportError:
        log.info("isal is not installed: PNGs are deflated with the stdlib's zlib (slower; `pip install isal`)")
        return zlib
    return isal_zlib


def host_threads() -> int:
    """The cores this process may use (its CPU affinity where the OS has one), at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


def supports(image: Image.Image) -> bool:
    """Whether this encoder can write `image` with nothing lost; the rest goes to Pillow's encoder."""
    return image.mode in COLOUR_TYPES and not ({"icc_profile", "transparency"} & set(image.info))


def encode_png(image: Image.Image, texts: list[tuple[str, str]], level: int = LEVEL, threads: int | None = None,
               bands: int | None = None, library: ModuleType | None = None) -> bytes:  # fmt: skip
    """The PNG of `image` (L, RGB or RGBA) with `texts` as uncompressed iTXt chunks, as Pillow orders them.

    `threads` defaults to the host's cores (capped); `bands` to one per thread, fewer for small pictures;
    `library` to `deflate_library()`."""
    if not supports(image):
        raise ValueError(f"image mode {image.mode!r}: the parallel PNG encoder takes {', '.join(COLOUR_TYPES)} "
                         "without an ICC profile or transparency")  # fmt: skip
    colour_type, bpp = COLOUR_TYPES[image.mode]
    width, height = image.size
    pixels = np.asarray(image).reshape(height, width * bpp)
    threads = threads or host_threads()
    if bands is None:
        bands = max(1, min(threads, (height * (width * bpp + 1)) // MIN_BAND_BYTES))
    parts = deflate_bands(pixels, bpp, bands, level, threads, library or deflate_library())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [chunk(b"IHDR", ihdr), *(chunk(b"iTXt", itxt(k, v)) for k, v in texts)]
    return b"".join(
        [SIGNATURE, *chunks, chunk(b"IDAT", zlib_stream(parts, level, height * (width * bpp + 1))), chunk(b"IEND", b"")]
    )


def deflate_bands(pixels: np.ndarray, bpp: int, bands: int, level: int, threads: int, library: ModuleType
                  ) -> list[tuple[bytes, int, int]]:  # fmt: skip
    """Each band of rows filtered and deflated in its own thread: (raw deflate data, Adler-32, filtered length).

    Every band but the last ends byte-aligned and not final (`Z_FULL_FLUSH`), the last with `Z_FINISH`."""
    height = pixels.shape[0]
    bands = max(1, min(bands, height))
    edges = [height * i // bands for i in range(bands + 1)]

    def band(i: int) -> tuple[bytes, int, int]:
        filtered = filter_rows(pixels, edges[i], edges[i + 1], bpp)
        deflate = library.compressobj(level, library.DEFLATED, -15)
        end = library.Z_FINISH if i == bands - 1 else library.Z_FULL_FLUSH
        return deflate.compress(filtered) + deflate.flush(end), zlib.adler32(filtered), len(filtered)

    return list(_executor(threads).map(band, range(bands))) if bands > 1 else [band(0)]


def zlib_stream(parts: list[tuple[bytes, int, int]], level: int, length: int) -> bytes:
    """The bands' deflate data as one zlib stream: header, the data in order, the combined Adler-32.

    `length` is the filtered picture's size: a band missing from `parts` would make a valid stream of a shorter
    picture, which Pillow loads without a word, so it is refused here."""
    if sum(n for _, _, n in parts) != length:
        raise ValueError(f"the bands hold {sum(n for _, _, n in parts)} filtered bytes, the picture {length}")
    checksum = parts[0][1]
    for _, adler, length in parts[1:]:
        checksum = adler32_combine(checksum, adler, length)
    return b"".join([bytes([0x78, _zlib_flags(level)]), *(data for data, _, _ in parts), struct.pack(">I", checksum)])


def filter_rows(pixels: np.ndarray, start: int, stop: int, bpp: int) -> bytes:
    """Rows start..stop-1 under PNG's Average filter (type 3), each prefixed by its filter type byte.

    Average for every row, not Pillow's per-row choice: measured on noise-like and photo-like pictures it deflates
    smaller than Pillow's choice at level 1, in a tenth of the time numpy takes to make that choice."""
    x = pixels[start:stop]
    above = pixels[start - 1 : stop - 1] if start > 0 else np.vstack([np.zeros_like(pixels[:1]), pixels[: stop - 1]])
    left = np.zeros_like(x)  # the byte one pixel to the left, 0 before the first pixel
    left[:, bpp:] = x[:, :-bpp]
    out = np.empty((stop - start, pixels.shape[1] + 1), np.uint8)
    out[:, 0] = 3
    # floor((left + above) / 2) without leaving uint8, then the difference modulo 256 (uint8 arithmetic wraps)
    np.subtract(x, (left & above) + ((left ^ above) >> 1), out=out[:, 1:])
    return out.tobytes()


def adler32_combine(adler1: int, adler2: int, length2: int) -> int:
    """The Adler-32 of A+B from those of A and B and B's length (zlib's adler32_combine, which Python lacks)."""
    rem = length2 % ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = rem * sum1 % ADLER_BASE
    sum1 = (sum1 + (adler2 & 0xFFFF) + ADLER_BASE - 1) % ADLER_BASE
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + ADLER_BASE - rem) % ADLER_BASE
    return (sum2 << 16) | sum1


def itxt(key: str, value: str) -> bytes:
    """An uncompressed iTXt chunk's data, byte for byte what Pillow's `PngInfo.add_itxt(key, value)` stores."""
    return key.encode("latin-1") + b"\0\0\0" + b"\0" + b"\0" + value.encode("utf-8")


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _zlib_flags(level: int) -> int:
    """The zlib header's FLG byte: the level hint zlib writes, and the check bits that make CMF*256+FLG % 31 == 0."""
    hint = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    flags = hint << 6
    return flags + (31 - (0x78 * 256 + flags) % 31) % 31


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool for the process (starting threads per picture would cost more than a band's deflate)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # tasks already queued still run
            _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstudio-png"), threads
        return _pool
