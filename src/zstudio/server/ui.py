"""The web UI (Gradio Blocks), a thin layer over the same job queue as the HTTP API.

Tabs: Generate, Image to image, Inpaint / Outpaint, Upscale and History. The job tabs share one recipe block (steps,
CFG, seed, images and a LoRA accordion of the LoRA folder's files) and one ControlNet panel (`control_panel`, built
per tab). Edits go through the job queue like generations (so they are in the history, saved with their recipe);
upscaling goes through `Studio.run_upscale` (the generator's lock, in the handler's thread; recorded in the history
as a done entry). Every result gallery, and the history's selected entry, can be sent to the edit tabs with its
recipe, control included; "Use these settings" on an upscale fills the Upscale tab.
"""

from __future__ import annotations

import base64
import html
import io
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from .. import edit, upscale
from ..control import preprocessor_choices
from ..models import Profile
from ..outputs import read_metadata
from ..params import (
    ASPECT_RATIOS,
    DEFAULT_CONTROL_SCALE,
    DEFAULT_MASK_BLUR,
    MAX_CONTROL_SCALE,
    MAX_IMAGES,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    MAX_MASK_BLUR,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    OUTPAINT_SIDES,
    GenerationParams,
    ParamError,
)
from .api import Studio, status
from .i18n import I18N, language, text
from .inputs import IMAGE_NAME
from .jobs import QueueFull, Unavailable

HISTORY_PAGE = 24
HIRES_SIDE = 1024  # "Re-render at 1024": the draft's long side after the hires fix
HIRES_STRENGTH = 0.3  # low enough that the draft's composition stays
LORA_ROWS = 4  # LoRA rows per tab (requests take up to params.MAX_LORAS; a record's first LORA_ROWS are restored)
NO_LORA = "—"  # a LoRA row's empty choice
LORA_STRENGTH = 1.0


def status_line(studio: Studio, lang: str = "en") -> str:
    s = status(studio)
    gb = s["free_gpu_memory_gb"]
    free = text(lang, "free_memory", gb=gb) if gb is not None else text(lang, "not_available")
    line = text(lang, "status", model=s["model"], device=s["device"], dtype=s["dtype"], speed=s["speed"],
                memory=s["memory_mode"], free=free, waiting=s["queue"]["waiting"])  # fmt: skip
    if s["embedded_default"]:
        line = text(lang, "not_z_image", model=s["model"]) + "\n\n" + line
    return line


def error_message(lang: str, err: Exception) -> str:
    """A refusal in the page's language, ahead of the engine's own English line (which names field and value)."""
    kind = "invalid" if isinstance(err, ParamError) else "busy" if isinstance(err, QueueFull) else "unavailable"
    return text(lang, kind, error=err)


def progress_html(text: str, step: int = 0, total: int = 0, key: str = "zstudio-progress") -> str:
    bar = f'<progress value="{step}" max="{total}" style="width:100%"></progress>' if total else ""
    return f'<div id="{key}">{text}{bar}</div>'


# ------------------------------------------------------------------------------- what the tabs do, outside Gradio
def recipe_fields(prompt: str, negative: str, steps: float, cfg: float, seed: float, count: float) -> dict[str, Any]:
    """The shared controls' values as GenerationParams fields (sliders and number boxes send floats)."""
    return {
        "prompt": prompt,
        "negative_prompt": negative,
        "num_inference_steps": int(steps),
        "cfg_scale": float(cfg),
        "seed": int(seed),
        "num_images": int(count),
    }


def lora_pairs(values: Sequence[Any]) -> tuple[tuple[str, float], ...]:
    """The LoRA rows' values (name, strength, name, strength, ...) as `GenerationParams.loras`; rows without a name
    are left out."""
    pairs = []
    for name, strength in zip(values[::2], values[1::2]):
        name = (name or "").strip()
        if name and name != NO_LORA:
            pairs.append((name, float(LORA_STRENGTH if strength is None else strength)))
    return tuple(pairs)


