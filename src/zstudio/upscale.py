"""Upscaling: super-resolution models that spandrel identifies (ESRGAN/Real-ESRGAN, SwinIR, HAT, DAT, ...) or
Lanczos, tiled so that a 4x of 1024x1024 fits in a few GB; and the hires fix (upscale, then image-to-image at the
larger size at a low strength, so the draft's composition stays).

Scale: the model runs at its own scale; when that differs from the asked one (a 4x model asked for 2x, a 2x model
asked for 3x) Lanczos resizes the model's output to the asked size. Every result carries its recipe (source SHA-256
and size, upscaler, architecture, scale, tile, refine strength, the source's own parameters) in its file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import os
import sys
import tempfile
import time
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .devices import dtype_name
from .input_image import read_input_image
from .models import file_sha256
from .outputs import EXTENSIONS, encode_image, read_metadata, write_file
from .params import GenerationParams, ParamError

if TYPE_CHECKING:
    from .engine import Generator

log = logging.getLogger(__name__)

LANCZOS = "lanczos"  # the built-in fallback's name in listings and metadata
MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors")  # what spandrel's ModelLoader reads
# 1.5x is the classic hires-fix step; 2x, 3x and 4x are the scales super-resolution models are trained for.
SCALES = (1.5, 2.0, 3.0, 4.0)
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
DEFAULT_TILE = 512  # input pixels per tile side: a 4x RRDBNet (64 features) tile then peaks near 3 GB in bf16
# Input pixels of context around each tile, computed and cropped away. Exact (tiled == untiled) once it covers the
# network's receptive field; released 23-block ESRGANs reach further in theory, but their weights fade within ~16 px.
DEFAULT_MARGIN = 32
# The fields of a draft's recipe that a re-render at the larger size sets itself: it is image-to-image of the whole
# upscaled draft (so no mask, outpaint or ControlNet: the draft already holds what they made), one image, at its own
# size and strength. Every other field (prompt, negative prompt, steps, CFG and its normalization and truncation,
# seed, max_sequence_length, LoRAs, output format) is the draft's.
RERENDER_SETS = ("image", "mask", "strength", "outpaint", "mask_blur", "width", "height", "num_images", "control",
                 "control_type", "control_preprocess", "control_scale", "control_start", "control_end")  # fmt: skip


@dataclass(frozen=True)
class UpscaleLimits:
    """What an upscale accepts and may produce.

    The output cap (8192 px a side, 64 MP) keeps a result within what viewers and browsers open (8192 is the common
    texture limit) and its host copies within about a gigabyte (64 MP x 3 bytes, plus float32 tiles in flight). The
    input caps refuse decompression bombs before Pillow decodes anything."""

    max_side: int = 8192
    max_pixels: int = 64_000_000
    max_input_pixels: int = 4096 * 4096
    max_input_bytes: int = 100 * 2**20


@dataclass
class Upscaler:
    """A loaded spandrel model, or Lanczos (`descriptor` None), on one device and dtype."""

    name: str
    architecture: str
    scale: int | None  # the model's own; None for Lanczos (any)
    path: Path | None = None
    descriptor: Any = None  # spandrel.ImageModelDescriptor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    tiling: str = "supported"
    sha256: str | None = None  # of the model file, for the recipe

    @property
    def is_model(self) -> bool:
        return self.descriptor is not None

    def describe(self) -> dict[str, Any]:
        """The upscaler's part of a result's recipe."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "native_scale": self.scale,
            "file": self.path.name if self.path else None,
            "sha256": self.sha256,
            "device": str(self.device) if self.is_model else None,
            "dtype": dtype_name(self.dtype) if self.is_model else None,
        }

    def upscale(self, image: Image.Image, scale: float, tile: int | None = DEFAULT_TILE,
                margin: int = DEFAULT_MARGIN) -> Image.Image:  # fmt: skip
        """`image` (RGB) enlarged `scale` times: the model in tiles of `tile` input pixels (0/None: one piece), then
        Lanczos to the asked size where the model's scale differs; Lanczos alone for the fallback."""
        target = (round(image.width * scale), round(image.height * scale))
        if not self.is_model:
            return image.resize(target, Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(_array(image)).permute(2, 0, 1).unsqueeze(0)
        with torch.inference_mode():
            out = run_tiled(self._run, pixels, self.scale, tile, margin, self.descriptor.size_requirements.multiple_of)
        result = Image.fromarray(out.permute(1, 2, 0).numpy())
        if result.size != target:
            log.info("%s is a %dx model: Lanczos resizes its %dx%d output to %dx%d", self.name, self.scale,
                     *result.size, *target)  # fmt: skip
            result = result.resize(target, Image.Resampling.LANCZOS)
        return result

    def _run(self, piece: torch.Tensor) -> torch.Tensor:
        """One tile through the model: uint8 (1, C, h, w) on the host in, uint8 (C, h*s, w*s) on the host out."""
        x = piece.to(self.device, torch.float32).div_(255).to(self.dtype)
        y = self.descriptor(x)
        return y[0].float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu()


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).copy()


