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
# Characters, not tokens: the encoder reads at most MAX_SEQUENCE_LENGTH tokens (the rest is truncated and recorded),
# so longer text only bloats the history and every PNG's metadata.
MAX_PROMPT_CHARS = 8000
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_LORAS = 8  # LoRAs per request (zstudio.lora); each strength within ±MAX_LORA_STRENGTH
MAX_LORA_STRENGTH = 2.0

# Editing a picture (zstudio.edit). Inputs are capped before they are decoded: a small file can claim billions of
# pixels (a decompression bomb). 50 MP covers today's phone and camera photos; Pillow's own limit (~89 MP) is the
# backstop. Both caps can be passed to `zstudio.edit.validate`.
MAX_INPUT_PIXELS = 50_000_000
MAX_INPUT_BYTES = 50 * 2**20
OUTPAINT_SIDES = ("left", "right", "top", "bottom")
MAX_MASK_BLUR = 64
DEFAULT_MASK_BLUR = 4  # pixels: diffusers' VaeImageProcessor.blur default, and A1111's

# ControlNet (zstudio.control): the types a control image can be (its preprocessors' names, and "none" = as given),
# and diffusers' ZImageControlNetPipeline default `controlnet_conditioning_scale`.
CONTROL_TYPES = ("none", "canny", "depth", "pose", "hed", "mlsd", "lineart", "scribble", "tile")
DEFAULT_CONTROL_SCALE = 0.75
MAX_CONTROL_SCALE = 2.0

# A request's work: width x height x steps x images, in millions. 500 admits 1024x1024 x 50 steps x 8 images and
# 2048x2048 x 100 steps x 1 image; a server can set its own (--max-megapixel-steps).
DEFAULT_MAX_MEGAPIXEL_STEPS = 500.0

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
        # Bad input may carry lone surrogates or line breaks; the message must still encode and stay one line.
        self.field = printable(str(field_name))
        super().__init__(f"{self.field}: {printable(message)}")


def printable(text: str) -> str:
    """`text` as valid one-line UTF-8: lone surrogates and line breaks become backslash escapes."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


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
        if _ascii_digits(w) and _ascii_digits(h):
            return int(w), int(h)
    allowed = ", ".join([*PRESETS, *ASPECT_RATIOS])
    raise ParamError("size", f"unknown size or preset {name!r}; use WxH (e.g. 1024x768) or one of {allowed}")


def _ascii_digits(text: str) -> bool:
    """0-9 only: str.isdigit() also accepts full-width and other scripts' digits, which int() then reads."""
    return text.isascii() and text.isdigit() and len(text) <= 6


