"""The AUTOMATIC1111 WebUI API under /sdapi/v1, for the tools that already speak it (webuiapi, Open WebUI, SillyTavern,
Krita plugins).

A thin translation: txt2img's and img2img's fields become the one `GenerationParams` and go through the same job
queue as every other request (submit, then wait; a client that goes away cancels its job). Answers keep the WebUI's
shapes: `images` as base64 PNGs (the saved files, with their `parameters` text inside), `parameters` echoing the
request, `info` a JSON string. Fields this server does not implement are accepted; those that would change the
picture are listed in `info`'s `ignored`, never silently dropped. Bad values get the same one-line 422 as the rest of
the API, naming the WebUI's field. img2img's base64 pictures are kept as uploads (`server.inputs`, same byte cap) and
checked before the job is queued; /upscalers and /extra-single-image run the studio's upscalers.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..control import CANNY_THRESHOLDS
from ..params import MAX_CFG, MAX_IMAGES, MAX_SEED, MAX_STEPS, GenerationParams, ParamError
from ..upscale import LANCZOS
from .api import SafeJSONResponse, Studio, error_response, submit_or_refuse, unavailable_response, wait_finished
from .jobs import Job, JobQueue, Unavailable
from .protocol import PROMPT, SIDE, ErrorBody, InvalidRequest, answers, documented

SAMPLER = "Euler"  # the one sampler: Euler on the flow-matching schedule
SAMPLER_ALIASES = ("euler", "flow_match_euler")
# The WebUI's other txt2img fields: each leaves the picture as this server makes it, acts only with a feature that is
# reported when asked for (the hires fix's settings), or is checked in `ignored_fields`. Any other field is reported.
KNOWN_FIELDS = frozenset(
    ("hr_scale hr_upscaler hr_second_pass_steps hr_resize_x hr_resize_y hr_checkpoint_name hr_sampler_name "
     "hr_scheduler hr_prompt hr_negative_prompt hr_additional_modules denoising_strength firstphase_width "
     "firstphase_height subseed seed_resize_from_h seed_resize_from_w eta s_min_uncond s_churn s_tmax s_tmin s_noise "
     "override_settings_restore_afterwards script_args script_name alwayson_scripts save_images do_not_save_samples "
     "do_not_save_grid refiner_checkpoint refiner_switch_at disable_extra_networks comments force_task_id infotext "
     "firstpass_image").split()
)  # fmt: skip
# img2img's fields that change nothing here: the source is scaled to cover the size and centre-cropped (resize_mode),
# the repainted area starts from the noised source (inpainting_fill) at the full size (inpaint_full_res).
IMG2IMG_FIELDS = frozenset(
    ("resize_mode image_cfg_scale initial_noise_multiplier inpainting_fill inpaint_full_res inpaint_full_res_padding "
     "include_init_images mask_round").split()
)  # fmt: skip
# Our field names as the WebUI calls them, for error messages.
A1111_FIELDS = {"num_inference_steps": "steps", "num_images": "batch_size", "image": "init_images",
                "strength": "denoising_strength"}  # fmt: skip
# The WebUI's names for the built-in upscaler; "None" keeps the size (refused: nothing to do).
LANCZOS_NAMES = ("lanczos", "Lanczos")


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Unset (or null) fields take the loaded model's defaults, not the WebUI's 512x512,
    50 steps and CFG 7. Every other WebUI field is accepted; those that would change the picture are reported in
    `info.ignored`. Bounds are checked by `GenerationParams`, as on every route."""

    model_config = ConfigDict(extra="allow", strict=True)

    prompt: str = Field(description="What to draw (required here, unlike the WebUI).", **PROMPT)
    negative_prompt: str | None = Field(None, description="Used when cfg_scale > 0.", **PROMPT)
    width: int | None = Field(None, description="Pixels; default: the model's size.", **SIDE)
    height: int | None = Field(None, description="Pixels; default: the model's size.", **SIDE)
    steps: int | None = Field(None, description="Default: the model's (8 for Z-Image-Turbo).",
                              **documented(minimum=1, maximum=MAX_STEPS))  # fmt: skip
    cfg_scale: float | None = Field(None, description="Default: the model's (0, guidance off, for Turbo).",
                                    **documented(minimum=0, maximum=MAX_CFG))  # fmt: skip
    seed: int = Field(-1, description="-1 picks one; image i of the request uses seed + i.",
                      **documented(minimum=-1, maximum=MAX_SEED))  # fmt: skip
    batch_size: int = Field(1, description=f"Images per batch; batch_size x n_iter at most {MAX_IMAGES}.",
                            **documented(minimum=1, maximum=MAX_IMAGES))  # fmt: skip
    n_iter: int = Field(1, description="Batches; all run as one job here.", **documented(minimum=1, maximum=MAX_IMAGES))
    sampler_name: str | None = Field(None, description=f"Accepted; this server has one sampler, {SAMPLER}.")
    sampler_index: str | None = Field(None, description="The WebUI's older name for sampler_name.")
    scheduler: str | None = Field(None, description="Accepted; only 'automatic' (the model's schedule) is used.")
    send_images: bool = Field(True, description="False answers without the images (they are still saved).")
    enable_hr: bool = Field(False, description="Not implemented (reported as ignored when true).")
    restore_faces: bool | None = Field(None, description="Not implemented (reported as ignored when true).")
    tiling: bool | None = Field(None, description="Not implemented (reported as ignored when true).")
    styles: list[str] | None = Field(None, description="Not implemented (reported as ignored when given).")
    subseed_strength: float | None = Field(None, description="Not implemented (reported as ignored when > 0).")
    override_settings: dict[str, Any] | None = Field(
        None, description="Settings that differ from GET /sdapi/v1/options are reported as ignored."
    )


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the source picture (and mask, white = repaint), as base64."""

    init_images: list[str] = Field(description="Base64 PNG/JPEG/WebP (a data: URL is fine); the first is used.")
    mask: str | None = Field(None, description="Base64, white = repaint, the image's size.")
    denoising_strength: float | None = Field(None, description="0-1; default 0.6, 1.0 with a mask.",
                                             **documented(minimum=0, maximum=1))  # fmt: skip
    mask_blur: int | None = Field(None, description="Soft edge in pixels (default 4).")
    inpainting_mask_invert: int = Field(0, description="0: white = repaint; 1: black = repaint.")


class ExtraSingleImageRequest(BaseModel):
    """POST /sdapi/v1/extra-single-image: upscale one picture."""

    model_config = ConfigDict(extra="allow", strict=True)

    image: str = Field(description="Base64 PNG/JPEG/WebP.")
    upscaling_resize: float = Field(2.0, description="1.5, 2, 3 or 4.")
    upscaler_1: str | None = Field(None, description="'Lanczos' or a name from GET /sdapi/v1/upscalers.")


class ExtraSingleImageResponse(BaseModel):
    image: str = Field(description="The upscaled PNG, base64, its recipe inside.")
    html_info: str


class A1111Upscaler(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None = None
    scale: float | None


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNG files, as saved (with their `parameters` text).")
    parameters: dict[str, Any] = Field(description="The request, echoed.")
    info: str = Field(description="A JSON string: seed, all_seeds, prompt, sizes, sampler_name, ignored, ...")


class SdModel(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str] = {}


class Options(BaseModel):
    """The settings the WebUI's clients read; none can be changed here."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str
    sd_checkpoint_hash: str | None = None
    samples_format: str = "png"
    show_progress_every_n_steps: int = Field(-1, description="-1: no live previews (current_image is null).")


