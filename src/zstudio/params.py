"""The one validated set of generation parameters, shared by the CLI, HTTP API, UI and PNG metadata.

Validation lives here once; each front end maps `ParamError` to its own way of saying "bad input"
(exit code 2, HTTP 422, a UI message).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MIN_SIDE = 64  # the demo model draws at 64x64; Z-Image itself is meant for about 512 and up
MAX_SIDE = 2048
MAX_PIXELS = 4_200_000
SIDE_MULTIPLE = 16
MAX_STEPS = 100
MAX_CFG = 20.0
MAX_IMAGES = 8
MAX_SEED = 2**32 - 1
MAX_SEQUENCE_LENGTH = 512
OUTPUT_FORMATS = ("png", "jpeg", "webp")

# Quick presets as users of the earlier WebUI know them, keyed by the name the CLI and UI accept.
PRESETS: dict[str, tuple[int, int]] = {
    "512": (512, 512),
    "768": (768, 768),
    "1024": (1024, 1024),
    "1024x768": (1024, 768),
}

# Common aspect ratios at about one megapixel, sides multiples of 16.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1360, 768),
    "9:16": (768, 1360),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
}


class ParamError(ValueError):
    """Bad input: names the field, the value and what is allowed, in one line."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


def check_choice(field_name: str, value: str | None, choices: tuple[str, ...]) -> str:
    """Normalise a mode name (None means "auto") and reject anything not in `choices`."""
    value = (value or "auto").strip().lower()
    if value not in choices:
        raise ParamError(field_name, f"{value!r} is not one of {', '.join(choices)}")
    return value


def resolve_size(name: str) -> tuple[int, int]:
    """Turn a preset ('1024'), an aspect ratio ('16:9') or 'WxH' into (width, height)."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in ASPECT_RATIOS:
        return ASPECT_RATIOS[key]
    if "x" in key:
        w, _, h = key.partition("x")
        if w.isdigit() and h.isdigit():
            return int(w), int(h)
    allowed = ", ".join([*PRESETS, *ASPECT_RATIOS])
    raise ParamError("size", f"unknown size or preset {name!r}; use WxH (e.g. 1024x768) or one of {allowed}")


def _nearest_multiples(value: int) -> str:
    lower = max(SIDE_MULTIPLE, value // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return f"use {lower} or {lower + SIDE_MULTIPLE}"


def _check_side(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be a whole number of pixels, got {value!r}")
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise ParamError(name, f"{value} is outside {MIN_SIDE}-{MAX_SIDE}")
    if value % SIDE_MULTIPLE:
        raise ParamError(name, f"{value} is not a multiple of {SIDE_MULTIPLE}; {_nearest_multiples(value)}")


def _check_int_range(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ParamError(name, f"{value} is outside {low}-{high}")


@dataclass(frozen=True)
class GenerationParams:
    """Everything that decides a picture. `None` means "the model profile's default"."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's own size (1024 for Z-Image, 64 for the demo model)
    height: int | None = None
    num_inference_steps: int | None = None
    cfg_scale: float | None = None
    seed: int = -1
    num_images: int = 1
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    output_format: str = "png"
    # Base-model extras, as in diffusers' ZImagePipeline: rescale the guided prediction's norm to at most
    # `cfg_normalization` times the conditional one (0 = off), and stop guidance once t passes `cfg_truncation`.
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ParamError("prompt", f"must be text, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise ParamError("prompt", "must not be empty")
        if not isinstance(self.negative_prompt, str):
            raise ParamError("negative_prompt", f"must be text, got {type(self.negative_prompt).__name__}")
        if self.width is not None:
            _check_side("width", self.width)
        if self.height is not None:
            _check_side("height", self.height)
        if self.width and self.height and self.width * self.height > MAX_PIXELS:
            raise ParamError(
                "width",
                f"{self.width}x{self.height} is {self.width * self.height / 1e6:.2f} megapixels; "
                f"at most {MAX_PIXELS / 1e6:.1f} are allowed",
            )
        if self.num_inference_steps is not None:
            _check_int_range("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        if self.cfg_scale is not None:
            self._check_cfg(self.cfg_scale)
        if self.seed != -1:
            _check_int_range("seed", self.seed, 0, MAX_SEED)
        _check_int_range("num_images", self.num_images, 1, MAX_IMAGES)
        if self.seed != -1 and self.seed + self.num_images - 1 > MAX_SEED:
            last = self.seed + self.num_images - 1
            raise ParamError(
                "seed",
                f"{self.seed} with {self.num_images} images would use seeds up to {last}, past {MAX_SEED}",
            )
        _check_int_range("max_sequence_length", self.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        fmt = str(self.output_format).lower()
        if fmt == "jpg":
            fmt = "jpeg"
        if fmt not in OUTPUT_FORMATS:
            raise ParamError("output_format", f"{self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        object.__setattr__(self, "output_format", fmt)
        if not (isinstance(self.cfg_normalization, (int, float)) and 0 <= self.cfg_normalization <= 10):
            raise ParamError("cfg_normalization", f"{self.cfg_normalization!r} is outside 0-10 (0 = off)")
        if not (isinstance(self.cfg_truncation, (int, float)) and 0 <= self.cfg_truncation <= 1):
            raise ParamError("cfg_truncation", f"{self.cfg_truncation!r} is outside 0-1")

    @staticmethod
    def _check_cfg(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError("cfg_scale", f"must be a number, got {value!r}")
        if math.isnan(value) or value < 0 or value > MAX_CFG:
            raise ParamError("cfg_scale", f"{value} is outside 0-{MAX_CFG:g} (0 turns guidance off)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        """Build from loose input (JSON, form fields), rejecting unknown names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamError(unknown[0], f"unknown parameter; allowed are {', '.join(sorted(known))}")
        if "prompt" not in data:
            raise ParamError("prompt", "is required")
        return cls(**data)

    def with_defaults(self, num_inference_steps: int, cfg_scale: float, width: int = 1024, height: int = 1024
                      ) -> GenerationParams:  # fmt: skip
        """Fill the profile's defaults where the caller left a field unset."""
        return dataclasses.replace(
            self,
            width=self.width or width,
            height=self.height or height,
            num_inference_steps=self.num_inference_steps
            if self.num_inference_steps is not None
            else num_inference_steps,
            cfg_scale=float(self.cfg_scale) if self.cfg_scale is not None else float(cfg_scale),
        )

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
