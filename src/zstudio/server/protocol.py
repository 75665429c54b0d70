"""Typed HTTP bodies: what the OpenAPI schema documents and clients (and the fuzzer) build requests from.

Types are checked here (strictly: no "512" for 512, no true for 1.0); ranges and everything else are checked once, by
`GenerationParams`, whose one-line errors name the field. The ranges still appear in the schema, from the same
constants.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..params import (
    CONTROL_TYPES,
    DEFAULT_CONTROL_SCALE,
    DEFAULT_MASK_BLUR,
    MAX_CFG,
    MAX_CONTROL_SCALE,
    MAX_IMAGES,
    MAX_LORA_STRENGTH,
    MAX_LORAS,
    MAX_MASK_BLUR,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SEQUENCE_LENGTH,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    SIDE_MULTIPLE,
)
from .history import FINAL, UNFINISHED


def documented(**schema) -> dict:
    """Bounds for the schema only; `GenerationParams` enforces them with its own messages."""
    return {"json_schema_extra": schema}


SIDE = documented(minimum=MIN_SIDE, maximum=MAX_SIDE, multipleOf=SIDE_MULTIPLE)
PROMPT = documented(maxLength=MAX_PROMPT_CHARS)


class LoraChoice(BaseModel):
    """One LoRA of a request: a name from GET /api/v1/loras (or a Hugging Face repo id) and its strength."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(**documented(minLength=1, maxLength=300), examples=["red-to-blue"])
    strength: float = Field(1.0, **documented(minimum=-MAX_LORA_STRENGTH, maximum=MAX_LORA_STRENGTH))


class GenerationRequest(BaseModel):
    """The body of POST /api/v1/generations: `GenerationParams`' fields; unset ones take the model's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="What to draw.", **documented(minLength=1, maxLength=MAX_PROMPT_CHARS))
    negative_prompt: str = Field("", description="Used when cfg_scale > 0.", **PROMPT)
    width: int | None = Field(None, description="Pixels; default: the model's size.", **SIDE)
    height: int | None = Field(None, description="Pixels; default: the model's size.", **SIDE)
    num_inference_steps: int | None = Field(None, **documented(minimum=1, maximum=MAX_STEPS))
    cfg_scale: float | None = Field(None, description="0 turns guidance off.", **documented(minimum=0, maximum=MAX_CFG))
    seed: int = Field(-1, description="-1 picks one at random.", **documented(minimum=-1, maximum=MAX_SEED))
    num_images: int = Field(1, **documented(minimum=1, maximum=MAX_IMAGES))
    max_sequence_length: int = Field(MAX_SEQUENCE_LENGTH, **documented(minimum=1, maximum=MAX_SEQUENCE_LENGTH))
    output_format: Literal[OUTPUT_FORMATS + ("jpg",)] = "png"  # type: ignore[valid-type]
    cfg_normalization: float = Field(0.0, **documented(minimum=0, maximum=10))
    cfg_truncation: float = Field(1.0, **documented(minimum=0, maximum=1))
    image: str | None = Field(None, description="An edit's source picture, by name: a file of the outputs folder "
                              "(outputs_....png) or an upload's name; or upload it (multipart). Never a path.",
                              examples=["outputs_20260101120000.png"])  # fmt: skip
    mask: str | None = Field(None, description="White = repaint, the image's size; by name or uploaded, as image. "
                             "Without it, an image's transparent pixels are repainted.")  # fmt: skip
    strength: float | None = Field(None, description="Share of the schedule re-run; default 0.6, 1.0 with a mask "
                                   "or an outpaint.", **documented(minimum=0, maximum=1))  # fmt: skip
    outpaint: dict[str, int] | None = Field(None, description="Pixels to add per side (left, right, top, bottom), "
                                            "repainted.", examples=[{"left": 128}])  # fmt: skip
    mask_blur: int = Field(DEFAULT_MASK_BLUR, description="Pixels of soft edge where repainted meets kept.",
                           **documented(minimum=0, maximum=MAX_MASK_BLUR))  # fmt: skip
    loras: list[LoraChoice] = Field([], description="LoRAs to apply, each with its strength; `<lora:name:0.8>` tags "
                                    "in the prompt are added to these.", **documented(maxItems=MAX_LORAS))  # fmt: skip
    control: str | None = Field(None, description="A ControlNet control image, by name as image (never a path); "
                                "needs a server started with a ControlNet.")  # fmt: skip
    control_type: Literal[CONTROL_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="What control shows; none = as given."
    )
    control_preprocess: bool | Literal[CONTROL_TYPES[1:]] = Field(  # type: ignore[valid-type]
        False,
        description="Make the control_type image from a plain picture (canny built in; depth, hed, mlsd, "
        "lineart, pose where the server has their weights).",
    )
    control_scale: float = Field(DEFAULT_CONTROL_SCALE, **documented(minimum=0, maximum=MAX_CONTROL_SCALE))
    control_start: float = Field(0.0, description="Share of the schedule where control starts.",
                                 **documented(minimum=0, maximum=1))  # fmt: skip
    control_end: float = Field(1.0, description="Where it ends.", **documented(minimum=0, maximum=1))


class OpenAIImageRequest(BaseModel):
    """OpenAI's images.generate body; fields that mean nothing here (model, quality, style, user) are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field(**documented(minLength=1, maxLength=MAX_PROMPT_CHARS))
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="Images to make (default 1).")
    size: str | None = Field(None, description='"WxH" (e.g. "1024x1024"), a preset or an aspect ratio.')
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = Field(None, description="Not in OpenAI's API: a fixed seed.", **documented(minimum=-1))
    negative_prompt: str | None = Field(None, description="Not in OpenAI's API.", **PROMPT)


