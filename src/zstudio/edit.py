"""Editing a picture: image-to-image, inpainting and outpainting inputs, checked once, before any model work.

`validate` reads and checks the source image and mask (a real PNG/JPEG/WebP, within the byte and pixel caps, the mask
as large as the image), extends the canvas for an outpaint, fits it to the output size and returns what the engine
draws from, with the recipe that goes into every result's metadata. The engine calls it first; a server can call it at
submit time to refuse bad files before queueing.

The size rule (never stretched):
- without width and height, the output is the canvas (the source, plus any outpaint) rounded down to multiples of 16
  by centre-cropping: at most 15 px per dimension, split between both sides;
- with width and height, the canvas is centre-cropped when that alone reaches the size (under 16 px off), otherwise
  scaled, aspect kept, until it covers the size, then centre-cropped; with only one of them, the other follows the
  canvas' aspect (rounded to a multiple of 16).
Sources under 64 px a side are refused, and so is an output the model profile cannot draw.

Masks: white = repaint (values >= 128 after any scaling; diffusers binarises at 0.5). Without a mask file, an image
with transparent pixels is inpainted where alpha < 128 (OpenAI's convention: transparent = repaint).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from .input_image import INPUT_FORMATS, read_input_image
from .params import (
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    MAX_PIXELS,
    MAX_SIDE,
    MIN_SIDE,
    OUTPAINT_SIDES,
    SIDE_MULTIPLE,
    GenerationParams,
    ParamError,
)

if TYPE_CHECKING:
    import torch

    from .models import Profile

# diffusers' defaults: ZImageImg2ImgPipeline strength=0.6, ZImageInpaintPipeline strength=1.0.
IMAGE_TO_IMAGE_STRENGTH = 0.6
INPAINT_STRENGTH = 1.0
LATENT_SCALE = 16  # pixels per latent patch of Z-Image's VAE (8) and transformer (2): diffusers' vae_scale_factor * 2


def image_pixels(image: Image.Image, device: torch.device | str = "cpu") -> torch.Tensor:
    """An RGB picture (sides multiples of 8) as the VAE takes it: (1, 3, H, W) float32 in [-1, 1], contiguous.

    The arithmetic of diffusers' `VaeImageProcessor.preprocess` (x / 255, then 2x - 1, in float32; a test holds
    the two equal), done on `device`: a quarter of the bytes (uint8) cross to it, and the GPU does the rest."""
    import torch

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = torch.from_numpy(np.array(rgb)).to(device)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0
    return (2.0 * pixels - 1.0).contiguous()


@dataclass(frozen=True)
class EditInput:
    """What an edit draws from: the canvas and mask at the output size, and the recipe recorded with each result."""

    params: GenerationParams  # size, strength (and, with a profile, steps and cfg) resolved
    image: Image.Image  # RGB, params.width x params.height
    mask: Image.Image | None  # "L", 0 or 255, white = repaint; None = image-to-image
    recipe: dict[str, Any]

    def pixels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The canvas as the VAE takes it (`image_pixels`)."""
        return image_pixels(self.image, device)

    def latent_mask(self, size: tuple[int, int]) -> torch.Tensor:
        """The mask at the latents' size, (1, 1, h, w), 1 = repaint: binarised and nearest-resized as diffusers'
        ZImageInpaintPipeline does."""
        import torch
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(
            vae_scale_factor=LATENT_SCALE, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        mask = processor.preprocess(self.mask, height=self.image.height, width=self.image.width).float()
        return torch.nn.functional.interpolate(mask, size=tuple(size), mode="nearest")

    def overlay(self, image: Image.Image) -> Image.Image:
        """Keep the source outside the mask: diffusers' `apply_overlay` with the mask blurred by `mask_blur` px, so
        repainted and kept pixels meet at a soft edge (it straddles the mask's border). Image-to-image: unchanged."""
        if self.mask is None:
            return image
        from diffusers.image_processor import VaeImageProcessor

        blur = self.params.mask_blur
        soft = VaeImageProcessor.blur(self.mask, blur) if blur else self.mask
        return VaeImageProcessor().apply_overlay(soft, self.image, image)


def validate(
    params: GenerationParams,
    profile: Profile | None = None,
    max_input_pixels: int = MAX_INPUT_PIXELS,
    max_input_bytes: int = MAX_INPUT_BYTES,
) -> EditInput | None:
    """Read and check an edit's files; None for text-to-image. `ParamError` (one line, naming the field) for a file
    that is missing, too large, not a PNG/JPEG/WebP image, a mask of another size, an empty mask, a canvas the
    profile cannot draw, or a strength that leaves no step to run. With `profile`, its defaults and limits apply."""
    if params.image is None:
        return None
    source, source_info = read_image("image", params.image, max_input_pixels, max_input_bytes)
    if min(source.size) < MIN_SIDE:
        raise ParamError("image", f"{_size(source.size)} is too small; each side needs at least {MIN_SIDE} px")
    mask, mask_info = None, None
    if params.mask is not None:
        mask_image, mask_info = read_image("mask", params.mask, max_input_pixels, max_input_bytes)
        if mask_image.size != source.size:
            raise ParamError("mask", f"is {_size(mask_image.size)}, the image {_size(source.size)}; they must match")
        mask = mask_image.convert("L")
        mask_info = {"from": "file", **mask_info}
    elif _has_transparency(source):
        mask = ImageOps.invert(source.convert("RGBA").getchannel("A"))
        mask_info = {"from": "alpha"}
    source = source.convert("RGB")
    if params.outpaint:
        source, mask = extend(source, mask, params.outpaint)
        mask_info = mask_info or {"from": "outpaint"}
        if max(source.size) > MAX_SIDE or source.width * source.height > MAX_PIXELS:
            raise ParamError(
                "outpaint",
                f"extends the {_size(source_info['size'])} image to {_size(source.size)}, past the largest picture "
                f"({MAX_SIDE} px a side, {MAX_PIXELS / 1e6:.1f} megapixels)",
            )
    width, height = output_size(source.size, params.width, params.height)
    limit_side, limit_pixels = (profile.max_side, profile.max_pixels) if profile else (MAX_SIDE, MAX_PIXELS)
    too_large = max(width, height) > min(limit_side, MAX_SIDE) or width * height > min(limit_pixels, MAX_PIXELS)
    if too_large and not (params.width or params.height):
        what = "outpaint" if params.outpaint else "image"
        label = profile.label if profile else "engine"
        raise ParamError(what, f"{_size(source.size)} is larger than the {label} draws (sides up to {limit_side}); "
                               "give a width and height to scale it down")  # fmt: skip
    canvas_size = source.size
    image = fit(source, width, height, Image.Resampling.LANCZOS)
    if mask is not None:
        mask = fit(mask, width, height, Image.Resampling.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
        if mask.getextrema()[1] == 0:
            raise ParamError("mask", "has no white pixel (white = repaint; for an alpha mask, transparent = repaint): "
                                     "nothing would change")  # fmt: skip
    strength = params.strength
    if strength is None:
        strength = INPAINT_STRENGTH if mask is not None else IMAGE_TO_IMAGE_STRENGTH
    files = {name: str(Path(getattr(params, name)).resolve()) for name in ("image", "mask") if getattr(params, name)}
    params = params.replace(width=width, height=height, strength=float(strength), **files)  # remade from any folder
    if profile is not None:
        params = profile.resolve(params)
    if params.num_inference_steps is not None and transformer_evaluations(params) < 1:
        raise ParamError("strength", f"{strength:g} with {params.num_inference_steps} steps runs no step; "
                                     f"use at least {1 / params.num_inference_steps:.3g} or more steps")  # fmt: skip
    recipe = {
        "mode": "outpaint" if params.outpaint else "inpaint" if mask is not None else "image-to-image",
        "source": {
            "sha256": source_info["sha256"],
            "width": source_info["size"][0],
            "height": source_info["size"][1],
            "format": source_info["format"],
        },  # fmt: skip
        "mask": mask_info and {k: v for k, v in mask_info.items() if k != "size"},
        "strength": params.strength,
        "outpaint": params.outpaint,
        "mask_blur": params.mask_blur if mask is not None else None,
        "canvas": {"width": canvas_size[0], "height": canvas_size[1]},
        "fit": "crop" if _crops_only(canvas_size, width, height) else "scale and crop",
    }
    return EditInput(params=params, image=image, mask=mask, recipe=recipe)


def read_image(field: str, path: str | os.PathLike, max_pixels: int, max_bytes: int) -> tuple[Image.Image, dict]:
    """An edit input (PNG, JPEG or WebP) checked and decoded by `zstudio.input_image`: the image (EXIF orientation
    applied) and its sha256, size and format."""
    read = read_input_image(field, path, max_pixels, max_bytes, INPUT_FORMATS)
    return read.image, read.info


def _has_transparency(image: Image.Image) -> bool:
    if "A" not in image.getbands() and "transparency" not in image.info:
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 255


def extend(image: Image.Image, mask: Image.Image | None, outpaint: dict[str, int]) -> tuple[Image.Image, Image.Image]:
    """The canvas grown by `outpaint` pixels per side, the new area filled by repeating the edge pixels (a start the
    model can blend from at any strength), and the mask white there."""
    pad = ((outpaint.get("top", 0), outpaint.get("bottom", 0)), (outpaint.get("left", 0), outpaint.get("right", 0)))
    pixels = np.pad(np.asarray(image), (*pad, (0, 0)), mode="edge")
    kept = np.asarray(mask) if mask is not None else np.zeros(image.size[::-1], dtype=np.uint8)
    new_mask = np.pad(kept, pad, mode="constant", constant_values=255)
    return Image.fromarray(pixels), Image.fromarray(new_mask)


def output_size(canvas: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The output size for a canvas and the requested width/height (either may be None): see the module docstring."""
    cw, ch = canvas
    if width and not height:
        height = max(SIDE_MULTIPLE, round(width * ch / cw / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    elif height and not width:
        width = max(SIDE_MULTIPLE, round(height * cw / ch / SIDE_MULTIPLE) * SIDE_MULTIPLE)
    elif not width:
        width, height = cw // SIDE_MULTIPLE * SIDE_MULTIPLE, ch // SIDE_MULTIPLE * SIDE_MULTIPLE
    return width, height


def _crops_only(canvas: tuple[int, int], width: int, height: int) -> bool:
    return 0 <= canvas[0] - width < SIDE_MULTIPLE and 0 <= canvas[1] - height < SIDE_MULTIPLE


def fit(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """Centre-crop to width x height, first scaling (aspect kept) to cover it unless a crop of < 16 px does."""
    if not _crops_only(image.size, width, height):
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, resample)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def start_step(num_inference_steps: int, strength: float) -> int:
    """The first step an edit runs: diffusers' `get_timesteps` (ZImageImg2ImgPipeline), to its float rounding."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init_timestep, 0))


def transformer_evaluations(params: GenerationParams) -> int:
    """Steps an edit runs (all of them for text-to-image); with CFG each also carries the negative prompt."""
    if params.image is None or params.strength is None:
        return params.num_inference_steps
    return params.num_inference_steps - start_step(params.num_inference_steps, params.strength)


def parse_outpaint(text: str | None) -> dict[str, int] | None:
    """'left=128,right=64' as {'left': 128, 'right': 64}; names and numbers are checked by GenerationParams."""
    if not text:
        return None
    sides: dict[str, int] = {}
    for part in text.split(","):
        side, sep, value = part.strip().partition("=")
        if not sep or not value.strip().isascii() or not value.strip().isdigit():
            raise ParamError("outpaint", f"{part.strip()!r} is not SIDE=PIXELS; use e.g. left=128,right=128 "
                                         f"(sides: {', '.join(OUTPAINT_SIDES)})")  # fmt: skip
        sides[side.strip().lower()] = int(value)
    return sides


def store_inputs(fields: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`image`, `mask` and `control` given as PIL images become content-addressed PNG files under `folder`
    (parameters hold paths, so they stay JSON); paths become strings. Other fields pass through."""
    fields = dict(fields)
    for name in ("image", "mask", "control"):
        value = fields.get(name)
        if isinstance(value, Image.Image):
            fields[name] = str(_store_png(value, folder))
        elif isinstance(value, os.PathLike):
            fields[name] = os.fspath(value)
    return fields


def _store_png(image: Image.Image, folder: Path) -> Path:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()}.png"
    if path.is_file():
        os.utime(path)  # used again: a store that collects old files (zstudio.server.inputs) sees it as new
    else:
        from .outputs import write_file

        folder.mkdir(parents=True, exist_ok=True)
        written = write_file(data, folder, ".png")  # atomic, then renamed to its content's name
        os.replace(written, path)
    return path


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"