class OptionsUpdate(BaseModel):
    ignored: list[str] = Field(description="'name: why' for each setting that differs and was not applied.")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class Progress(BaseModel):
    progress: float = Field(description="0-1 for the running job; 0 when idle.")
    eta_relative: float = Field(description="Seconds left for the running job (an estimate).")
    state: ProgressState
    current_image: str | None = Field(None, description="Always null: no live previews.")
    textinfo: str | None = None


class Interrupted(BaseModel):
    interrupted: str | None = Field(description="The id of the job that will stop, or null when none ran.")


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def ignored_fields(body: Txt2ImgRequest, options: dict[str, Any]) -> list[str]:
    """'field: why' for every requested feature that would change the picture and is not implemented here."""
    ignored = []
    sampler = body.sampler_name or body.sampler_index
    if sampler and sampler.lower() not in SAMPLER_ALIASES:
        ignored.append(f"sampler_name: {sampler!r} is not available; this server has one sampler, {SAMPLER}")
    if body.scheduler and body.scheduler.lower() != "automatic":
        ignored.append(f"scheduler: {body.scheduler!r} is not available; the model's own schedule is used")
    if body.enable_hr:
        ignored.append("enable_hr: the hires fix is not implemented")
    for name in ("restore_faces", "tiling"):
        if getattr(body, name):
            ignored.append(f"{name}: not implemented")
    if body.styles:
        ignored.append("styles: saved prompt styles are not implemented")
    if body.subseed_strength:
        ignored.append("subseed_strength: variation seeds are not implemented")
    for key, value in (body.override_settings or {}).items():
        if options.get(key, object()) != value:
            ignored.append(f"override_settings.{key}: not applied (GET /sdapi/v1/options shows what is used)")
    extra = body.model_extra or {}
    if extra.get("refiner_checkpoint") not in (None, "", "None"):
        ignored.append("refiner_checkpoint: refiners are not implemented")
    if positive(extra.get("seed_resize_from_w")) and positive(extra.get("seed_resize_from_h")):
        ignored.append("seed_resize_from_w: resizing from another seed's size is not implemented")
    if positive(extra.get("s_churn")):
        ignored.append("s_churn: not implemented")
    if extra.get("script_name"):
        ignored.append(f"script_name: scripts are not available ({extra['script_name']!r})")
    scripts = extra.get("alwayson_scripts")
    others = [n for n in scripts if str(n).lower() != CONTROLNET_SCRIPT] if isinstance(scripts, dict) else scripts
    if others:
        names = ", ".join(map(str, others)) if isinstance(others, list) else "given"
        ignored.append(f"alwayson_scripts: extensions are not available ({names})")
    ignored += controlnet_ignored(body)
    ignored += [f"{key}: not a field of this API" for key in extra if key not in KNOWN_FIELDS | IMG2IMG_FIELDS]
    if isinstance(body, Img2ImgRequest):
        if len(body.init_images) > 1:
            ignored.append(f"init_images: {len(body.init_images)} given; only the first is used")
        ignored += inpaint_ignored(body)
    return ignored