class OpenAIEditRequest(BaseModel):
    """OpenAI's images.edit form fields (besides the files); model, quality, user and the like are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field(**documented(minLength=1, maxLength=MAX_PROMPT_CHARS))
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="Images to make (default 1).")
    size: str | None = Field(None, description='"WxH"; default: the image\'s own size (rounded to 16).')
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = Field(None, description="Not in OpenAI's API: a fixed seed.", **documented(minimum=-1))
    strength: float | None = Field(None, description="Not in OpenAI's API: share of the schedule re-run (0-1).")
    negative_prompt: str | None = Field(None, description="Not in OpenAI's API.", **PROMPT)


class UpscaleRequest(BaseModel):
    """POST /api/v1/upscales: an image by name (or uploaded as multipart), and how to upscale it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str = Field(description="A file of the outputs folder, or an upload's name; or upload it (multipart).",
                       examples=["outputs_20260101120000.png"])  # fmt: skip
    scale: float = Field(2.0, description="1.5, 2, 3 or 4.")
    model: str | None = Field(None, description="An upscaler's name from GET /api/v1/upscalers; default lanczos.")
    tile: int | None = Field(None, description="Tile side in input pixels, 0 = one piece; default 512.")
    refine: float | None = Field(None, description="Then re-render at the larger size by image-to-image at this "
                                 "strength, with the draft's recipe (0-1; 0.2-0.4 keeps the composition).")  # fmt: skip


# Responses. Documented (and checked against real answers in tests/test_protocol.py); the routes build them as dicts.

JobStatus = Literal[UNFINISHED + FINAL]  # type: ignore[valid-type]


class UsedParams(GenerationRequest):
    """The parameters a job ran with: the request's fields, with the model's defaults filled in once it ran."""

    model_config = ConfigDict(extra="allow", strict=False)