def lora_rows(loras: Iterable[Any] | None) -> list[Any]:
    """A recipe's LoRAs (JSON {"name", "strength"} dicts or (name, strength) pairs) as the rows' values, the rest
    cleared: restoring a recipe restores its LoRAs, or none."""
    values: list[Any] = []
    for item in list(loras or [])[:LORA_ROWS]:
        name, strength = (item["name"], item["strength"]) if isinstance(item, dict) else item
        values += [name, float(strength)]
    return values + [NO_LORA, LORA_STRENGTH] * (LORA_ROWS - len(values) // 2)


def lora_choices(studio: Studio) -> list[str]:
    """The dropdowns' choices: the empty one, then the LoRA folder's files (rescanned now)."""
    return [NO_LORA, *(f.name for f in studio.queue.generator.loras.folder.available())]


def lora_note(studio: Studio, lang: str) -> str:
    """The line the accordion shows when the LoRA folder holds none (empty when it holds some)."""
    folder = studio.queue.generator.loras.folder
    return "" if folder.available() else text(lang, "no_loras", folder=folder.folder.resolve())


def run_job(studio: Studio, lang: str, make_params: Callable[[], GenerationParams], key: str = "zstudio-progress"
            ) -> Iterator[tuple]:  # fmt: skip
    """Submit to the job queue and follow the job, as the HTTP API does. Yields (gallery, progress, job id, first
    seed, status line, output files, chosen file); a refusal is a `gr.Error` in the page's language."""
    queue = studio.queue
    try:
        job = queue.submit(make_params())
    except (ParamError, QueueFull, Unavailable) as err:  # tell the user, keep the page alive
        raise gr.Error(error_message(lang, err)) from None
    keep = gr.update()
    while not job.finished:
        seen = job.version
        if job.status == "queued":
            shown = progress_html(text(lang, "queued", position=queue.position(job.id)), key=key)
        else:
            shown = progress_html(text(lang, "step", step=job.step, total=job.total_steps), job.step,
                                  job.total_steps, key)  # fmt: skip
        yield keep, shown, job.id, keep, status_line(studio, lang), keep, keep
        queue.wait(job, seen, 1.0)
    if job.status != "done":
        ended = text(lang, "ended", status=text(lang, job.status), error=job.error or "")
        yield keep, progress_html(ended, key=key), None, keep, status_line(studio, lang), keep, keep
        return
    per_image = (job.seconds or 0) / max(1, len(job.outputs))
    files = [str(studio.outputs / name) for name in job.outputs]
    images = [(f, text(lang, "caption", seed=sd, seconds=per_image)) for f, sd in zip(files, job.seeds)]
    done = progress_html(text(lang, "done", count=len(images), seconds=job.seconds, seeds=job.seeds), key=key)
    yield images, done, None, job.seeds[0], status_line(studio, lang), files, files[0]


def inputs_folder(studio: Studio) -> Path:
    """Where edit inputs are kept: the state folder, beside the history whose recipes name them (never served)."""
    return studio.inputs.folder


def keep_file(studio: Studio, path: str) -> str:
    """A byte-for-byte copy of an uploaded or sent file in the inputs folder, named by its SHA-256: Gradio's cache
    copies can be deleted, and the copy keeps the recipe's hash equal to the file's (and a sent result's recipe)."""
    return studio.inputs.keep_copy(path)


def painted_mask(layers: list[Image.Image] | None) -> Image.Image | None:
    """The image editor's brush strokes as a mask: white wherever a layer is painted (alpha > 0); None if none is."""
    painted = None
    for layer in layers or []:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if painted is not None and painted.shape != alpha.shape:
            raise ParamError("mask", f"painted layers of {painted.shape[::-1]} and {alpha.shape[::-1]} px differ")
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return Image.fromarray(painted.astype(np.uint8) * 255, "L")


def edit_request(studio: Studio, recipe: dict[str, Any], image: str, mask: Image.Image | None = None,
                 strength: float | None = None, width: float = 0, height: float = 0,
                 outpaint: dict[str, int] | None = None, mask_blur: float = DEFAULT_MASK_BLUR
                 ) -> GenerationParams:  # fmt: skip
    """An edit's parameters, its files checked by `edit.validate` before queueing (bad file, mask size, sizes the
    model cannot draw) and kept in the inputs folder. Width or height 0: the source's."""
    stored = edit.store_inputs({"mask": mask}, inputs_folder(studio))
    params = GenerationParams(**recipe, image=image, mask=stored["mask"], strength=strength, width=int(width) or None,
                              height=int(height) or None, outpaint=outpaint, mask_blur=int(mask_blur))  # fmt: skip
    checked = edit.validate(params, studio.queue.generator.profile)
    return checked.params.replace(image=keep_file(studio, image))


def inpaint_request(studio: Studio, recipe: dict[str, Any], editor: dict[str, Any], strength: float, width: float,
                    height: float, outpaint: dict[str, int], mask_blur: float) -> GenerationParams:  # fmt: skip
    """The image editor's value (background = the source, painted layers = the mask) as an edit's parameters."""
    background = editor["background"].convert("RGB")  # the canvas' own transparency is not a mask here
    image = edit.store_inputs({"image": background}, inputs_folder(studio))["image"]
    outpaint = {side: int(pixels or 0) for side, pixels in outpaint.items()}
    return edit_request(studio, recipe, image, painted_mask(editor.get("layers")), strength, width, height,
                        outpaint if any(outpaint.values()) else None, mask_blur)  # fmt: skip


def upscale_source(studio: Studio, path: str) -> tuple[str, str]:
    """The file to upscale and its name for the history: a result of the outputs folder by its own name (Gradio
    hands the handler a cache copy under the same name), anything else kept in the inputs folder by its SHA-256, so
    "Use these settings" can find it again."""
    name = Path(path).name
    original = studio.outputs / name
    if IMAGE_NAME.match(name) and original.is_file() and _same_bytes(original, Path(path)):
        return str(original), name
    kept = keep_file(studio, path)
    return kept, Path(kept).name


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def upscale_job(studio: Studio, lang: str, path: str | None, scale: float, model: str, refine: float
                ) -> Iterator[tuple]:  # fmt: skip
    """Upscale through `Studio.run_upscale` (it waits for the generator's lock; the result lands in the history)
    and save beside the generations. Yields (gallery, progress, output files, chosen file)."""
    if not path:
        raise gr.Error(text(lang, "no_image"))
    keep = gr.update()
    yield keep, progress_html(text(lang, "upscaling"), key="upscale-progress"), keep, keep
    try:
        source, name = upscale_source(studio, path)
        result = studio.run_upscale(source, name, float(scale), model, refine=float(refine or 0) or None)
    except (ParamError, Unavailable) as err:
        raise gr.Error(error_message(lang, err)) from None
    except OSError as err:  # a full disk, a file gone meanwhile
        raise gr.Error(text(lang, "refused", error=err)) from None
    width, height = result.image.size
    done = text(lang, "upscaled", width=width, height=height, seconds=result.seconds, upscaler=model)
    file = str(result.path)
    yield [(file, f"{width}x{height}")], progress_html(done, key="upscale-progress"), [file], file


def is_upscale(record: dict[str, Any]) -> bool:
    return record["params"].get("kind") == "upscale"


def history_caption(record: dict[str, Any], lang: str) -> str:
    p = record["params"]
    if is_upscale(record):
        return f"{text(lang, 'upscale_caption', scale=p['scale'], prompt=p['prompt'][:50])} · {record['status']}"
    return f"{p['prompt'][:60]} · {record['status']}"


def record_text(record: dict[str, Any], lang: str, recipe: dict[str, Any] | None = None) -> str:
    """The selected history entry, described: a generation's recipe, or what an upscale enlarged and how; with
    `recipe` (its first file's record), also an edit's or an upscale's source (size, SHA-256), mask and settings."""
    p, seconds = record["params"], record["seconds"] or 0
    if is_upscale(record):
        line = text(lang, "upscale_record", scale=p["scale"], source=p["source"], upscaler=p["upscaler"],
                    refine=p["refine"] or 0, width=p["width"], height=p["height"], seconds=seconds,
                    prompt=p["prompt"])  # fmt: skip
        return line + (f"  \n{upscale_text(recipe, lang)}" if recipe and "upscale" in recipe else "")
    line = text(lang, "record", prompt=p["prompt"], negative=p["negative_prompt"] or "—", width=p["width"],
                height=p["height"], steps=p["num_inference_steps"], cfg=p["cfg_scale"], seeds=record["seeds"],
                seconds=seconds)  # fmt: skip
    return line + (f"  \n{edit_text(recipe, lang)}" if recipe and recipe.get("edit") else "")


def edit_text(recipe: dict[str, Any], lang: str) -> str:
    """An edited picture's recipe in one line: mode, source (name, size, format, SHA-256), strength, how it was fitted,
    the mask (name and SHA-256, or where it came from), its blur and any outpaint."""
    p, done = recipe["params"], recipe["edit"]
    source, mask = done["source"], done.get("mask") or {}
    line = text(lang, "edit_record", mode=text(lang, f"mode_{done['mode']}"), image=Path(p["image"]).name,
                size=f"{source['width']}x{source['height']}", format=source["format"], sha256=source["sha256"],
                strength=done["strength"], fit=text(lang, f"fit_{done['fit']}"), width=p["width"],
                height=p["height"])  # fmt: skip
    if mask.get("from") == "file":
        line += text(lang, "edit_mask_file", mask=Path(p["mask"] or "").name, sha256=mask.get("sha256"),
                     blur=done["mask_blur"])  # fmt: skip
    elif mask:
        line += text(lang, f"edit_mask_{mask['from']}", blur=done["mask_blur"])
    if done.get("outpaint"):
        line += text(lang, "edit_outpaint", sides=", ".join(f"{side} {px}" for side, px in done["outpaint"].items()))
    return line


def upscale_text(recipe: dict[str, Any], lang: str) -> str:
    """An upscale's source (size, SHA-256) and upscaler (architecture, native scale) from its file's recipe."""
    source, model = recipe["source"], recipe["upscale"]["upscaler"]
    return text(lang, "upscale_source", width=source["width"], height=source["height"], sha256=source["sha256"],
                upscaler=model["name"], architecture=model["architecture"],
                native=f"{model['native_scale']}x" if model["native_scale"] else "—")  # fmt: skip


def file_recipe(path: Path) -> dict[str, Any] | None:
    """A file's zstudio record, or None (gone, or made by another tool)."""
    try:
        return read_metadata(path)
    except (ValueError, OSError):
        return None


def upscale_settings(studio: Studio, record: dict[str, Any], lang: str) -> tuple[Any, Any, Any, Any]:
    """An upscale entry's settings for the Upscale tab: its source (when still here), scale, upscaler (when still
    known) and refine strength. A source gone is a warning; the rest is still filled."""
    p = record["params"]
    try:
        image: Any = studio.inputs.resolve("image", p["source"])
    except ParamError:
        gr.Warning(text(lang, "source_gone", source=p["source"]))
        image = gr.update()
    known = p["upscaler"] == upscale.LANCZOS or p["upscaler"] in studio.upscaler_names()
    return image, p["scale"], p["upscaler"] if known else gr.update(), p["refine"] or 0


def recipe_of(path: str) -> dict[str, Any] | None:
    """The generation parameters a file records, if it carries zstudio's record."""
    try:
        return read_metadata(path).get("params")
    except (ValueError, OSError):
        return None


def recipe_updates(path: str) -> list[Any]:
    """Prompt, negative prompt, steps, CFG, seed and the LoRA rows from a sent file's own recipe (unchanged where it
    has none)."""
    params = recipe_of(path)
    if not params:
        return [gr.update()] * (5 + 2 * LORA_ROWS)
    names = ("prompt", "negative_prompt", "num_inference_steps", "cfg_scale", "seed")
    return [*(params.get(name, gr.update()) for name in names), *lora_rows(params.get("loras"))]


def hires_request(path: str, side: int = HIRES_SIDE, strength: float = HIRES_STRENGTH) -> GenerationParams:
    """The hires fix of a draft as an image-to-image request (upscale.refine_request): the draft's own recipe at
    `side` px on its long side, at a low strength. The edit's fit enlarges the draft (Lanczos) before it runs."""
    source = upscale.open_source(path, 1.0)
    width, height = source.image.size
    size = upscale.refine_size(width, height, side / max(width, height))
    return upscale.refine_request(source, source.path, size, strength)


# A recipe's fields the edit tabs have no control for: sending a result to a tab (or re-rendering it) keeps them in
# the tab's state, so the job it runs has the source's full recipe; a new upload clears them.
HIDDEN_FIELDS = ("max_sequence_length", "output_format", "cfg_normalization", "cfg_truncation")


def hidden_fields(params: dict[str, Any] | GenerationParams | None) -> dict[str, Any]:
    """The fields of a recipe that no control of the edit tabs shows, and all its LoRAs when they are more than the
    LoRA rows hold."""
    if isinstance(params, GenerationParams):
        params = params.to_dict()
    if not params:
        return {}
    hidden = {name: params[name] for name in HIDDEN_FIELDS if name in params}
    if len(params.get("loras") or ()) > LORA_ROWS:
        hidden["loras"] = lora_pairs(_flat_loras(params["loras"]))
    return hidden


def _flat_loras(loras: Iterable[Any]) -> list[Any]:
    values: list[Any] = []
    for item in loras:
        values += [item["name"], item["strength"]] if isinstance(item, dict) else list(item)
    return values


def with_hidden(fields: dict[str, Any], hidden: dict[str, Any] | None) -> dict[str, Any]:
    """A tab's fields with the sent recipe's hidden ones; its LoRAs past the rows only while the rows still show its
    first ones (rows the user changed win)."""
    hidden = dict(hidden or {})
    loras = hidden.pop("loras", None)
    fields = {**fields, **hidden}
    if loras and tuple(fields.get("loras", ())) == tuple(loras[:LORA_ROWS]):
        fields["loras"] = loras
    return fields


# ---------------------------------------------------------------------------------------------------- the page
@dataclass
class Recipe:
    """The controls every job tab shares: `controls` in the order `recipe_fields` takes them, and the LoRA rows
    (`loras`: name, strength, name, strength, ...; handlers take them last, as `lora_pairs` does)."""

    prompt: gr.Textbox
    negative: gr.Textbox
    steps: gr.Slider
    cfg: gr.Slider
    seed: gr.Number
    count: gr.Slider
    loras: list[gr.components.Component]
    lora_names: list[gr.Dropdown]
    lora_note: gr.Markdown
    lora_refresh: gr.Button

    @property
    def controls(self) -> list[gr.components.Component]:
        return [self.prompt, self.negative, self.steps, self.cfg, self.seed, self.count]


def prompt_controls(prefix: str) -> tuple[gr.Textbox, gr.Textbox]:
    prompt = gr.Textbox(
        label=I18N("prompt"), lines=3, elem_id=f"{prefix}prompt", placeholder=I18N("prompt_placeholder")
    )
    return prompt, gr.Textbox(label=I18N("negative"), lines=1, elem_id=f"{prefix}negative")


def lora_controls(prefix: str, choices: list[str]) -> tuple[list[gr.components.Component], gr.Markdown, gr.Button]:
    """The LoRA accordion: LORA_ROWS rows of (LoRA, strength), a refresh button and the empty-folder line. Names not
    in the folder are kept (a restored recipe's LoRA since removed): the queue refuses them in one line."""
    rows: list[gr.components.Component] = []
    with gr.Accordion(I18N("loras"), open=False, elem_id=f"{prefix}loras"):
        note = gr.Markdown(visible=len(choices) <= 1, elem_id=f"{prefix}lora-note")  # filled on load
        for i in range(LORA_ROWS):
            with gr.Row():
                rows.append(gr.Dropdown(choices, value=NO_LORA, label=I18N("lora"), allow_custom_value=True,
                                        scale=3, elem_id=f"{prefix}lora-{i}"))  # fmt: skip
                rows.append(gr.Slider(-2, 2, value=LORA_STRENGTH, step=0.05, label=I18N("lora_strength"), scale=2,
                                      elem_id=f"{prefix}lora-strength-{i}"))  # fmt: skip
        refresh = gr.Button(I18N("refresh_loras"), size="sm", elem_id=f"{prefix}lora-refresh")
    return rows, note, refresh


def recipe_controls(profile: Profile, prefix: str, prompt: gr.Textbox, negative: gr.Textbox, last_seed: gr.State,
                    lora_names: list[str]) -> Recipe:  # fmt: skip
    """Steps, CFG, seed (dice, reuse the last one), images, with the loaded model's defaults, and the LoRA rows
    (`lora_names`: the dropdowns' first choices; `build_ui` wires the refresh)."""
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, value=profile.num_inference_steps, step=1, label=I18N("steps"),
                          elem_id=f"{prefix}steps", info=I18N("steps_info"))  # fmt: skip
        cfg = gr.Slider(0, 20, value=profile.cfg_scale, step=0.1, label=I18N("cfg"))
    with gr.Row():
        seed = gr.Number(value=-1, precision=0, label=I18N("seed"), elem_id=f"{prefix}seed")
        dice = gr.Button("🎲", size="sm")
        reuse = gr.Button(I18N("reuse_seed"), size="sm")
        count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label=I18N("images"), elem_id=f"{prefix}images")
    loras, note, refresh = lora_controls(prefix, lora_names)
    dice.click(lambda: random.randint(0, MAX_SEED - MAX_IMAGES), outputs=seed)
    reuse.click(lambda s: s if s is not None else -1, last_seed, seed)
    return Recipe(prompt, negative, steps, cfg, seed, count, loras, loras[::2], note, refresh)