def generation_params(body: Txt2ImgRequest, studio: Studio | None = None) -> GenerationParams:
    """The one parameters type from the WebUI's fields; errors name the WebUI's field. An img2img's pictures are
    kept as uploads and checked by `Studio.edit_params` (with `studio`)."""
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise ParamError(name, f"{getattr(body, name)} is below 1")
    count = body.batch_size * body.n_iter
    if count > MAX_IMAGES:
        raise ParamError(
            "batch_size",
            f"batch_size {body.batch_size} x n_iter {body.n_iter} is {count} images; at most {MAX_IMAGES} per request",
        )
    fields = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "width": body.width,
        "height": body.height,
        "num_inference_steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "seed": body.seed,
        "num_images": count,
    }
    try:
        control = controlnet_fields(body, studio)  # alwayson_scripts.controlnet (the sd-webui-controlnet extension)
        if not isinstance(body, Img2ImgRequest):
            return studio.edit_params({**fields, **control}) if control else GenerationParams(**fields)
        assert studio is not None
        if not body.init_images:
            raise ParamError("init_images", "give one base64 image")
        fields["image"] = studio.inputs.store_base64("init_images", body.init_images[0])
        fields.update(control)
        if body.mask:
            fields["mask"] = inpaint_mask(studio, body)
        fields["strength"] = body.denoising_strength
        if body.mask_blur is not None:
            fields["mask_blur"] = body.mask_blur
        return studio.edit_params(fields)
    except ParamError as err:
        names = {**A1111_FIELDS, **CONTROLNET_FIELDS}
        if err.field not in names:
            raise
        reason = str(err)[len(err.field) + 2 :]
        raise ParamError(names[err.field], reason) from None


