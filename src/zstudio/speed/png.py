"""A parallel PNG encoder: the saved picture costs the call a few tens of milliseconds, not a fifth of a second.

Pillow filters and deflates a picture's rows one after another on one core. Here the rows are split into bands and
each band is filtered (numpy) and deflated (zlib) in its own thread; both release the GIL. Every band but the last
ends with `Z_FULL_FLUSH` (a byte-aligned, non-final block), so the raw deflate streams concatenate into one valid
zlib stream, as pigz does; the Adler-32 checksums of the bands are combined into the stream's own. The file is
an ordinary PNG: signature, IHDR, the same iTXt chunks Pillow writes, one IDAT, IEND.

Each row gets the filter Pillow's encoder picks (the smallest sum of |byte| among None, Up, Sub and Paeth, ties to
the first), so the filtered bytes are Pillow's and the file's size is Pillow's at the same level, give or take the
band boundaries. Measured in docs/perf-notes.md (session 8).

`ENCODERS` names the choices (setting `ZSTUDIO_PNG_ENCODER`): `parallel` (this module) or `pillow` (Pillow's
`Image.save`), which also takes every picture this encoder does not handle (modes other than L, RGB and RGBA, or
pictures carrying an ICC profile or transparency).
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

ENCODERS = ("parallel", "pillow")
DEFAULT_ENCODER = "parallel"
MAX_THREADS = 8  # deflate at level 1 runs ~100+ MB/s per core; 8 bands of a 1024x1024 picture are ~400 KB each
MIN_BAND_BYTES = 64 * 1024  # below this a band's thread costs more than its deflate saves
COLOUR_TYPES = {"L": (0, 1), "RGB": (2, 3), "RGBA": (6, 4)}  # mode -> (PNG colour type, bytes per pixel)
SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADLER_BASE = 65521

_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def host_threads() -> int:
    """The cores this process may use (its CPU affinity where the OS has one), at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


def supports(image: Image.Image) -> bool:
    """Whether this encoder writes `image` exactly as Pillow would; the rest goes to Pillow's encoder."""
    return image.mode in COLOUR_TYPES and not ({"icc_profile", "transparency"} & set(image.info))


def encode_png(image: Image.Image, texts: list[tuple[str, str]], level: int = 1, threads: int | None = None,
               bands: int | None = None) -> bytes:  # fmt: skip
    """The PNG of `image` (L, RGB or RGBA) with `texts` as uncompressed iTXt chunks, in Pillow's order.

    `threads` defaults to the host's cores (capped); `bands` to one per thread, fewer for small pictures."""
    if not supports(image):
        raise ValueError(f"image mode {image.mode!r}: the parallel PNG encoder takes {', '.join(COLOUR_TYPES)}")
    colour_type, bpp = COLOUR_TYPES[image.mode]
    width, height = image.size
    pixels = np.asarray(image).reshape(height, width * bpp)
    threads = threads or host_threads()
    if bands is None:
        bands = max(1, min(threads, (height * (width * bpp + 1)) // MIN_BAND_BYTES))
    bands = max(1, min(bands, height))
    edges = [height * i // bands for i in range(bands + 1)]

    def band(i: int) -> tuple[bytes, int, int]:
        filtered = filter_rows(pixels, edges[i], edges[i + 1], bpp)
        deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
        last = i == bands - 1
        data = deflate.compress(filtered) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)
        return data, zlib.adler32(filtered), len(filtered)

    parts = list(_executor(threads).map(band, range(bands))) if bands > 1 else [band(0)]
    checksum = parts[0][1]
    for _, adler, length in parts[1:]:
        checksum = adler32_combine(checksum, adler, length)
    header = bytes([0x78, _zlib_flags(level)])
    idat = b"".join([header, *(data for data, _, _ in parts), struct.pack(">I", checksum)])
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", ihdr), *(_chunk(b"iTXt", itxt(k, v)) for k, v in texts), _chunk(b"IDAT", idat)]
    return b"".join([SIGNATURE, *chunks, _chunk(b"IEND", b"")])


def filter_rows(pixels: np.ndarray, start: int, stop: int, bpp: int) -> bytes:
    """Rows start..stop-1, each prefixed by its filter type byte, filtered as Pillow's PNG encoder does."""
    x = pixels[start:stop].astype(np.int16)
    above = pixels[start - 1 : stop - 1] if start > 0 else np.vstack([np.zeros_like(pixels[:1]), pixels[: stop - 1]])
    b = above.astype(np.int16)
    a = np.zeros_like(x)  # the byte one pixel to the left (0 before the first pixel)
    a[:, bpp:] = x[:, :-bpp]
    c = np.zeros_like(b)
    c[:, bpp:] = b[:, :-bpp]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    # Candidates in Pillow's order of trial (None, Up, Sub, Paeth): argmin keeps the first of equal sums, as its
    # strict `<` does. The filter type bytes are 0, 2, 1, 4.
    candidates = np.stack([x, x - b, x - a, x - paeth]).astype(np.uint8)
    distance = np.minimum(candidates, 256 - candidates.astype(np.int16)).sum(axis=2, dtype=np.int64)
    choice = distance.argmin(axis=0)
    rows = np.arange(stop - start)
    out = np.empty((stop - start, pixels.shape[1] + 1), np.uint8)
    out[:, 0] = np.array([0, 2, 1, 4], np.uint8)[choice]
    out[:, 1:] = candidates[choice, rows]
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


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _zlib_flags(level: int) -> int:
    """The zlib header's FLG byte: the level hint zlib writes, and the check bits that make CMF*256+FLG % 31 == 0."""
    hint = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    flags = hint << 6
    return flags + (31 - (0x78 * 256 + flags) % 31) % 31


def _executor(threads: int) -> ThreadPoolExecutor:
    """One pool for the process (starting threads per picture would cost more than a band's deflate)."""
    global _pool, _pool_size
    if _pool is None or _pool_size < threads:
        _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstudio-png"), threads
    return _pool