def run_buttons(label: str, elem_id: str) -> tuple[gr.Button, gr.Button]:
    """A tab's run button and its cancel button, side by side."""
    with gr.Row():
        run = gr.Button(I18N(label), variant="primary", elem_id=elem_id)
        cancel = gr.Button(I18N("cancel"), variant="stop")
    return run, cancel


def source_image(prefix: str) -> gr.Image:
    """An upload box that hands the handler the file itself (its bytes, so its hash and recipe, unchanged)."""
    return gr.Image(label=I18N("source_image"), type="filepath", sources=["upload", "clipboard"],
                    elem_id=f"{prefix}image")  # fmt: skip


def edit_size_controls(profile: Profile, prefix: str) -> tuple[gr.Slider, gr.Slider]:
    """Output width and height for an edit; 0 keeps the source's (rounded down to a multiple of 16)."""
    with gr.Row():
        width = gr.Slider(
            0, profile.side_range[1], value=0, step=16, label=I18N("edit_width"), elem_id=f"{prefix}width"
        )
        height = gr.Slider(0, profile.side_range[1], value=0, step=16, label=I18N("edit_height"),
                           elem_id=f"{prefix}height")  # fmt: skip
    return width, height


@dataclass
class SendButtons:
    """What any result can be sent to."""

    img2img: gr.Button
    inpaint: gr.Button
    upscale2: gr.Button
    rerender: gr.Button