# ------------------------------------------------------------------ ControlNet (the sd-webui-controlnet extension)
# Its request field: alwayson_scripts: {"controlnet": {"args": [unit, ...]}}, one unit per ControlNet. The loaded
# ControlNet (--controlnet) takes the one enabled unit, whatever its `model` names (a Union model reads the kind of
# control from the image). A unit maps onto the control fields: image (or input_image, or img2img's init image when
# absent) -> control, module -> control_type and control_preprocess, weight -> control_scale, guidance_start/end ->
# control_start/end. What would change the picture in the WebUI and does not here is reported in `info.ignored`.
CONTROLNET_SCRIPT = "controlnet"
UNIT = "alwayson_scripts.controlnet.args"
CONTROLNET_FIELDS = {"control": f"{UNIT}.image", "control_type": f"{UNIT}.module",
                     "control_preprocess": f"{UNIT}.module", "control_scale": f"{UNIT}.weight",
                     "control_start": f"{UNIT}.guidance_start", "control_end": f"{UNIT}.guidance_end"}  # fmt: skip
# The extension's preprocessor ("module") names, by the control type they make; "none" passes the image as given.
MODULE_PREFIXES = {"canny": "canny", "depth": "depth", "openpose": "pose", "dw_openpose": "pose",
                   "softedge": "hed", "hed": "hed", "mlsd": "mlsd", "lineart": "lineart", "scribble": "scribble",
                   "tile": "tile"}  # fmt: skip
CROP_AND_RESIZE = ("Crop and Resize", 1)  # the extension's resize_mode that is our size rule (zstudio.control)
BALANCED = ("Balanced", 0)


def controlnet_unit(body: Txt2ImgRequest) -> dict[str, Any] | None:
    """The request's one enabled ControlNet unit, or None; more than one is refused (one ControlNet is loaded)."""
    scripts = (body.model_extra or {}).get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return None
    script = next((v for k, v in scripts.items() if str(k).lower() == CONTROLNET_SCRIPT), None)
    args = script.get("args") if isinstance(script, dict) else script
    if not args:
        return None
    if not isinstance(args, list) or not all(isinstance(unit, dict) for unit in args):
        raise ParamError(UNIT, "must be a list of ControlNet units (objects)")
    units = [unit for unit in args if unit.get("enabled", True)]
    if len(units) > 1:
        raise ParamError(UNIT, f"{len(units)} units are enabled; this server runs one ControlNet unit at a time")
    return units[0] if units else None


def control_type_of(unit: dict[str, Any]) -> tuple[str, bool]:
    """(control_type, preprocess) from a unit's `module` (and, for module none, a type named in its `model`)."""
    module = str(unit.get("module") or "none").lower()
    if module == "none":
        model = str(unit.get("model") or "").lower()
        named = [kind for prefix, kind in MODULE_PREFIXES.items() if prefix in model]
        return (named[0] if named else "none"), False
    for prefix, kind in MODULE_PREFIXES.items():
        if module.startswith(prefix):
            return kind, True
    known = ", ".join(["none", *MODULE_PREFIXES])
    raise ParamError(f"{UNIT}.module", f"{module!r} is not a preprocessor this server knows ({known})")


