"""Input pictures for edits and upscales: uploads kept by content, and names resolved only inside two folders.

A client never passes a filesystem path. It uploads a file (multipart, or base64 on the A1111 routes), which is kept
as `<state>/inputs/<sha256>.<ext>` (the bytes as sent, so the recorded SHA-256 is the client's file's, and queued
jobs still find it after a restart), or it names an image: `outputs_....png` from the outputs folder or
`<sha256>.png` from the uploads. Anything else is refused with one line naming the field. Bytes are capped while
they stream in, before a file is decoded; decoding and every other check is `zstudio.edit.validate`'s.

The store is bounded (`collect`): an upload that no history entry and no queued or running job names is deleted
once it is older than `max_age_s` (ZSTUDIO_UPLOAD_TTL, hours), and while the folder is over `max_total_bytes`
(ZSTUDIO_UPLOAD_MAX_MB) the oldest such uploads go first. Age is the time since a file was last stored or named
(both refresh its mtime), and nothing younger than `grace_s` is deleted: an upload between being stored and its job
being recorded is named nowhere yet. It runs when the server starts and after an upload, at most once a `interval_s`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import ImageOps

from ..edit import read_image
from ..params import MAX_INPUT_BYTES, MAX_INPUT_PIXELS, ParamError

IMAGE_NAME = re.compile(r"^outputs_\d{14}(_\d+)?\.(png|jpg|webp)$")  # what the server writes
UPLOAD_NAME = re.compile(r"^[0-9a-f]{64}\.(png|jpg|webp)$")
CHUNK = 1 << 20
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_MAX_TOTAL_BYTES = 2048 * 2**20
GRACE_S = 600.0  # an upload's time to be named by its job (it takes well under a second)
COLLECT_INTERVAL_S = 60.0

log = logging.getLogger(__name__)
# The first bytes of each accepted format (the extension an upload is kept under follows the content, not the name).
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"))


def extension(head: bytes) -> str | None:
    """'.png', '.jpg' or '.webp' from a file's first 12 bytes; None for anything else."""
    for signature, ext in SIGNATURES:
        if head.startswith(signature):
            return ext
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return None