def _check_text(name: str, value: Any, required: bool) -> None:
    if not isinstance(value, str):
        raise ParamError(name, f"must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise ParamError(name, "must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ParamError(name, f"is {len(value)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ord(value[err.start])
        raise ParamError(name, f"has an unpaired UTF-16 surrogate ({bad:#x}) at character {err.start}") from None
    if "\x00" in value:
        raise ParamError(name, f"has a NUL character at character {value.index(chr(0))}")


def _check_number(name: str, value: Any, low: float, high: float, note: str = "") -> None:
    """A real number (not a boolean, not NaN) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"must be a number, got {value!r}")
    if math.isnan(value) or not low <= value <= high:
        raise ParamError(name, f"{value} is outside {low:g}-{high:g}{note}")


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


def _check_loras(value: Any) -> tuple[tuple[str, float], ...]:
    """(name, strength) pairs from tuples, [name, strength] lists or {"name", "strength"} dicts (JSON)."""
    if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
        raise ParamError("loras", f"must be a list of [name, strength] pairs, got {value!r}")
    if len(value) > MAX_LORAS:
        raise ParamError("loras", f"{len(value)} LoRAs; at most {MAX_LORAS} are allowed")
    pairs = []
    for item in value:
        if isinstance(item, dict):
            unknown = sorted(set(item) - {"name", "strength"})
            if unknown or "name" not in item:
                raise ParamError("loras", f"{item!r}: give {{'name': ..., 'strength': ...}}")
            item = (item["name"], item.get("strength", 1.0))
        if isinstance(item, str) or not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ParamError("loras", f"{item!r} is not a [name, strength] pair")
        name, strength = item
        if not isinstance(name, str) or not name.strip() or not name.isprintable() or len(name) > 300:
            raise ParamError("loras", f"name {name!r} must be non-empty printable text of at most 300 characters")
        bad = isinstance(strength, bool) or not isinstance(strength, (int, float))
        if bad or not -MAX_LORA_STRENGTH <= strength <= MAX_LORA_STRENGTH:  # NaN fails the range too
            raise ParamError("loras", f"strength {strength!r} of LoRA {name!r} is outside "
                                      f"{-MAX_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g}")  # fmt: skip
        pairs.append((name.strip(), float(strength)))
    return tuple(pairs)


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
    # Editing (zstudio.edit): `image` is the path of the source picture; without it, text-to-image. `mask` is the path
    # of a mask, white = repaint; with no mask, an image whose alpha channel has transparent pixels is inpainted
    # where it is transparent (OpenAI's convention, transparent = repaint); otherwise it is image-to-image.
    # `strength` (0-1) is the share of the schedule re-run; None = diffusers' default: 0.6 for image-to-image, 1.0
    # with a mask or an outpaint. `outpaint` extends the canvas, {"left": 128, ...}, and repaints the new area;
    # `mask_blur` is the width in pixels of the soft edge where repainted pixels meet kept ones.
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    outpaint: dict[str, int] | None = None
    mask_blur: int = DEFAULT_MASK_BLUR
    loras: tuple[tuple[str, float], ...] = ()  # (name, strength): a LoRA folder name, file or hub id (zstudio.lora)
    # ControlNet (zstudio.control): `control` is the path of the control image, fitted to the output size as an edit's
    # source is. `control_type` says what it shows (canny, depth, pose, hed, ...; None/"none" = as given);
    # `control_preprocess` True derives it from a plain picture with the type's preprocessor (or names the
    # preprocessor). `control_scale` multiplies the ControlNet's hints (diffusers' controlnet_conditioning_scale);
    # control applies from `control_start` to `control_end`, shares of the schedule (diffusers' ControlNet rule).
    control: str | None = None
    control_type: str | None = None
    control_preprocess: bool | str = False
    control_scale: float = DEFAULT_CONTROL_SCALE
    control_start: float = 0.0
    control_end: float = 1.0

    def __post_init__(self) -> None:
        _check_text("prompt", self.prompt, required=True)
        _check_text("negative_prompt", self.negative_prompt, required=False)
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
            _check_number("cfg_scale", self.cfg_scale, 0, MAX_CFG, " (0 turns guidance off)")
        if isinstance(self.seed, bool) or self.seed != -1:
            _check_int_range("seed", self.seed, 0, MAX_SEED)
        _check_int_range("num_images", self.num_images, 1, MAX_IMAGES)
        if self.seed != -1 and self.seed + self.num_images - 1 > MAX_SEED:
            last = self.seed + self.num_images - 1
            raise ParamError(
                "seed",
                f"{self.seed} with {self.num_images} images would use seeds up to {last}, past {MAX_SEED}",
            )
        _check_int_range("max_sequence_length", self.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        if not isinstance(self.output_format, str):
            raise ParamError("output_format", f"must be text, got {type(self.output_format).__name__}")
        fmt = self.output_format.lower()
        if fmt == "jpg":
            fmt = "jpeg"
        if fmt not in OUTPUT_FORMATS:
            raise ParamError("output_format", f"{self.output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        object.__setattr__(self, "output_format", fmt)
        _check_number("cfg_normalization", self.cfg_normalization, 0, 10, " (0 = off)")
        _check_number("cfg_truncation", self.cfg_truncation, 0, 1)
        object.__setattr__(self, "loras", _check_loras(self.loras))
        self._check_edit()
        self._check_control()

    def _check_edit(self) -> None:
        """What can be checked without reading files; `zstudio.edit.validate` checks the files."""
        for name in ("image", "mask"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "\x00" in value):
                raise ParamError(name, f"must be the path of an image file, got {value!r}")
        if self.outpaint is not None:
            if not isinstance(self.outpaint, dict):
                raise ParamError("outpaint", f"must map sides to pixels, e.g. {{'left': 128}}, got {self.outpaint!r}")
            for side, pixels in self.outpaint.items():
                if side not in OUTPAINT_SIDES:
                    raise ParamError("outpaint", f"unknown side {side!r}; use {', '.join(OUTPAINT_SIDES)}")
                _check_int_range(f"outpaint.{side}", pixels, 0, MAX_SIDE)
            sides = {side: self.outpaint[side] for side in OUTPAINT_SIDES if self.outpaint.get(side)}
            object.__setattr__(self, "outpaint", sides or None)
        if self.strength is not None:
            _check_number("strength", self.strength, 0, 1, " (the share of the schedule re-run)")
        _check_int_range("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
        if self.image is None:
            for name in ("mask", "strength", "outpaint"):
                if getattr(self, name) is not None:
                    raise ParamError(name, "applies only to an edit: give an image too")

    def _check_control(self) -> None:
        """Ranges and names; `zstudio.control.validate` checks the file and the loaded ControlNet."""
        if self.control is not None and (not isinstance(self.control, str) or not self.control.strip()
                                         or "\x00" in self.control):  # fmt: skip
            raise ParamError("control", f"must be the path of an image file, got {self.control!r}")
        if self.control_type is not None:
            if not isinstance(self.control_type, str) or self.control_type.strip().lower() not in CONTROL_TYPES:
                raise ParamError("control_type", f"{self.control_type!r} is not one of {', '.join(CONTROL_TYPES)}")
            object.__setattr__(self, "control_type", self.control_type.strip().lower())
        preprocess = self.control_preprocess
        if isinstance(preprocess, str):
            if preprocess.strip().lower() not in CONTROL_TYPES[1:]:
                raise ParamError("control_preprocess", f"{preprocess!r} is not a preprocessor; use true or one of "
                                                       f"{', '.join(CONTROL_TYPES[1:])}")  # fmt: skip
            preprocess = preprocess.strip().lower()
            if self.control_type not in (None, preprocess):
                raise ParamError("control_preprocess", f"{preprocess} makes {preprocess} images, not "
                                                       f"control_type {self.control_type}")  # fmt: skip
            object.__setattr__(self, "control_preprocess", preprocess)
            object.__setattr__(self, "control_type", preprocess)
        elif not isinstance(preprocess, bool):
            raise ParamError("control_preprocess", f"must be true, false or a preprocessor name, got {preprocess!r}")
        elif preprocess and self.control_type in (None, "none"):
            raise ParamError("control_preprocess", "needs a control_type to preprocess for (canny, depth, ...)")
        _check_number("control_scale", self.control_scale, 0, MAX_CONTROL_SCALE, " (0 = no control)")
        _check_number("control_start", self.control_start, 0, 1, " (a share of the schedule)")
        _check_number("control_end", self.control_end, 0, 1, " (a share of the schedule)")
        if self.control_start >= self.control_end:
            raise ParamError("control_start", f"{self.control_start:g} is not before control_end "
                                              f"{self.control_end:g}: control would apply at no step")  # fmt: skip
        if self.control is None and (self.control_type is not None or self.control_preprocess):
            raise ParamError("control_type", "applies only with a control image: give control too")

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

    def megapixel_steps(self) -> float:
        """The work this request asks for (fields resolved with `with_defaults` first)."""
        return self.width * self.height * self.num_inference_steps * self.num_images / 1e6

    def check_cost(self, limit: float) -> None:
        """Refuse work above `limit` megapixel-steps, naming the limit and what to lower."""
        cost = self.megapixel_steps()
        if cost > limit:
            raise ParamError(
                "max_megapixel_steps",
                f"{self.width}x{self.height} x {self.num_inference_steps} steps x {self.num_images} images is "
                f"{cost:.0f} megapixel-steps, over this server's limit of {limit:g}; "
                "lower the size, steps or images (the limit is set by --max-megapixel-steps)",
            )

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["loras"] = [{"name": name, "strength": strength} for name, strength in self.loras]
        return data