def controlnet_fields(body: Txt2ImgRequest, studio: Studio | None) -> dict[str, Any]:
    """The control fields of the one parameters type from the enabled unit; {} without one."""
    unit = controlnet_unit(body)
    if unit is None:
        return {}
    assert studio is not None
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension's newer {"image": ..., "mask": ...}
        image = image.get("image")
    if not image and isinstance(body, Img2ImgRequest) and body.init_images:
        image = body.init_images[0]  # as the extension does: the img2img source is the control picture
    if not image:
        raise ParamError(f"{UNIT}.image", "give the control picture as base64 (image or input_image)")
    kind, preprocess = control_type_of(unit)
    fields: dict[str, Any] = {
        "control": studio.inputs.store_base64(f"{UNIT}.image", image),
        "control_type": kind,
        "control_preprocess": preprocess,
    }
    for ours, theirs in (("control_scale", "weight"), ("control_start", "guidance_start"),
                         ("control_end", "guidance_end")):  # fmt: skip
        if unit.get(theirs) is not None:
            fields[ours] = unit[theirs]
    return fields


def controlnet_ignored(body: Txt2ImgRequest) -> list[str]:
    """'field: why' for the enabled unit's settings that would change the picture in the WebUI and do not here."""
    try:
        unit = controlnet_unit(body)
    except ParamError:
        return []  # refused when the parameters are made
    if unit is None:
        return []
    ignored = []
    module = str(unit.get("module") or "none").lower()
    thresholds = (unit.get("threshold_a"), unit.get("threshold_b"))
    if module.startswith("canny") and thresholds != (None, None) and thresholds != (100, 200):
        low, high = CANNY_THRESHOLDS
        ignored.append(f"{UNIT}.threshold_a: Canny's thresholds are {low} and {high} here")
    if module != "none" and unit.get("processor_res") not in (None, -1) and not unit.get("pixel_perfect"):
        ignored.append(f"{UNIT}.processor_res: preprocessing runs at the output size (as pixel_perfect)")
    if unit.get("resize_mode") not in (None, *CROP_AND_RESIZE):
        ignored.append(f"{UNIT}.resize_mode: the control image is scaled to cover the size and centre-cropped "
                       "(Crop and Resize)")  # fmt: skip
    if unit.get("control_mode") not in (None, *BALANCED):
        ignored.append(f"{UNIT}.control_mode: only Balanced")
    if unit.get("mask") or (isinstance(unit.get("image"), dict) and unit["image"].get("mask")):
        ignored.append(f"{UNIT}.mask: a unit's own mask is not used (img2img's mask is)")
    return ignored


# ------------------------------------------------------------------------------------- img2img's inpaint fields
def inpaint_mask(studio: Studio, body: Img2ImgRequest) -> str:
    """The request's mask kept as an upload, white = repaint: inverted first with `inpainting_mask_invert` 1 (the
    WebUI's "inpaint not masked": black = repaint)."""
    if body.inpainting_mask_invert not in (0, 1):
        raise ParamError("inpainting_mask_invert", f"{body.inpainting_mask_invert!r} is not 0 (white = repaint) or 1 "
                                                   "(black = repaint)")  # fmt: skip
    name = studio.inputs.store_base64("mask", body.mask)
    return studio.inputs.inverted_mask("mask", name) if body.inpainting_mask_invert else name


def inpaint_ignored(body: Img2ImgRequest) -> list[str]:
    """The WebUI's inpaint settings that would change the picture and are not implemented: a fill other than
    "original" (the masked area starts from the noised source; it matters only below strength 1, where the start
    is not pure noise) and "only masked" (`inpaint_full_res`: here the whole picture is drawn at the output size).
    Both change nothing without a mask, as in the WebUI."""
    if not body.mask:
        return []
    extra, ignored = body.model_extra or {}, []
    fill = extra.get("inpainting_fill")
    strength = 1.0 if body.denoising_strength is None else body.denoising_strength
    if fill not in (None, 1) and strength < 1:
        ignored.append(f"inpainting_fill: {fill!r} is not implemented; the masked area starts from the noised source "
                       "(1, 'original')")  # fmt: skip
    if extra.get("inpaint_full_res"):
        ignored.append("inpaint_full_res: 'only masked' is not implemented; the whole picture is drawn at the output "
                       "size")  # fmt: skip
    return ignored


def running_job(queue: JobQueue) -> Job | None:
    """The job the worker is running, if any (a job is finished a moment before the worker lets go of it)."""
    job_id = queue.running
    job = queue.get(job_id) if job_id else None
    return job if job is not None and not job.finished else None