class InputStore:
    """Where input pictures come from: uploads kept under `folder`, or generated images in `outputs`."""

    def __init__(self, outputs: Path, folder: Path, max_bytes: int = MAX_INPUT_BYTES,
                 references: Callable[[], Iterable[str]] = tuple, max_age_s: float = DEFAULT_MAX_AGE_S,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, grace_s: float = GRACE_S,
                 interval_s: float = COLLECT_INTERVAL_S):  # fmt: skip
        """`references` returns the file names (or paths) that history entries and jobs name: never collected."""
        self.outputs = outputs.resolve()
        self.folder = folder.resolve()
        self.max_bytes = max_bytes
        self.references = references
        self.max_age_s, self.max_total_bytes, self.grace_s = max_age_s, max_total_bytes, grace_s
        self.interval_s = interval_s
        self._lock = threading.Lock()  # a collection and a file being stored or named never interleave
        self._collected_at = -float("inf")

    def store_stream(self, field: str, stream: BinaryIO) -> str:
        """Keep an upload (read in chunks, refused once past `max_bytes`) and return its name."""
        self.folder.mkdir(parents=True, exist_ok=True)
        digest, size, head = hashlib.sha256(), 0, b""
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".upload-", delete=False) as out:
            try:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ParamError(field, f"is over {self.max_bytes / 2**20:g} MiB, the most accepted")
                    head = head or chunk[:12]
                    digest.update(chunk)
                    out.write(chunk)
                name = self._keep(field, Path(out.name), head, digest.hexdigest())
            finally:
                Path(out.name).unlink(missing_ok=True)
        self.collect_due()
        return name

    def store_bytes(self, field: str, data: bytes) -> str:
        return self.store_stream(field, io.BytesIO(data))

    def store_base64(self, field: str, text: Any) -> str:
        """A base64 image as the AUTOMATIC1111 API sends it (optionally a data: URL), checked for size first."""
        if not isinstance(text, str) or not text:
            raise ParamError(field, "must be a base64-encoded PNG, JPEG or WebP image")
        text = text.partition(",")[2] if text.startswith("data:") else text
        if len(text) * 3 // 4 > self.max_bytes + 2:
            raise ParamError(field, f"is over {self.max_bytes / 2**20:g} MiB, the most accepted")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ParamError(field, "is not valid base64") from None
        return self.store_bytes(field, data)

    def _keep(self, field: str, written: Path, head: bytes, sha256: str) -> str:
        ext = extension(head)
        if ext is None:
            raise ParamError(field, "is not a PNG, JPEG or WebP image")
        name = f"{sha256}{ext}"
        with self._lock:
            if (self.folder / name).is_file():
                os.utime(self.folder / name)  # stored again: young again
            else:
                os.replace(written, self.folder / name)
        return name

    def keep_copy(self, path: str | os.PathLike) -> str:
        """A byte-for-byte copy of a file (the web UI's uploads and sent results) named by its SHA-256 and its own
        suffix; the copy's absolute path."""
        data = Path(path).read_bytes()
        kept = self.folder / f"{hashlib.sha256(data).hexdigest()}{Path(path).suffix.lower()}"
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if kept.is_file():
                os.utime(kept)
            else:
                shutil.copyfile(path, kept.with_suffix(".part"))
                kept.with_suffix(".part").replace(kept)
        self.collect_due()
        return str(kept)

    def resolve(self, field: str, name: Any) -> str:
        """The absolute path of an image given by name: from the outputs folder, or an earlier upload."""
        if not isinstance(name, str):
            raise ParamError(field, f"must be the name of an image, got {name!r}")
        if IMAGE_NAME.match(name):
            path = self.outputs / name
        elif UPLOAD_NAME.match(name):
            path = self.folder / name
        else:
            raise ParamError(field, f"{name!r} is not an image name; give a file name from the outputs folder "
                                    "(outputs_20260101120000.png) or upload it; paths are not accepted")  # fmt: skip
        with self._lock:
            if not path.is_file():
                raise ParamError(field, f"no image named {name!r}")
            if path.parent == self.folder:
                os.utime(path)  # named: young again, until its job is recorded
        return str(path)

    def collect_due(self) -> list[str]:
        """`collect`, when `interval_s` has passed since the last one."""
        if time.monotonic() - self._collected_at < self.interval_s:
            return []
        return self.collect()

    def collect(self, now: float | None = None) -> list[str]:
        """Delete uploads that nothing names: those older than `max_age_s`, then the oldest while the folder is over
        `max_total_bytes`. Never a named one, never one younger than `grace_s`. Returns the deleted names."""
        self._collected_at = time.monotonic()
        if not self.folder.is_dir():
            return []
        now = time.time() if now is None else now
        with self._lock:
            try:
                named = {Path(ref).name for ref in self.references()}
            except (sqlite3.Error, OSError, ValueError) as err:  # not knowing what is named, delete nothing
                log.warning("input store: not collected, the history could not be read (%s)", err)
                return []
            files, total = [], 0
            for entry in os.scandir(self.folder):
                if entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    total += stat.st_size
                    if entry.name not in named and now - stat.st_mtime > self.grace_s:
                        files.append((stat.st_mtime, stat.st_size, entry.name))
            deleted = []
            for mtime, size, name in sorted(files):  # oldest first
                if now - mtime <= self.max_age_s and total <= self.max_total_bytes:
                    continue
                try:
                    (self.folder / name).unlink()
                except FileNotFoundError:
                    continue
                total -= size
                deleted.append(name)
        if deleted:
            log.info("input store: deleted %d upload(s) that no history entry or job names (%s)", len(deleted),
                     self.folder)  # fmt: skip
        return deleted

    def alpha_mask(self, field: str, name: str) -> str:
        """OpenAI's mask (fully transparent = edit) as the engine's (white = repaint), kept as an upload."""
        image, _ = read_image(field, self.folder / name, MAX_INPUT_PIXELS, self.max_bytes)
        if "A" not in image.getbands() and "transparency" not in image.info:
            raise ParamError(field, "has no alpha channel; OpenAI's mask is a PNG whose transparent pixels mark the "
                                    "area to edit")  # fmt: skip
        alpha = image.convert("RGBA").getchannel("A")
        mask = alpha.point(lambda v: 255 if v == 0 else 0)  # only fully transparent pixels are edited
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        return self.store_bytes(field, buffer.getvalue())

    def inverted_mask(self, field: str, name: str) -> str:
        """A mask with black = repaint (A1111's `inpainting_mask_invert`) as the engine's (white = repaint), kept as
        an upload."""
        image, _ = read_image(field, self.folder / name, MAX_INPUT_PIXELS, self.max_bytes)
        buffer = io.BytesIO()
        ImageOps.invert(image.convert("L")).save(buffer, format="PNG")
        return self.store_bytes(field, buffer.getvalue())


def shown_name(path: Any) -> Any:
    """What a client sees of an input: its name, never the server's path."""
    return Path(path).name if isinstance(path, str) and path else path
