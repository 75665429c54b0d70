"""Environment variables, read in exactly this one place.

| variable          | meaning                                                        | default                     |
|-------------------|----------------------------------------------------------------|-----------------------------|
| ZSTUDIO_MODEL     | hub id, local diffusers folder, or `tiny`                      | Tongyi-MAI/Z-Image-Turbo    |
| ZSTUDIO_OUTPUTS   | folder that receives generated images                          | ./outputs                   |
| ZSTUDIO_DEVICE    | auto, cuda, cuda:N, mps or cpu                                 | auto                        |
| ZSTUDIO_DTYPE     | auto, bfloat16, float16 or float32                             | auto                        |
| ZSTUDIO_SPEED     | auto, eager, exact, fast or fastest (see zstudio.speed)        | auto                        |
| ZSTUDIO_MEMORY    | auto, resident, offload-text, stream or lowest (zstudio.memory)| auto                        |
| ZSTUDIO_CACHE     | where zstudio keeps checkpoints it makes itself (tiny model)   | ~/.cache/zstudio            |
| ZSTUDIO_CUDA_GRAPHS | what replays as CUDA graphs in fast modes: off, text, all    | text                        |
| ZSTUDIO_STATE     | the server's history database (never inside the outputs)      | ~/.local/state/zstudio      |
| ZSTUDIO_TOKEN     | API/UI token of `zstudio serve` (16+ characters)              | none (loopback only)        |
| ZSTUDIO_MAX_MEGAPIXEL_STEPS | per-request work limit: width x height x steps x images / 1e6 | 500         |
| ZSTUDIO_UPSCALERS | upscaler model files or folders of them, separated by `:` (`;` on Windows) | none (Lanczos) |
| ZSTUDIO_LORAS     | the LoRA folder (`*.safetensors`, see zstudio.lora)            | ./loras                     |
| ZSTUDIO_CONTROLNET | ControlNet: hub id, folder or .safetensors (zstudio.control)  | none                        |
| ZSTUDIO_DEPTH_MODEL | depth preprocessor: folder or hub id (cache only) | depth-anything/Depth-Anything-V2-Small-hf |
| ZSTUDIO_ANNOTATORS | HED/M-LSD/lineart/pose weights: folder or hub id (cache only) | lllyasviel/Annotators       |
| ZSTUDIO_ANNOTATOR_DEVICE | where the preprocessors' nets run: cpu, cuda or cuda:N      | cpu                         |
| ZSTUDIO_UPLOAD_TTL | hours an upload that no history entry or job names is kept    | 24                          |
| ZSTUDIO_UPLOAD_MAX_MB | the uploads folder's cap (oldest unnamed uploads go first) | 2048                        |
| ZSTUDIO_PNG_ENCODER | auto (= parallel), parallel or pillow (see zstudio.speed.png) | auto                      |
| ZSTUDIO_RESIDENT_BLOCKS | memory mode stream: transformer blocks kept on the GPU (0: all streamed) | as many as fit |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .params import DEFAULT_MAX_MEGAPIXEL_STEPS, ParamError

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"  # zstudio.preprocessors
DEFAULT_ANNOTATORS = "lllyasviel/Annotators"  # controlnet_aux's weights (ControlNetHED.pth, ...)


@dataclass(frozen=True)
class Settings:
    model: str | None
    outputs: Path
    device: str
    dtype: str
    speed: str
    memory: str
    cache_dir: Path
    cuda_graphs: str = "text"
    state_dir: Path = Path("~/.local/state/zstudio").expanduser()
    max_megapixel_steps: float = DEFAULT_MAX_MEGAPIXEL_STEPS
    upscalers: tuple[str, ...] = ()
    loras: Path = Path("loras")
    controlnet: str | None = None
    depth_model: str = DEFAULT_DEPTH_MODEL
    annotators: str = DEFAULT_ANNOTATORS
    annotator_device: str = "cpu"
    upload_ttl_hours: float = 24.0
    upload_max_mb: float = 2048.0
    png_encoder: str = "auto"
    resident_blocks: int | None = None  # memory mode stream; None: as many as fit (zstudio.memory)


def load_settings() -> Settings:
    """Read the environment now (not at import), so tests and front ends can set it first."""
    cache = os.environ.get("ZSTUDIO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zstudio"
    )
    state = os.environ.get("ZSTUDIO_STATE") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "zstudio"
    )
    return Settings(
        model=os.environ.get("ZSTUDIO_MODEL") or None,
        outputs=Path(os.environ.get("ZSTUDIO_OUTPUTS") or "outputs"),
        device=os.environ.get("ZSTUDIO_DEVICE") or "auto",
        dtype=os.environ.get("ZSTUDIO_DTYPE") or "auto",
        speed=os.environ.get("ZSTUDIO_SPEED") or "auto",
        memory=os.environ.get("ZSTUDIO_MEMORY") or "auto",
        cache_dir=Path(cache),
        cuda_graphs=os.environ.get("ZSTUDIO_CUDA_GRAPHS") or "text",
        state_dir=Path(state),
        max_megapixel_steps=_positive_number("ZSTUDIO_MAX_MEGAPIXEL_STEPS", DEFAULT_MAX_MEGAPIXEL_STEPS),
        upscalers=tuple(p for p in (os.environ.get("ZSTUDIO_UPSCALERS") or "").split(os.pathsep) if p),
        loras=Path(os.environ.get("ZSTUDIO_LORAS") or "loras"),
        controlnet=os.environ.get("ZSTUDIO_CONTROLNET") or None,
        depth_model=os.environ.get("ZSTUDIO_DEPTH_MODEL") or DEFAULT_DEPTH_MODEL,
        annotators=os.environ.get("ZSTUDIO_ANNOTATORS") or DEFAULT_ANNOTATORS,
        annotator_device=os.environ.get("ZSTUDIO_ANNOTATOR_DEVICE") or "cpu",
        upload_ttl_hours=_positive_number("ZSTUDIO_UPLOAD_TTL", 24.0),
        upload_max_mb=_positive_number("ZSTUDIO_UPLOAD_MAX_MB", 2048.0),
        png_encoder=os.environ.get("ZSTUDIO_PNG_ENCODER") or "auto",
        resident_blocks=_count("ZSTUDIO_RESIDENT_BLOCKS"),
    )


def _count(name: str) -> int | None:
    """A whole number >= 0 from the environment; None where unset."""
    text = (os.environ.get(name) or "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ParamError(name, f"{text!r} is not a whole number >= 0 (0: stream every block)")
    return int(text)


def _positive_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ParamError(name, f"{text!r} is not a positive number")
    return value