def model_title(studio: Studio) -> str:
    return studio.queue.generator.info()["model"]


def current_options(studio: Studio) -> dict[str, Any]:
    return Options(sd_model_checkpoint=model_title(studio)).model_dump()


def info_text(job: Job, body: Txt2ImgRequest, model: str, infotexts: list[str], ignored: list[str]) -> str:
    """`info` as the WebUI writes it: a JSON string describing what was made."""
    p = job.params
    seeds = job.seeds or [p.seed]
    count = len(seeds)
    return json.dumps(
        {
            "prompt": p.prompt,
            "all_prompts": [p.prompt] * count,
            "negative_prompt": p.negative_prompt,
            "all_negative_prompts": [p.negative_prompt] * count,
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * count,
            "subseed_strength": 0,
            "width": p.width,
            "height": p.height,
            "sampler_name": SAMPLER,
            "scheduler": "Automatic",
            "cfg_scale": p.cfg_scale,
            "steps": p.num_inference_steps,
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "restore_faces": False,
            "sd_model_name": model,
            "sd_model_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": p.strength,
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": f"zstudio {__version__}",
            "interrupted": job.status == "cancelled",
            "ignored": ignored,
        },
        ensure_ascii=False,
    )


def read_images(studio: Studio, names: list[str]) -> tuple[list[str], list[str]]:
    """(base64 files, their `parameters` texts) for the saved images."""
    images, infotexts = [], []
    for name in names:
        raw = (studio.outputs / name).read_bytes()
        images.append(base64.b64encode(raw).decode())
        with Image.open(io.BytesIO(raw)) as image:
            infotexts.append(image.text.get("parameters", ""))
    return images, infotexts


