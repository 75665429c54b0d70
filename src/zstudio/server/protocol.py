"""Typed HTTP bodies: what the OpenAPI schema documents and clients (and the fuzzer) build requests from.

Types are checked here (strictly: no "512" for 512, no true for 1.0); ranges and everything else are checked once, by
`GenerationParams`, whose one-line errors name the field. The ranges still appear in the schema, from the same
constants.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..params import (
    MAX_CFG,
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SEQUENCE_LENGTH,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    OUTPUT_FORMATS,
    SIDE_MULTIPLE,
)


def documented(**schema) -> dict:
    """Bounds for the schema only; `GenerationParams` enforces them with its own messages."""
    return {"json_schema_extra": schema}


SIDE = documented(minimum=MIN_SIDE, maximum=MAX_SIDE, multipleOf=SIDE_MULTIPLE)
PROMPT = documented(maxLength=MAX_PROMPT_CHARS)


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


class OpenAIImageRequest(BaseModel):
    """OpenAI's images.generate body; fields that mean nothing here (model, quality, style, user) are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str = Field(**documented(minLength=1, maxLength=MAX_PROMPT_CHARS))
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="Images to make (default 1).")
    size: str | None = Field(None, description='"WxH" (e.g. "1024x1024"), a preset or an aspect ratio.')
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = Field(None, description="Not in OpenAI's API: a fixed seed.", **documented(minimum=-1))
    negative_prompt: str | None = Field(None, description="Not in OpenAI's API.", **PROMPT)