class UpscaleParams(BaseModel):
    """A history entry's parameters when it is an upscale: what was enlarged and how. The file's own recipe
    (`zstudio show FILE`) holds the rest: the source's size and record, the upscaler's SHA-256."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["upscale"] = Field(description="Tells an upscale's parameters from a generation's (which have none).")
    source: str = Field(description="The source image's name: a file of the outputs folder or an upload's name.",
                        examples=["outputs_20260101120000.png"])  # fmt: skip
    source_sha256: str
    scale: float
    upscaler: str = Field(description="lanczos or an upscaler's name from GET /api/v1/upscalers.")
    tile: int | None = Field(description="Tile side in input pixels; null for Lanczos.")
    refine: float | None = Field(description="The hires fix's image-to-image strength, if it was refined.")
    width: int = Field(description="The result's width in pixels.")
    height: int = Field(description="The result's height in pixels.")
    prompt: str = Field(description="The draft's prompt, when its file recorded one; else empty.")


class ImageLink(BaseModel):
    url: str = Field(description="GET it for the file.", examples=["/api/v1/images/outputs_20260101120000.png"])
    seed: int | None = Field(description="The seed that drew this image; null for an upscale.",
                             **documented(minimum=0, maximum=MAX_SEED))  # fmt: skip


class Job(BaseModel):
    """One generation, while it runs (this process) or from the history database; or a finished upscale (in the
    history only: upscales run at once, not in the queue)."""

    id: str
    kind: Literal["generation", "upscale"] = Field("generation", description="What `params` describe.")
    status: JobStatus
    params: UpscaleParams | UsedParams = Field(union_mode="left_to_right")
    step: int = Field(description="Transformer steps done so far.")
    total_steps: int | None = None
    outputs: list[str] = Field(description="File names in the outputs folder, once saved.")
    seeds: list[int] = Field(description="One per output of a generation; none for an upscale.")
    seconds: float | None = Field(None, description="Generation (or upscale) time, once done.")
    error: str | None = Field(None, description="Why it failed or was cancelled.")
    position: int | None = Field(None, description="Place in the queue while waiting (0 = next); else null.")
    images: list[ImageLink]
    created: float | None = Field(None, description="Unix time; in history entries.")
    started: float | None = None
    finished: float | None = None


class Accepted(BaseModel):
    """A job was queued."""

    id: str
    status: JobStatus
    position: int | None = Field(description="Place in the queue (0 = next).")


class HistoryPage(BaseModel):
    """Newest first; `next_offset` continues when more entries remain."""

    total: int
    limit: int
    offset: int
    next_offset: int | None
    items: list[Job]


class Deleted(BaseModel):
    deleted: str = Field(description="The job id.")
    files: list[str] = Field(description="The files removed from the outputs folder.")


class Upscaled(BaseModel):
    name: str = Field(description="The new file in the outputs folder.")
    url: str
    width: int
    height: int
    seconds: float
    recipe: dict[str, Any] = Field(description="The record inside the file: source SHA-256 and size, upscaler, ...")


class UpscalerInfo(BaseModel):
    name: str
    file: str | None = Field(description="The model file's name; null for the built-in Lanczos.")


class UpscalerList(BaseModel):
    upscalers: list[UpscalerInfo]


class LoraInfo(BaseModel):
    name: str = Field(description="What `loras[].name` and `<lora:name:0.8>` take.", examples=["red-to-blue"])
    size_mb: float


class LoraList(BaseModel):
    loras: list[LoraInfo]


class QueueState(BaseModel):
    waiting: int
    running: str | None = Field(description="The running job's id, if any.")
    worker_restarts: int


class Health(BaseModel):
    """GET /api/v1/health: 200 with status "ok" while jobs are accepted, 503 "unavailable" with the reason."""

    status: Literal["ok", "unavailable"]
    reason: str | None
    version: str
    model: str
    model_sizes: str = Field(description="The sizes the loaded model is made for.", examples=["512x512, 1024x1024"])
    model_loaded: bool
    embedded_default: bool = Field(description="True when serving the shipped demo model, not Z-Image.")
    device: str
    dtype: str
    speed: str
    memory_mode: str
    free_gpu_memory_gb: float | None
    queue: QueueState


class FieldError(BaseModel):
    loc: list[str] = Field(description='["body", FIELD]: the field that was wrong.', examples=[["body", "width"]])
    msg: str
    type: str


class InvalidRequest(BaseModel):
    """422: one line naming the field, the value and what is allowed."""

    error: str = Field(examples=["width: 1000 is not a multiple of 16; use 992 or 1008"])
    detail: list[FieldError]


class ErrorBody(BaseModel):
    """404, 409, 429 and 503 (these two with Retry-After): one line saying what was wrong."""

    error: str
    detail: str | list[FieldError] | None = None


class OpenAIImage(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    seed: int
    revised_prompt: str | None = None


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def answers(ok: type[BaseModel] | None = None, status: int = 200, **errors: type[BaseModel]) -> dict:
    """The `responses=` of a route: its success body and its error bodies (keyword `e404=ErrorBody`, ...)."""
    documented_answers: dict = {int(code[1:]): {"model": model} for code, model in errors.items()}
    if ok is not None:
        documented_answers[status] = {"model": ok}
    return documented_answers