def build_a1111_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"], default_response_class=SafeJSONResponse)
    queue = studio.queue

    async def run(request: Request, body: Txt2ImgRequest):
        """Submit, wait, answer in the WebUI's shape (synchronously, as the WebUI does)."""
        ignored = ignored_fields(body, current_options(studio))
        job = await run_in_threadpool(submit_or_refuse, queue, lambda: generation_params(body, studio))
        if not isinstance(job, Job):
            return job
        if not await wait_finished(request, queue, job):
            return Response(status_code=499)  # nobody reads it: the client has gone
        if job.status == "failed":
            reason = job.error or "the job failed"
            return unavailable_response(reason) if queue.unavailable() else error_response(500, reason)
        images, infotexts = [], []
        if job.status == "done":
            images, infotexts = await run_in_threadpool(read_images, studio, job.outputs)
        info = info_text(job, body, model_title(studio), infotexts, ignored)
        parameters = body.model_dump(exclude={"init_images", "mask"})  # the pictures are not echoed back
        return {"images": images if body.send_images else [], "parameters": parameters, "info": info}

    @router.post("/txt2img", response_model=Txt2ImgResponse,
                 responses=answers(e422=InvalidRequest, e429=ErrorBody, e500=ErrorBody, e503=ErrorBody))  # fmt: skip
    async def txt2img(request: Request, body: Txt2ImgRequest):
        """Make batch_size x n_iter images and answer with them, synchronously as the WebUI does. A client that goes
        away cancels its job; POST /sdapi/v1/interrupt stops it (then `images` is empty and info says interrupted)."""
        return await run(request, body)

    @router.post("/img2img", response_model=Txt2ImgResponse,
                 responses=answers(e422=InvalidRequest, e429=ErrorBody, e500=ErrorBody, e503=ErrorBody))  # fmt: skip
    async def img2img(request: Request, body: Img2ImgRequest):
        """Image-to-image, or inpainting with `mask` (white = repaint), as txt2img answers. The source is scaled to
        cover width x height and centre-cropped (never stretched); without a size, the result has the source's."""
        return await run(request, body)

    @router.get("/upscalers", response_model=list[A1111Upscaler])
    def upscalers():
        found = [{"name": name, "model_name": name, "model_path": path.name, "scale": None}
                 for name, path in studio.upscaler_names().items()]  # fmt: skip
        return [{"name": "Lanczos", "model_name": None, "model_path": None, "scale": 4}, *found]

    @router.post("/extra-single-image", response_model=ExtraSingleImageResponse,
                 responses=answers(e422=InvalidRequest, e503=ErrorBody))  # fmt: skip
    def extra_single_image(body: ExtraSingleImageRequest):
        """Upscale one picture by `upscaling_resize` with `upscaler_1`; the answer is the saved PNG."""
        from .protocol import UpscaleRequest

        try:
            name = body.upscaler_1 if body.upscaler_1 not in LANCZOS_NAMES else LANCZOS
            if name in (None, "None"):
                raise ParamError("upscaler_1", "name an upscaler (GET /sdapi/v1/upscalers), e.g. Lanczos")
            image = studio.inputs.store_base64("image", body.image)
            result = studio.upscale(UpscaleRequest(image=image, scale=body.upscaling_resize, model=name))
        except ParamError as err:
            field = {"scale": "upscaling_resize", "model": "upscaler_1"}.get(err.field, err.field)
            reason = str(err)[len(err.field) + 2 :]
            return error_response(422, f"{field}: {reason}", field)
        except Unavailable as err:
            return unavailable_response(str(err))
        raw = (studio.outputs / result["name"]).read_bytes()
        return {"image": base64.b64encode(raw).decode(), "html_info": json.dumps(result["recipe"]["upscale"])}

    @router.get("/options", response_model=Options)
    def get_options():
        return current_options(studio)

    @router.post("/options", response_model=OptionsUpdate, responses=answers(e422=InvalidRequest))
    def set_options(body: dict[str, Any]):
        """Accepts the WebUI's settings; none can change here. Each one that differs from GET's is listed as ignored
        (sending GET's answer back, as Open WebUI does, changes nothing and ignores nothing)."""
        options = current_options(studio)
        ignored = []
        for key, value in body.items():
            if key == "sd_model_checkpoint" and value != options[key]:
                ignored.append(f"{key}: this server serves one model, {options[key]}; start it with --model to change")
            elif options.get(key, object()) != value:
                ignored.append(f"{key}: not a setting of this server")
        return {"ignored": ignored}

    @router.get("/sd-models", response_model=list[SdModel])
    def sd_models():
        info = queue.generator.info()
        return [{"title": info["model"], "model_name": info["model"], "filename": info["model_path"] or ""}]

    @router.get("/samplers", response_model=list[Sampler])
    def samplers():
        return [{"name": SAMPLER, "aliases": list(SAMPLER_ALIASES), "options": {}}]

    @router.get("/scripts")
    def scripts():
        """No scripts or extensions (webuiapi asks at start)."""
        return {"txt2img": [], "img2img": []}

    @router.get("/progress", response_model=Progress, responses=answers(e422=InvalidRequest))
    def progress(skip_current_image: bool = False):
        """The running job's progress (0-1), an ETA in seconds, and the WebUI's state block."""
        job = running_job(queue)
        waiting = len(queue.waiting)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": {"job_count": waiting}, "current_image": None}
        done = job.step / job.total_steps if job.total_steps else 0.0
        record = queue.history.get(job.id) or {}
        elapsed = time.time() - (record.get("started") or time.time())
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state = {
            "interrupted": job.cancel_requested,
            "job": job.id,
            "job_count": waiting + 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(record.get("started") or time.time())),
            "sampling_step": job.step,
            "sampling_steps": job.total_steps,
        }
        return {"progress": round(done, 4), "eta_relative": round(max(eta, 0.0), 2), "state": state,
                "current_image": None, "textinfo": f"step {job.step}/{job.total_steps}"}  # fmt: skip

    @router.post("/interrupt", response_model=Interrupted)
    def interrupt():
        """Stop the running job at its next transformer block (waiting jobs stay, as in the WebUI)."""
        job = running_job(queue)
        if job is not None:
            queue.cancel(job.id)
        return {"interrupted": job.id if job else None}

    return router