def send_buttons(prefix: str, profile: Profile) -> SendButtons:
    with gr.Row():
        return SendButtons(
            gr.Button(I18N("send_img2img"), size="sm", elem_id=f"{prefix}send-img2img"),
            gr.Button(I18N("send_inpaint"), size="sm", elem_id=f"{prefix}send-inpaint"),
            gr.Button(I18N("upscale_x2"), size="sm", elem_id=f"{prefix}upscale-x2"),
            gr.Button(
                I18N("rerender"), size="sm", elem_id=f"{prefix}rerender", visible=profile.max_side >= HIRES_SIDE
            ),  # fmt: skip
        )


@dataclass
class ResultPanel:
    """A tab's progress line and result gallery; `chosen` is the result the send buttons send (the first, or the
    one clicked)."""

    progress: gr.HTML
    gallery: gr.Gallery
    files: gr.State
    chosen: gr.State
    sends: SendButtons


def result_panel(profile: Profile, prefix: str, progress_id: str, gallery_id: str) -> ResultPanel:
    progress = gr.HTML(progress_html("", key=progress_id))
    gallery = gr.Gallery(label=I18N("result"), columns=2, height="auto", elem_id=gallery_id)
    files, chosen = gr.State([]), gr.State(None)
    sends = send_buttons(prefix, profile)

    def pick(paths: list[str], evt: gr.SelectData) -> str | None:
        return paths[evt.index] if evt.index is not None and evt.index < len(paths) else None

    gallery.select(pick, files, chosen)
    return ResultPanel(progress, gallery, files, chosen, sends)


# ------------------------------------------------------------------------ the ControlNet panel (zstudio.control)


@dataclass
class ControlPanel:
    """A job tab's ControlNet accordion; `controls` are the handlers' inputs, in order (what `control_fields` takes,
    and what `control_values` restores)."""

    image: gr.Image
    kind: gr.Dropdown
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    preview_button: gr.Button
    preview: gr.HTML  # `preview_html`'s inline picture

    @property
    def controls(self) -> list[gr.components.Component]:
        return [self.image, self.kind, self.scale, self.start, self.end]


