"""Writing results: unique `outputs_YYYYMMDDHHMMSS*.png` names, atomic writes, parameters inside each file."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .params import check_choice
from .settings import load_settings

JSON_KEY = "zstudio"  # PNG text chunk holding the full JSON record
A1111_KEY = "parameters"  # PNG text chunk in the format other tools (A1111, ComfyUI readers, civitai) read
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_UNICODE = b"UNICODE\x00"
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
# Pillow's path (ZSTUDIO_PNG_ENCODER=pillow, other modes): zlib level 1, a third of level 6's time for files ~10%
# larger; docs/perf-notes.md.
PNG_COMPRESS_LEVEL = 1


def a1111_text(meta: dict[str, Any]) -> str:
    """The `parameters` text other tools parse: prompt, negative, then one line of `Key: value` pairs."""
    p = meta["params"]
    fields = {
        "Steps": p["num_inference_steps"],
        "Sampler": "Euler",
        "Schedule type": f"FlowMatch shift {meta['scheduler']['shift']:g}",
        "CFG scale": p["cfg_scale"],
        "Seed": p["seed"],
        "Size": f"{p['width']}x{p['height']}",
        "Model": meta["model"]["name"],
        "Version": meta["software"],
    }
    if p.get("image"):  # an edit (zstudio.edit), in the keys A1111's img2img writes
        fields["Denoising strength"] = p["strength"]
        if (meta.get("edit") or {}).get("mask"):
            fields["Mask blur"] = p["mask_blur"]
    loras = meta.get("loras") or []
    prompt = " ".join([p["prompt"], *(f"<lora:{x['name']}:{x['strength']:g}>" for x in loras)])
    if loras:  # A1111's field: the first 10 hex characters of each file's SHA-256
        fields["Lora hashes"] = '"' + ", ".join(f"{x['name']}: {x['sha256'][:10]}" for x in loras) + '"'
    if meta.get("control"):  # as the sd-webui-controlnet extension writes its unit
        c = meta["control"]
        unit = (f'Module: {c.get("preprocessor", "none")}, Model: {c["controlnet"]}, Weight: {c["scale"]:g}, '
                f'Guidance Start: {c["start"]:g}, Guidance End: {c["end"]:g}')  # fmt: skip
        fields["ControlNet 0"] = f'"{unit}"'
    line = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return f"{prompt}\nNegative prompt: {p['negative_prompt']}\n{line}"


def encode_image(image: Image.Image, meta: dict[str, Any], fmt: str, png_encoder: str | None = None) -> bytes:
    """Serialise the picture with its parameters embedded (PNG text chunks, or EXIF for JPEG/WebP).

    PNGs go through `png_encoder` (default: the `ZSTUDIO_PNG_ENCODER` setting): `parallel` (zstudio.speed.png,
    3-15x faster than Pillow in docs/perf-notes.md) or `pillow`; both decode to the same pixels and text."""
    buffer = io.BytesIO()
    if fmt == "png":
        texts = [(A1111_KEY, a1111_text(meta))] if "params" in meta else []  # a plain upscale has no parameters
        texts.append((JSON_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True)))
        from .speed import png  # here, not at the top: reading metadata needs no numpy encoder (nor torch)

        choice = png_encoder or load_settings().png_encoder
        encoder = check_choice("ZSTUDIO_PNG_ENCODER", choice, ("auto", *png.ENCODERS))
        if (png.DEFAULT_ENCODER if encoder == "auto" else encoder) == "parallel" and png.supports(image):
            return png.encode_png(image, texts)
        info = PngImagePlugin.PngInfo()
        for key, value in texts:
            info.add_itxt(key, value)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    else:
        # EXIF text is ASCII: the JSON escapes the rest; UserComment carries UTF-16 as A1111 writes it.
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(meta, ensure_ascii=True, sort_keys=True)
        exif[EXIF_USER_COMMENT] = USER_COMMENT_UNICODE + a1111_text(meta).encode("utf-16-be")
        image.convert("RGB").save(buffer, format=fmt.upper(), quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def save_image(image: Image.Image, meta: dict[str, Any], directory: Path) -> Path:
    """Encode with the parameters inside, then write atomically under a new unique name.

    The format is the one recorded in the metadata (`params.output_format`), so file and record agree.
    """
    fmt = meta["params"]["output_format"]
    return write_file(encode_image(image, meta, fmt), directory, EXTENSIONS[fmt])


def write_file(data: bytes, directory: Path, ext: str) -> Path:
    """Write to a temporary name, fsync, then link to a new `outputs_*` name: a crash never leaves a partial file
    under a final name, and a file that has its name is on disk."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".outputs_", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return _link_unique(Path(tmp_name), directory, ext)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _link_unique(tmp: Path, directory: Path, ext: str) -> Path:
    """Give the finished file its final name; os.link fails rather than overwrite, so names never collide."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    for n in range(100_000):
        candidate = directory / (f"outputs_{stamp}{ext}" if n == 0 else f"outputs_{stamp}_{n}{ext}")
        try:
            os.link(tmp, candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free output name for outputs_{stamp}{ext} in {directory}")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record written by `save_image`, or the A1111 text alone for files made by other tools."""
    with Image.open(path) as image:
        image.load()
        text = dict(getattr(image, "text", {}) or {})
        if JSON_KEY not in text:
            exif = image.getexif()
            if EXIF_IMAGE_DESCRIPTION in exif:
                text[JSON_KEY] = exif[EXIF_IMAGE_DESCRIPTION]
            comment = exif.get(EXIF_USER_COMMENT)
            if isinstance(comment, bytes) and comment.startswith(USER_COMMENT_UNICODE):
                text[A1111_KEY] = comment[len(USER_COMMENT_UNICODE) :].decode("utf-16-be")
    if JSON_KEY in text:
        return json.loads(text[JSON_KEY])
    if A1111_KEY in text:
        return {A1111_KEY: text[A1111_KEY]}
    raise ValueError(f"{path} carries no generation parameters")