def run_tiled(run, pixels: torch.Tensor, scale: int, tile: int | None, margin: int, multiple: int = 1
              ) -> torch.Tensor:  # fmt: skip
    """Apply `run` (a network of integer `scale`) to `pixels` (1, C, H, W) tile by tile.

    Each tile is computed with `margin` input pixels of its neighbours around it and only its own part is kept: the
    cropped margin holds the zero-padding seams, so once it covers the receptive field tiles match the whole image.
    Tile corners sit on multiples of `multiple` (pixel-unshuffle models need 2 or 4). Returns uint8 (C, H*s, W*s)."""
    _, channels, height, width = pixels.shape
    step = height if not tile else max(multiple, tile // multiple * multiple)
    step_x = width if not tile else step
    out = torch.empty((channels, height * scale, width * scale), dtype=torch.uint8)
    for y0 in range(0, height, step):
        for x0 in range(0, width, step_x):
            y1, x1 = min(y0 + step, height), min(x0 + step_x, width)
            py0, px0 = max(0, y0 - margin), max(0, x0 - margin)
            py0, px0 = py0 - py0 % multiple, px0 - px0 % multiple
            py1, px1 = min(height, y1 + margin), min(width, x1 + margin)
            piece = run(pixels[:, :, py0:py1, px0:px1])
            top, left = (y0 - py0) * scale, (x0 - px0) * scale
            out[:, y0 * scale : y1 * scale, x0 * scale : x1 * scale] = piece[
                :, top : top + (y1 - y0) * scale, left : left + (x1 - x0) * scale
            ]
    return out


# ------------------------------------------------------------------------------------------------ finding, loading
def find_upscalers(paths: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Model files by name (the file's stem) in the given files and folders (a folder's direct children).

    The first of two files with one stem wins, with a log line; "lanczos" is reserved for the built-in."""
    found: dict[str, Path] = {}
    for entry in paths:
        entry = Path(entry).expanduser()
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
        elif entry.is_file():
            files = [entry]
        else:
            log.warning("upscaler path %s does not exist", entry)
            continue
        for path in files:
            name = path.stem
            if name.lower() == LANCZOS or name in found:
                log.warning("upscaler %s: the name %r is taken (by %s); skipped", path, name,
                            found.get(name, "the built-in Lanczos"))  # fmt: skip
                continue
            found[name] = path
    return found


def load_upscaler(path_or_name: str | os.PathLike | None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, search: Iterable[str | os.PathLike] = ()
                  ) -> Upscaler:  # fmt: skip
    """A model file, a name found in `search` (files/folders), or "lanczos"/None for the built-in fallback.

    The model runs on `device` in `dtype` where its architecture supports that dtype (spandrel says which), else in
    the nearest one it does (float32 at worst)."""
    device = torch.device(device)
    resolved = resolve_upscaler(path_or_name, search)
    if resolved == LANCZOS:
        return Upscaler(name=LANCZOS, architecture="Lanczos", scale=None)
    path = Path(resolved)
    descriptor = read_model(path)
    model_dtype = _supported_dtype(descriptor, dtype, device)
    descriptor.to(device).to(model_dtype).eval()
    tiling = descriptor.tiling.name.lower()
    if tiling != "supported":
        log.info("%s: spandrel marks tiling %s for %s; it is tiled only when larger than a tile", path.name, tiling,
                 descriptor.architecture.name)  # fmt: skip
    return Upscaler(
        name=path.stem,
        architecture=descriptor.architecture.name,
        scale=descriptor.scale,
        path=path,
        descriptor=descriptor,
        device=device,
        dtype=model_dtype,
        tiling=tiling,
        sha256=file_sha256(path),
    )


def resolve_upscaler(path_or_name: str | os.PathLike | None, search: Iterable[str | os.PathLike] = ()) -> str:
    """ "lanczos" (also for None), or the model file's absolute path: a file given as such, or a name in `search`."""
    if path_or_name is None or str(path_or_name).strip().lower() == LANCZOS:
        return LANCZOS
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return str(path.resolve())
    found = find_upscalers(search)
    if str(path_or_name) not in found:
        names = ", ".join([LANCZOS, *found])
        raise ParamError("model", f"{str(path_or_name)!r} is neither a file nor an upscaler name; known names: "
                                  f"{names} (add files or folders with --upscaler or ZSTUDIO_UPSCALERS)")  # fmt: skip
    return str(found[str(path_or_name)].resolve())


def read_model(path: Path):
    """spandrel's descriptor for a file, or one line naming the file and what spandrel made of it."""
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise ParamError("model", f"{path}: {path.suffix or 'no suffix'} is not a model file; use one of "
                                  f"{', '.join(MODEL_SUFFIXES)}")  # fmt: skip
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader().load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise ParamError("model", f"{path}: spandrel could not identify the architecture of this file "
                                  "(not a super-resolution model it knows)") from None  # fmt: skip
    except Exception as err:  # torch.load, safetensors and the architectures' own loaders raise many kinds
        first = str(err).splitlines()[0] if str(err) else ""
        raise ParamError("model", f"{path}: spandrel could not read this file as a model "
                                  f"({type(err).__name__}: {first[:200]})") from None  # fmt: skip
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
        raise ParamError("model", f"{path}: spandrel identifies a {descriptor.architecture.name} "
                                  f"{descriptor.purpose} model, not a super-resolution one")  # fmt: skip
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ParamError("model", f"{path}: a {descriptor.input_channels}-to-{descriptor.output_channels} channel "
                                  "model; only RGB (3 channels) models are supported")  # fmt: skip
    return descriptor


def _supported_dtype(descriptor, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if device.type == "cpu" or dtype == torch.float32:
        return torch.float32  # half precision on the CPU is slow and gains nothing
    if dtype == torch.bfloat16 and descriptor.supports_bfloat16:
        return dtype
    if dtype == torch.float16 and descriptor.supports_half:
        return dtype
    for other, ok in ((torch.bfloat16, descriptor.supports_bfloat16), (torch.float16, descriptor.supports_half)):
        if ok:
            log.info("%s does not run in %s; using %s", descriptor.architecture.name, dtype_name(dtype),
                     dtype_name(other))  # fmt: skip
            return other
    return torch.float32


def import_spandrel():
    """spandrel, also beside a CPU torch build.

    spandrel imports torchvision for two architectures that are not upscalers (LaMa inpainting: `rotate`,
    `InterpolationMode`; RestoreFormer faces: `normalize`). PyPI's torchvision is built against PyPI's CUDA torch and
    cannot load beside a CPU build; there, while spandrel imports, those names come from a stand-in whose functions
    raise, and the stand-in is removed again. tests/test_upscale.py fails if spandrel starts importing more of it."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise ParamError("model", "upscaler models need spandrel: pip install 'zstudio[upscale]' "
                                  "(the built-in Lanczos upscaler works without it)")  # fmt: skip
    if _torchvision_loads():
        return importlib.import_module("spandrel")
    log.info("torchvision does not load beside this torch build; spandrel's LaMa and RestoreFormer stay unusable")
    with _torchvision_stand_in():
        return importlib.import_module("spandrel")


def _torchvision_loads() -> bool:
    try:
        importlib.import_module("torchvision")
        return True
    except (ImportError, RuntimeError, OSError):  # missing, or its compiled ops built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


TORCHVISION_NAMES = {"InterpolationMode", "rotate", "normalize"}  # what spandrel imports from torchvision


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision does not load beside this torch build")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")
    functional.rotate = functional.normalize = unavailable
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    modules = {"torchvision": package, "torchvision.transforms": transforms, functional.__name__: functional}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            sys.modules.pop(name, None)


# ------------------------------------------------------------------------------------------------------ the input
@dataclass
class SourceImage:
    image: Image.Image  # RGB, loaded
    path: Path
    sha256: str
    format: str
    metadata: dict[str, Any] | None  # the source's own record (zstudio JSON or A1111 text), if it has one


def check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or float(scale) not in SCALES:
        raise ParamError("scale", f"{scale!r} is not one of {', '.join(f'{s:g}' for s in SCALES)}")
    return float(scale)


def check_tile(tile: Any) -> int:
    if isinstance(tile, bool) or not isinstance(tile, int) or not (tile == 0 or 16 <= tile <= 4096):
        raise ParamError("tile", f"{tile!r} is not 0 (no tiling) or a whole number of pixels in 16-4096")
    return tile


def check_refine(refine: Any) -> float | None:
    if refine is None:
        return None
    if isinstance(refine, bool) or not isinstance(refine, (int, float)) or not 0 < refine <= 1:
        raise ParamError("refine", f"{refine!r} is outside 0-1 (exclusive of 0); 0.2-0.4 keeps the composition")
    return float(refine)


def open_source(path: str | os.PathLike, scale: float, limits: UpscaleLimits = UpscaleLimits()) -> SourceImage:
    """Read and check an input before any model work (`zstudio.input_image`: a file within the byte and pixel caps,
    of a supported format, not a decompression bomb) whose result stays within `limits`."""
    path = Path(path)
    read = read_input_image("image", path, limits.max_input_pixels, limits.max_input_bytes, INPUT_FORMATS, "RGB")
    check_output_size(*read.image.size, scale, limits)
    try:
        metadata = read_metadata(io.BytesIO(read.data))
    except (ValueError, OSError):
        metadata = None
    return SourceImage(read.image, path, read.sha256, read.format, metadata)


def check_output_size(width: int, height: int, scale: float, limits: UpscaleLimits) -> None:
    out_w, out_h = round(width * scale), round(height * scale)
    if max(out_w, out_h) > limits.max_side or out_w * out_h > limits.max_pixels:
        raise ParamError("scale", f"{width}x{height} at {scale:g}x would be {out_w}x{out_h} "
                                  f"({out_w * out_h / 1e6:.1f} MP); the limit is {limits.max_side} px a side and "
                                  f"{limits.max_pixels / 1e6:g} MP: use a smaller scale")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the result
@dataclass
class UpscaleResult:
    image: Image.Image
    metadata: dict[str, Any]  # the record embedded in the file: "upscale" recipe, "source", and "params" if refined
    path: Path | None = None  # set once saved
    seconds: float = 0.0


def upscale_file(source: SourceImage, upscaler: Upscaler, scale: float, tile: int | None = DEFAULT_TILE
                 ) -> UpscaleResult:  # fmt: skip
    """Upscale a checked source; the result's record says how (see `recipe`)."""
    start = time.perf_counter()
    if not upscaler.is_model:
        log.warning("upscaling with Lanczos, the built-in fallback: a resize, not a super-resolution model")
    image = upscaler.upscale(source.image, scale, tile)
    seconds = round(time.perf_counter() - start, 4)
    return UpscaleResult(image, recipe(source, upscaler, scale, tile, None, image.size, seconds), seconds=seconds)


def recipe(source: SourceImage, upscaler: Upscaler, scale: float, tile: int | None, refine: float | None,
           size: tuple[int, int], seconds: float) -> dict[str, Any]:  # fmt: skip
    """The record an upscaled file carries: enough to say what it came from and to do it again."""
    return {
        "software": f"zstudio {__version__}",
        "upscale": {
            "scale": scale,
            "width": size[0],
            "height": size[1],
            "upscaler": upscaler.describe(),
            "tile": tile if upscaler.is_model else None,
            "refine": refine,
            "seconds": seconds,
        },
        "source": {
            "file": source.path.name,
            "sha256": source.sha256,
            "width": source.image.width,
            "height": source.image.height,
            "format": source.format,
            "metadata": source.metadata,
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_result(result: UpscaleResult, directory: str | os.PathLike) -> Path:
    """Write the PNG with its record inside, atomically (zstudio.outputs), under a new `outputs_*` name."""
    result.path = write_file(encode_image(result.image, result.metadata, "png"), Path(directory), EXTENSIONS["png"])
    return result.path


# ----------------------------------------------------------------------------------------------------- hires fix
def refine_request(source: SourceImage, upscaled_file: Path, size: tuple[int, int], refine: float
                   ) -> GenerationParams:  # fmt: skip
    """The image-to-image request that re-renders the upscaled draft: the draft's own recipe at the new size."""
    meta = source.metadata or {}
    if "params" not in meta:
        raise ParamError("refine", f"{source.path} carries no zstudio recipe (prompt, seed, ...) to re-render with; "
                                   "upscale it without --refine")  # fmt: skip
    draft = rerender_fields(meta["params"])
    width, height = size
    return GenerationParams.from_dict({**draft, "width": width, "height": height, "num_images": 1,
                                       "image": str(upscaled_file), "strength": refine})  # fmt: skip


def rerender_fields(params: dict[str, Any]) -> dict[str, Any]:
    """A draft's recorded parameters less those a re-render sets (`RERENDER_SETS`) and any this version does not
    know (a file from another version)."""
    known = {f.name for f in dataclasses.fields(GenerationParams)} - set(RERENDER_SETS)
    return {k: v for k, v in params.items() if k in known}


def refine_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The re-render's size: the upscaled size rounded to the model's multiple of 16."""
    return tuple(max(16, round(side * scale / 16) * 16) for side in (width, height))  # type: ignore[return-value]


def hires_fix(generator: Generator, source: SourceImage, upscaler: Upscaler, scale: float, refine: float,
              tile: int | None = DEFAULT_TILE) -> UpscaleResult:  # fmt: skip
    """Upscale the draft, write it to a temporary file, then image-to-image at the larger size at strength `refine`
    with the draft's own prompt, seed and steps: a larger picture that keeps the draft's composition."""
    start = time.perf_counter()
    size = refine_size(source.image.width, source.image.height, scale)
    refine_request(source, Path(os.devnull), size, refine)  # a missing recipe or image-to-image: refused first
    upscaled = upscaler.upscale(source.image, scale, tile).resize(size, Image.Resampling.LANCZOS)
    with tempfile.TemporaryDirectory(prefix="zstudio-hires-") as folder:
        draft_file = Path(folder) / "upscaled.png"
        upscaled.save(draft_file)
        # The result is written as a PNG (save_result), whatever format the draft was saved in.
        params = refine_request(source, draft_file, size, refine).replace(output_format="png")
        result = generator.generate_images(params)
    seconds = round(time.perf_counter() - start, 4)
    meta = {**result.metadata[0], **recipe(source, upscaler, scale, tile, refine, size, seconds)}
    meta["params"] = {**meta["params"], "image": source.path.name}  # the temporary file is gone; name the draft
    return UpscaleResult(result.images[0], meta, seconds=seconds)


# ------------------------------------------------------------------------------------------------- one engine call
def run_upscale(generator: Generator, image: str | os.PathLike, scale: float = 2.0, model: str | None = None,
                tile: int | None = None, refine: float | None = None, output_dir: str | os.PathLike | None = None,
                search: Iterable[str | os.PathLike] = (), limits: UpscaleLimits = UpscaleLimits()
                ) -> UpscaleResult:  # fmt: skip
    """What `Generator.upscale` does: check everything about the request and the input first, then load the upscaler
    (kept in the generator's cache by file), upscale (and re-render with `refine`), and save with the recipe."""
    scale, refine = check_scale(scale), check_refine(refine)
    tile = check_tile(DEFAULT_TILE if tile is None else tile)
    key = resolve_upscaler(model, search)
    source = open_source(image, scale, limits)
    if refine is not None:
        refine_request(source, Path(os.devnull), refine_size(*source.image.size, scale), refine)  # checks only
    cache = generator.upscalers
    if key not in cache:
        cache[key] = load_upscaler(key, generator.device, generator.dtype)
    upscaler = cache[key]
    check_output_size(*source.image.size, max(scale, upscaler.scale or 0), limits)  # the model's own output too
    if refine is None:
        result = upscale_file(source, upscaler, scale, tile)
    else:
        result = hires_fix(generator, source, upscaler, scale, refine, tile)
    save_result(result, output_dir if output_dir is not None else generator.outputs)
    return result