def control_panel(loaded: bool, choices: list[str], prefix: str = "") -> ControlPanel:
    """The accordion, built once per job tab (`prefix` keeps its elem_ids apart): without a loaded ControlNet only a
    one-line note says how to start with one."""
    with gr.Accordion(I18N("controlnet"), open=False, elem_id=f"{prefix}controlnet"):
        gr.Markdown(I18N("no_controlnet"), visible=not loaded, elem_id=f"{prefix}controlnet-note")
        with gr.Row(visible=loaded):
            image = gr.Image(type="filepath", label=I18N("control_image"), sources=["upload", "clipboard"],
                             elem_id=f"{prefix}control-image")  # fmt: skip
            preview = gr.HTML(label=I18N("control_preview"), show_label=True, elem_id=f"{prefix}control-preview")
        with gr.Row(visible=loaded):
            kind = gr.Dropdown(choices, value="canny", label=I18N("control_type"),
                               info=I18N("control_type_info"), elem_id=f"{prefix}control-type")  # fmt: skip
            scale = gr.Slider(0, MAX_CONTROL_SCALE, value=DEFAULT_CONTROL_SCALE, step=0.05,
                              label=I18N("control_scale"), elem_id=f"{prefix}control-scale")  # fmt: skip
        with gr.Row(visible=loaded):
            start = gr.Slider(0, 1, value=0, step=0.05, label=I18N("control_start"), elem_id=f"{prefix}control-start")
            end = gr.Slider(0, 1, value=1, step=0.05, label=I18N("control_end"), elem_id=f"{prefix}control-end")
        preview_button = gr.Button(I18N("preview_control"), size="sm", visible=loaded,
                                   elem_id=f"{prefix}control-preview-btn")  # fmt: skip
    return ControlPanel(image, kind, scale, start, end, preview_button, preview)


def control_fields(studio: Studio, image: str | None, kind: str, scale: float, start: float, end: float
                   ) -> dict[str, Any]:  # fmt: skip
    """The panel's values as the control fields of `GenerationParams`; {} without a picture. The picture is kept
    in the inputs folder (Gradio's cache copy can go), so the recipe can be made again."""
    if not image:
        return {}
    return {"control": keep_file(studio, image), "control_type": kind, "control_preprocess": kind != "none",
            "control_scale": float(scale), "control_start": float(start), "control_end": float(end)}  # fmt: skip


def checked_control(studio: Studio, params: GenerationParams) -> GenerationParams:
    """Refuse a bad control request (no ControlNet, unreadable picture) before it is queued."""
    studio.queue.generator.validate_control(params)
    return params


def preview_html(image: Image.Image, lang: str) -> str:
    """A control preview as an inline PNG (a data URL): Gradio's file route serves only the generated outputs'
    names (`guard.AccessGuard`), so a picture the UI makes on the fly would not show through it."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = html.escape(f"{text(lang, 'control_preview')} · {image.width}x{image.height}")
    return (f'<figure style="margin:0"><img src="data:image/png;base64,{data}" alt="{caption}" '
            f'style="max-width:100%"><figcaption>{caption}</figcaption></figure>')  # fmt: skip


def control_preview(studio: Studio, lang: str, image: str | None, kind: str, width: float, height: float
                    ) -> Image.Image:  # fmt: skip
    """The control image the model will get at this size: fitted (cover, centre-crop) and preprocessed."""
    if not image:
        raise gr.Error(text(lang, "no_control_image"))
    params = GenerationParams(prompt="preview", width=int(width), height=int(height),
                              **control_fields(studio, image, kind, 0.75, 0.0, 1.0))  # fmt: skip
    try:
        return studio.queue.generator.validate_control(params).image
    except ParamError as err:
        raise gr.Error(error_message(lang, err)) from None


def edit_output_size(canvas: tuple[int, int] | None, width: float, height: float,
                     outpaint: dict[str, Any] | None = None) -> tuple[int, int] | None:  # fmt: skip
    """The size an edit tab's job draws at, which its control preview fits to: `edit.output_size` of the source's
    canvas (plus any outpaint; width or height 0: the canvas'). Without a source, the sliders' size when both are
    set, else None."""
    if canvas is None:
        return (int(width), int(height)) if width and height else None
    sides = {side: int(px or 0) for side, px in (outpaint or {}).items()}
    grown = (canvas[0] + sides.get("left", 0) + sides.get("right", 0), canvas[1] + sides.get("top", 0)
             + sides.get("bottom", 0))  # fmt: skip
    return edit.output_size(grown, int(width or 0) or None, int(height or 0) or None)


def source_size(path: str | None) -> tuple[int, int] | None:
    """An edit source's size as the job reads it (EXIF orientation applied), or None without one; a file that is
    not a picture is refused in one line (`ParamError`), as the job would refuse it."""
    if not path:
        return None
    return edit.read_image("image", path, MAX_INPUT_PIXELS, MAX_INPUT_BYTES)[0].size


def edit_control_preview(studio: Studio, lang: str, image: str | None, kind: str, size: tuple[int, int] | None
                         ) -> Image.Image:  # fmt: skip
    """An edit tab's preview: the control image fitted to the edit's output size (`edit_output_size`)."""
    if size is None:
        raise gr.Error(text(lang, "no_image"))
    return control_preview(studio, lang, image, kind, *size)


def control_values(studio: Studio, params: dict[str, Any] | None, lang: str = "en") -> list[Any]:
    """A recipe's control fields as a panel's values (picture, type, strength, start, end), so sending or reusing a
    controlled result re-makes it; a recipe without control clears the panel. The picture is found by its name in
    this server's inputs or outputs folder (never by a path a file's metadata names); one not there any more is a
    warning and an empty picture. The type is the preprocessor that ran, or "none" for a ready control map (the same
    pixels; the UI records such a map's type as none)."""
    p = params or {}
    if not p.get("control"):
        return [None, "canny", DEFAULT_CONTROL_SCALE, 0.0, 1.0]
    name = Path(str(p["control"])).name
    try:
        picture = studio.inputs.resolve("control", name)
    except ParamError:
        gr.Warning(text(lang, "control_gone", control=name))
        picture = None
    preprocess = p.get("control_preprocess")
    kind = preprocess if isinstance(preprocess, str) else p.get("control_type") if preprocess else None
    return [picture, kind or "none", p.get("control_scale", DEFAULT_CONTROL_SCALE), p.get("control_start", 0.0),
            p.get("control_end", 1.0)]  # fmt: skip


def build_ui(studio: Studio) -> gr.Blocks:
    queue = studio.queue
    generator = queue.generator
    profile = generator.profile  # presets, aspect ratios, sliders and defaults follow the loaded model
    aspects = {name: size for name, size in ASPECT_RATIOS.items() if max(size) <= profile.max_side}
    upscalers = [upscale.LANCZOS, *upscale.find_upscalers(generator.settings.upscalers)]
    lora_names = lora_choices(studio)
    controlled = generator.controlnet_spec is not None  # the job tabs' ControlNet panels, or their one-line note
    control_types = preprocessor_choices(generator.settings)  # what can run here: weights found, packages in

    with gr.Blocks(title="zstudio") as demo:
        gr.Markdown(f"# zstudio — {generator.resolve_source().label}")  # the model that runs
        status_md = gr.Markdown(elem_id="zstudio-status")  # filled on load, in the browser's language
        job_id = gr.State(None)
        last_seed = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab(I18N("generate_tab"), id="generate"):
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt, negative = prompt_controls("")
                        with gr.Row():
                            preset_buttons = [gr.Button(f"{w}x{h}", size="sm") for w, h in profile.sizes]
                            aspect = gr.Dropdown(["—", *aspects], value="—", label=I18N("aspect"),
                                                 visible=bool(aspects))  # fmt: skip
                        with gr.Row():
                            width = gr.Slider(*profile.side_range, value=profile.width, step=16, label=I18N("width"),
                                              elem_id="width")  # fmt: skip
                            height = gr.Slider(*profile.side_range, value=profile.height, step=16,
                                               label=I18N("height"), elem_id="height")  # fmt: skip
                        recipe = recipe_controls(profile, "", prompt, negative, last_seed, lora_names)
                        control = control_panel(controlled, control_types)
                        run_btn, cancel_btn = run_buttons("generate", "generate")
                    with gr.Column(scale=3):
                        panel = result_panel(profile, "generate-", "zstudio-progress", "result")
            with gr.Tab(I18N("img2img_tab"), id="img2img"):
                with gr.Row():
                    with gr.Column(scale=2):
                        i2i_image = source_image("img2img-")
                        i2i_hidden = gr.State({})  # a sent recipe's fields without a control (HIDDEN_FIELDS)
                        i2i_prompt, i2i_negative = prompt_controls("img2img-")
                        i2i_strength = gr.Slider(0, 1, value=edit.IMAGE_TO_IMAGE_STRENGTH, step=0.05,
                                                 label=I18N("strength"), info=I18N("strength_info"),
                                                 elem_id="img2img-strength")  # fmt: skip
                        i2i_width, i2i_height = edit_size_controls(profile, "img2img-")
                        i2i = recipe_controls(profile, "img2img-", i2i_prompt, i2i_negative, last_seed, lora_names)
                        i2i_control = control_panel(controlled, control_types, "img2img-")
                        i2i_run, i2i_cancel = run_buttons("run_edit", "img2img-run")
                    with gr.Column(scale=3):
                        i2i_panel = result_panel(profile, "img2img-", "img2img-progress", "img2img-result")
            with gr.Tab(I18N("inpaint_tab"), id="inpaint"):
                with gr.Row():
                    with gr.Column(scale=2):
                        editor = gr.ImageEditor(
                            label=I18N("editor"),
                            type="pil",
                            image_mode="RGBA",  # the layers' alpha is the mask
                            sources=("upload", "clipboard"),
                            brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"),
                            transforms=(),  # cropping would make the mask and the picture differ
                            elem_id="inpaint-editor",
                        )
                        inp_hidden = gr.State({})
                        inp_prompt, inp_negative = prompt_controls("inpaint-")
                        with gr.Row():
                            outpaint = [gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SIDE, step=16,
                                                  label=I18N(f"outpaint_{side}"), elem_id=f"outpaint-{side}")
                                        for side in OUTPAINT_SIDES]  # fmt: skip
                        with gr.Row():
                            inp_strength = gr.Slider(0, 1, value=edit.INPAINT_STRENGTH, step=0.05,
                                                     label=I18N("strength"), info=I18N("strength_info"),
                                                     elem_id="inpaint-strength")  # fmt: skip
                            mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=DEFAULT_MASK_BLUR, step=1,
                                                  label=I18N("mask_blur"))  # fmt: skip
                        inp_width, inp_height = edit_size_controls(profile, "inpaint-")
                        inp = recipe_controls(profile, "inpaint-", inp_prompt, inp_negative, last_seed, lora_names)
                        inp_control = control_panel(controlled, control_types, "inpaint-")
                        inp_run, inp_cancel = run_buttons("run_edit", "inpaint-run")
                    with gr.Column(scale=3):
                        inp_panel = result_panel(profile, "inpaint-", "inpaint-progress", "inpaint-result")
            with gr.Tab(I18N("upscale_tab"), id="upscale"):
                with gr.Row():
                    with gr.Column(scale=2):
                        up_image = source_image("upscale-")
                        with gr.Row():
                            up_scale = gr.Radio([(f"{s:g}x", s) for s in upscale.SCALES], value=2.0,
                                                label=I18N("scale"), elem_id="upscale-scale")  # fmt: skip
                            up_model = gr.Dropdown(upscalers, value=upscale.LANCZOS, label=I18N("upscaler"),
                                                   elem_id="upscale-model")  # fmt: skip
                        up_refine = gr.Slider(0, 1, value=0, step=0.05, label=I18N("refine"), info=I18N("refine_info"),
                                              elem_id="upscale-refine")  # fmt: skip
                        up_run = gr.Button(I18N("upscale"), variant="primary", elem_id="upscale-run")
                    with gr.Column(scale=3):
                        up_panel = result_panel(profile, "upscale-", "upscale-progress", "upscale-result")
            with gr.Tab(I18N("history_tab"), id="history"):
                with gr.Row():
                    page = gr.Number(value=1, precision=0, label=I18N("page"), minimum=1)
                    refresh = gr.Button(I18N("refresh"), size="sm")
                history_gallery = gr.Gallery(label=I18N("history_gallery"), columns=6, elem_id="history")
                history_info = gr.Markdown(I18N("select_hint"))
                selected = gr.State(None)
                history_chosen = gr.State(None)
                with gr.Row():
                    use_btn = gr.Button(I18N("use_settings"))
                    delete_btn = gr.Button(I18N("delete_entry"), variant="stop")
                history_sends = send_buttons("history-", profile)

        for button, (w, h) in zip(preset_buttons, profile.sizes):
            button.click(lambda w=w, h=h: (w, h), outputs=[width, height])
        aspect.change(lambda a: aspects.get(a, (gr.update(), gr.update())), aspect, [width, height])

        def follows(result: ResultPanel) -> list:
            return [result.gallery, result.progress, job_id, last_seed, status_md, result.files, result.chosen]

        # The handlers take the request first and the LoRA rows last (`*loras`: Gradio fills positional arguments
        # only, and injects a `gr.Request` only before any `*args`).
        def generate(request: gr.Request, p, neg, n_steps, g, s, n, w, h, c_image, c_kind, c_scale, c_start, c_end,
                     *loras):  # fmt: skip
            fields = {**recipe_fields(p, neg, n_steps, g, s, n), "width": int(w), "height": int(h)}
            fields["loras"] = lora_pairs(loras)
            fields.update(control_fields(studio, c_image, c_kind, c_scale, c_start, c_end))
            yield from run_job(studio, language(request), lambda: checked_control(studio, GenerationParams(**fields)))

        run_btn.click(generate, [*recipe.controls, width, height, *control.controls, *recipe.loras], follows(panel))

        def preview_control(request: gr.Request, c_image, c_kind, w, h):
            lang = language(request)
            return preview_html(control_preview(studio, lang, c_image, c_kind, w, h), lang)

        control.preview_button.click(preview_control, [control.image, control.kind, width, height], control.preview)

        def image_to_image(request: gr.Request, p, neg, n_steps, g, s, n, image, strength, w, h, c_image, c_kind,
                           c_scale, c_start, c_end, hidden, *loras):  # fmt: skip
            lang = language(request)
            if not image:
                raise gr.Error(text(lang, "no_image"))
            fields = with_hidden({**recipe_fields(p, neg, n_steps, g, s, n), "loras": lora_pairs(loras)}, hidden)
            fields.update(control_fields(studio, c_image, c_kind, c_scale, c_start, c_end))
            make = lambda: checked_control(studio, edit_request(studio, fields, image, None, strength, w, h))  # noqa: E731
            yield from run_job(studio, lang, make, "img2img-progress")

        i2i_inputs = [*i2i.controls, i2i_image, i2i_strength, i2i_width, i2i_height, *i2i_control.controls,
                      i2i_hidden, *i2i.loras]  # fmt: skip
        i2i_run.click(image_to_image, i2i_inputs, follows(i2i_panel))

        def preview_img2img_control(request: gr.Request, image, w, h, c_image, c_kind):
            lang = language(request)
            try:
                size = edit_output_size(source_size(image), w, h)
            except ParamError as err:
                raise gr.Error(error_message(lang, err)) from None
            return preview_html(edit_control_preview(studio, lang, c_image, c_kind, size), lang)

        i2i_control.preview_button.click(preview_img2img_control, [i2i_image, i2i_width, i2i_height,
                                         i2i_control.image, i2i_control.kind], i2i_control.preview)  # fmt: skip

        def inpaint(request: gr.Request, p, neg, n_steps, g, s, n, value, strength, w, h, blur, left, right, top,
                    bottom, c_image, c_kind, c_scale, c_start, c_end, hidden, *loras):  # fmt: skip
            lang = language(request)
            if not value or value.get("background") is None:
                raise gr.Error(text(lang, "no_image"))
            extend = dict(zip(OUTPAINT_SIDES, (left, right, top, bottom)))
            if painted_mask(value.get("layers")) is None and not any(extend.values()):
                raise gr.Error(text(lang, "paint_mask"))
            fields = with_hidden({**recipe_fields(p, neg, n_steps, g, s, n), "loras": lora_pairs(loras)}, hidden)
            fields.update(control_fields(studio, c_image, c_kind, c_scale, c_start, c_end))
            make = lambda: checked_control(  # noqa: E731
                studio, inpaint_request(studio, fields, value, strength, w, h, extend, blur)
            )
            yield from run_job(studio, lang, make, "inpaint-progress")

        inp_inputs = [*inp.controls, editor, inp_strength, inp_width, inp_height, mask_blur, *outpaint,
                      *inp_control.controls, inp_hidden, *inp.loras]  # fmt: skip

        def preview_inpaint_control(request: gr.Request, value, w, h, left, right, top, bottom, c_image, c_kind):
            background = (value or {}).get("background")
            canvas = background.size if background is not None else None
            size = edit_output_size(canvas, w, h, dict(zip(OUTPAINT_SIDES, (left, right, top, bottom))))
            lang = language(request)
            return preview_html(edit_control_preview(studio, lang, c_image, c_kind, size), lang)

        inp_control.preview_button.click(preview_inpaint_control, [editor, inp_width, inp_height, *outpaint,
                                         inp_control.image, inp_control.kind], inp_control.preview)  # fmt: skip
        i2i_image.upload(dict, None, i2i_hidden)  # a new picture: no sent recipe's hidden fields
        editor.upload(dict, None, inp_hidden)
        inp_run.click(inpaint, inp_inputs, follows(inp_panel))

        def run_upscale(path, scale, model, refine, request: gr.Request):
            yield from upscale_job(studio, language(request), path, scale, model, refine)

        up_outputs = [up_panel.gallery, up_panel.progress, up_panel.files, up_panel.chosen]
        up_run.click(run_upscale, [up_image, up_scale, up_model, up_refine], up_outputs)
        for cancel in (cancel_btn, i2i_cancel, inp_cancel):
            cancel.click(lambda j: queue.cancel(j) and None, job_id, None)

        # The LoRA folder, rescanned on load and by any tab's refresh button: every tab's dropdowns follow it.
        recipes = (recipe, i2i, inp)
        lora_outputs = [*(d for r in recipes for d in r.lora_names), *(r.lora_note for r in recipes)]

        def list_loras(request: gr.Request):
            choices, note = lora_choices(studio), lora_note(studio, language(request))
            dropdowns = [gr.Dropdown(choices=choices) for r in recipes for _ in r.lora_names]
            return [*dropdowns, *(gr.Markdown(note, visible=bool(note)) for _ in recipes)]

        for r in recipes:
            r.lora_refresh.click(list_loras, None, lora_outputs)
        demo.load(list_loras, None, lora_outputs)

        # Send a result (a gallery's chosen image, the history's selected one) to the edit tabs.
        def source(path: str | None, request: gr.Request) -> str:
            if not path:
                raise gr.Error(text(language(request), "select_first"))
            return path

        def sent_control(path: str, request: gr.Request) -> list[Any]:
            """The sent file's control into the receiving tab's panel (unchanged when the file has no recipe)."""
            recipe = recipe_of(path)
            return control_values(studio, recipe, language(request)) if recipe else [gr.update()] * 5

        def to_img2img(path, request: gr.Request):
            path = source(path, request)
            return [path, *recipe_updates(path), *sent_control(path, request), hidden_fields(recipe_of(path)),
                    gr.Tabs(selected="img2img")]  # fmt: skip

        def to_inpaint(path, request: gr.Request):
            path = source(path, request)
            value = {"background": path, "layers": [], "composite": path}
            return [value, *recipe_updates(path), *sent_control(path, request), hidden_fields(recipe_of(path)),
                    gr.Tabs(selected="inpaint")]  # fmt: skip

        def to_upscale(path, request: gr.Request):
            return source(path, request), 2.0, gr.Tabs(selected="upscale")

        def to_rerender(path, request: gr.Request):
            path = source(path, request)
            try:
                p = hires_request(path)
            except ParamError as err:
                raise gr.Error(error_message(language(request), err)) from None
            recipe_values = [p.prompt, p.negative_prompt, p.num_inference_steps, p.cfg_scale, p.seed, 1]
            hidden = hidden_fields(p)  # the rest of the draft's recipe, which no control shows
            # The draft's control (`refine_request` leaves it out) guides the larger picture too, fitted to its size.
            return [path, *recipe_values, p.width, p.height, p.strength, *sent_control(path, request),
                    *lora_rows(p.loras), hidden, gr.Tabs(selected="img2img")]  # fmt: skip

        i2i_recipe, inp_recipe = [*i2i.controls[:5], *i2i.loras], [*inp.controls[:5], *inp.loras]
        rerender_outputs = [i2i_image, *i2i.controls, i2i_width, i2i_height, i2i_strength, *i2i_control.controls,
                            *i2i.loras, i2i_hidden, tabs]  # fmt: skip
        senders = [(r.chosen, r.sends) for r in (panel, i2i_panel, inp_panel, up_panel)]
        for chosen, sends in [*senders, (history_chosen, history_sends)]:
            sends.img2img.click(to_img2img, chosen, [i2i_image, *i2i_recipe, *i2i_control.controls, i2i_hidden, tabs])
            sends.inpaint.click(to_inpaint, chosen, [editor, *inp_recipe, *inp_control.controls, inp_hidden, tabs])
            sends.upscale2.click(to_upscale, chosen, [up_image, up_scale, tabs]).success(
                run_upscale, [up_image, up_scale, up_model, up_refine], up_outputs
            )
            sends.rerender.click(to_rerender, chosen, rerender_outputs).success(
                image_to_image, i2i_inputs, follows(i2i_panel)
            )

        def load_history(page_number, request: gr.Request):
            lang = language(request)
            offset = (max(1, int(page_number or 1)) - 1) * HISTORY_PAGE
            records = queue.history.page(limit=HISTORY_PAGE, offset=offset)
            items = []
            for r in records:
                for name in r["outputs"][:1]:
                    items.append((str(studio.outputs / name), history_caption(r, lang)))
            shown = [r for r in records if r["outputs"]]
            return items, shown

        history_records = gr.State([])
        refresh.click(load_history, page, [history_gallery, history_records])
        page.change(load_history, page, [history_gallery, history_records])
        demo.load(load_history, page, [history_gallery, history_records])

        def greet(request: gr.Request):
            lang = language(request)
            ready = text(lang, "ready")
            keys = ("zstudio-progress", "img2img-progress", "inpaint-progress", "upscale-progress")
            return status_line(studio, lang), *(progress_html(ready, key=key) for key in keys)

        demo.load(greet, None, [status_md, panel.progress, i2i_panel.progress, inp_panel.progress, up_panel.progress])

        def select(records, evt: gr.SelectData, request: gr.Request):
            record = records[evt.index]
            file = studio.outputs / record["outputs"][0]
            return record, record_text(record, language(request), file_recipe(file)), str(file)

        history_gallery.select(select, history_records, [selected, history_info, history_chosen])
        generate_controls = [*recipe.controls, width, height, *recipe.loras, *control.controls]
        upscale_controls = [up_image, up_scale, up_model, up_refine]

        def use(record: dict[str, Any] | None, request: gr.Request):
            """A generation's recipe into the Generate tab; an upscale's settings into the Upscale tab."""
            lang = language(request)
            if not record:
                raise gr.Error(text(lang, "select_first"))
            if is_upscale(record):
                unchanged = [gr.update()] * len(generate_controls)
                return (*unchanged, *upscale_settings(studio, record, lang), gr.Tabs(selected="upscale"))
            p = record["params"]
            return (
                p["prompt"],
                p["negative_prompt"],
                p["num_inference_steps"],
                p["cfg_scale"],
                record["seeds"][0] if record["seeds"] else p["seed"],
                p["num_images"],
                p["width"],
                p["height"],
                *lora_rows(p.get("loras")),
                *control_values(studio, p, lang),
                *[gr.update()] * len(upscale_controls),
                gr.Tabs(selected="generate"),
            )

        use_btn.click(use, selected, [*generate_controls, *upscale_controls, tabs])

        def delete(record, page_number, request: gr.Request):
            lang = language(request)
            if not record:
                raise gr.Error(text(lang, "select_first"))
            try:
                studio.delete_entry(record["id"])
            except Exception as err:  # still running: say so
                raise gr.Error(text(lang, "refused", error=getattr(err, "detail", err))) from None
            items, shown = load_history(page_number, request)
            return items, shown, None, None, text(lang, "deleted", id=record["id"])

        delete_btn.click(
            delete, [selected, page], [history_gallery, history_records, selected, history_chosen, history_info]
        )
    return demo
