"""The `zstudio` command: parse, call the engine, print. Exit codes: 0 ok, 2 bad input, 1 anything else."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .params import (
    ASPECT_RATIOS,
    CONTROL_TYPES,
    DEFAULT_CONTROL_SCALE,
    DEFAULT_MASK_BLUR,
    MAX_INPUT_BYTES,
    PRESETS,
    ParamError,
    resolve_size,
)

SIZE_NAMES = ", ".join([*PRESETS, *ASPECT_RATIOS])


class CliError(click.ClickException):
    """A one-line failure with its exit code (2 for bad input, 1 otherwise)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"zstudio: error: {self.format_message()}", err=True)


def _run(action):
    """Map the engine's exceptions to one line on stderr and the documented exit codes."""
    from .models import ModelUnavailableError

    try:
        return action()
    except ParamError as err:
        raise CliError(str(err), exit_code=2) from None
    except ModelUnavailableError as err:
        raise CliError(str(err), exit_code=1) from None
    except FileExistsError as err:
        raise CliError(str(err), exit_code=2) from None
    except KeyboardInterrupt:
        raise CliError("interrupted", exit_code=1) from None
    except (OSError, RuntimeError, ValueError) as err:
        raise CliError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zstudio")
@click.option("-v", "--verbose", is_flag=True, help="Log loading and timing details to stderr.")
def main(verbose: bool) -> None:
    """zstudio: run Tongyi-MAI's Z-Image-Turbo on your own machine."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="zstudio: %(message)s")


def _size(size: str | None, preset: str | None, width: int | None, height: int | None
          ) -> tuple[int | None, int | None]:  # fmt: skip
    """The requested size; None where unset, so the model's own size applies."""
    if sum(x is not None for x in (size, preset)) > 1 or ((size or preset) and (width or height)):
        raise ParamError("size", "give one of --size, --preset, or --width/--height")
    if size or preset:
        return resolve_size(size or preset)
    return width, height


@main.command()
@click.argument("prompt")
@click.option("--negative", default="", help="Negative prompt (used when --cfg > 0).")
@click.option("--size", help=f"WxH, or a preset / aspect ratio: {SIZE_NAMES}.")
@click.option("--preset", help=f"Same as --size: {SIZE_NAMES}.")
@click.option("--width", type=int, help="Width in pixels (multiple of 16, 64-2048; default: the model's size).")
@click.option("--height", type=int, help="Height in pixels (multiple of 16, 64-2048; default: the model's size).")
@click.option(
    "--steps",
    type=int,
    help="Steps = transformer evaluations (default: the model's; 8 for Turbo, "
    "which is what the model card's '9 steps' ran in older diffusers).",
)
@click.option("--cfg", type=float, help="Guidance scale, 0 = off (default: the model's, 0 for Turbo).")
@click.option("--seed", type=int, default=-1, show_default=True, help="Seed; -1 picks one at random.")
@click.option("-n", "--num-images", type=int, default=1, show_default=True, help="Images to make (1-8).")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Prompt token limit.")
@click.option(
    "--cfg-normalization",
    type=float,
    default=0.0,
    show_default=True,
    help="Cap the guided prediction's norm at this many times the conditional one (0 = off; with --cfg).",
)
@click.option(
    "--cfg-truncation",
    type=float,
    default=1.0,
    show_default=True,
    help="0-1: guidance stops once the schedule passes this share (1 = never; with --cfg).",
)
@click.option("--format", "output_format", default="png", show_default=True, help="png, jpeg or webp.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [./outputs].")
@click.option("--model", help="Hub id, diffusers folder, or 'tiny' [env ZSTUDIO_MODEL].")
@click.option("--device", help="auto, cuda, cuda:N, mps or cpu [env ZSTUDIO_DEVICE].")
@click.option("--dtype", help="auto, bfloat16, float16 or float32 [env ZSTUDIO_DTYPE].")
@click.option("--speed", help="auto, eager, exact, fast or fastest (fp8, approximate) [env ZSTUDIO_SPEED].")
@click.option("--memory", help="auto, resident, offload-text, 8bit, stream or lowest [env ZSTUDIO_MEMORY].")
@click.option("--lora", "loras", multiple=True, metavar="NAME[:STRENGTH]",
              help="A LoRA (a name from `zstudio loras`, a .safetensors file or a hub repo id) and its strength "
              "(-2..2, default 1); repeatable. Prompt tags <lora:NAME:0.8> work too.")  # fmt: skip
@click.option("--control", type=click.Path(dir_okay=False, path_type=Path), help="A control image for the "
              "ControlNet, fitted to the output size (cover, then centre-crop; never stretched).")  # fmt: skip
@click.option("--control-type", help=f"What --control shows: {', '.join(CONTROL_TYPES)} (none = use as given).")
@click.option("--control-preprocess", is_flag=True, help="--control is a plain picture: make the --control-type "
              "image from it (canny built in; depth and, with zstudio[annotators], hed, mlsd, lineart, pose from "
              "weights on disk: ZSTUDIO_DEPTH_MODEL, ZSTUDIO_ANNOTATORS; never downloaded).")  # fmt: skip
@click.option("--control-scale", type=float, default=DEFAULT_CONTROL_SCALE, show_default=True,
              help="0-2, how strongly the ControlNet steers (0 = not at all).")  # fmt: skip
@click.option("--control-start", type=float, default=0.0, show_default=True, help="0-1, share of the schedule "
              "where control starts.")  # fmt: skip
@click.option("--control-end", type=float, default=1.0, show_default=True, help="0-1, where it ends.")
@click.option("--controlnet", help="ControlNet weights: hub id, folder or .safetensors file, e.g. "
              "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.0/Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors; "
              "for the tiny checkpoint, its controlnet/ folder [env ZSTUDIO_CONTROLNET].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of lines.")
def generate(
    prompt: str,
    negative: str,
    size,
    preset,
    width,
    height,
    steps,
    cfg,
    seed,
    num_images,
    max_tokens,
    cfg_normalization,
    cfg_truncation,
    output_format,
    out,
    model,
    device,
    dtype,
    speed,
    memory,
    loras,
    control,
    control_type,
    control_preprocess,
    control_scale,
    control_start,
    control_end,
    controlnet,
    as_json: bool,
    **edit_fields,
) -> None:
    """Generate images from PROMPT and save them with their parameters embedded."""
    from .engine import Generator
    from .params import GenerationParams

    def action():
        w, h = _size(size, preset, width, height)
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative,
            width=w,
            height=h,
            num_inference_steps=steps,
            cfg_scale=cfg,
            seed=seed,
            num_images=num_images,
            max_sequence_length=max_tokens,
            cfg_normalization=cfg_normalization,
            cfg_truncation=cfg_truncation,
            output_format=output_format,
            **edit_fields,  # from `zstudio edit`
            loras=tuple(_lora_option(text) for text in loras),
            control=str(control) if control else None,
            control_type=control_type,
            control_preprocess=control_preprocess,
            control_scale=control_scale,
            control_start=control_start,
            control_end=control_end,
        )
        generator = Generator(model=model, device=device, dtype=dtype, outputs=out, speed=speed, memory=memory,
                              controlnet=controlnet)  # fmt: skip
        generator.resolve_source()
        bar = None
        if not as_json and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=params.num_inference_steps or generator.profile.num_inference_steps,
                desc="denoising",
                unit="step",
                file=sys.stderr,
                leave=False,
            )
        try:
            result = generator.generate_images(params, progress=_bar_updater(bar))
        finally:
            if bar is not None:
                bar.close()
        return generator, result, generator.save(result)

    generator, result, paths = _run(action)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "paths": [str(p) for p in paths],
                    "seeds": result.seeds,
                    "seconds": result.timings["total"],
                    "timings": result.timings,
                    "model": generator.info(),
                    "metadata": result.metadata,
                },
                ensure_ascii=False,
            )
        )
        return
    if generator.source is not None and generator.source.embedded:
        click.echo(f"note: made with the {generator.source.label}, not Z-Image", err=True)
    for path, image_seed in zip(paths, result.seeds):
        click.echo(f"{path}\tseed={image_seed}")
    click.echo(f"{len(paths)} image(s) in {result.timings['total']:.2f} s", err=True)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), help="Mask PNG, white = repaint (same size "
              "as IMAGE). Without it, IMAGE's transparent pixels are repainted; none: image-to-image.")  # fmt: skip
@click.option("--strength", type=float, help="0-1, the share of the schedule re-run [0.6; 1.0 with a mask/outpaint].")
@click.option(
    "--outpaint", help="Extend the canvas and paint the new area: SIDE=PIXELS,... (left, right, top, bottom)."
)
@click.option("--mask-blur", type=int, default=DEFAULT_MASK_BLUR, show_default=True, help="Soft edge of the mask, px.")
@click.pass_context
def edit(ctx: click.Context, image: Path, prompt: str, mask, strength, outpaint, mask_blur, **options) -> None:
    """Repaint IMAGE after PROMPT: image-to-image, inpainting (--mask) or outpainting (--outpaint).

    Without --size/--width/--height the output keeps IMAGE's size, cropped (never stretched) to multiples of 16;
    with them IMAGE is scaled to cover that size and centre-cropped. Takes generate's options as well."""
    from .edit import parse_outpaint

    sides = _run(lambda: parse_outpaint(outpaint))
    ctx.invoke(generate, prompt=prompt, **options, image=str(image), mask=str(mask) if mask else None,
               strength=strength, outpaint=sides, mask_blur=mask_blur)  # fmt: skip


edit.params.extend(p for p in generate.params if p.name != "prompt")  # the generation options, defined once


def _lora_option(text: str) -> tuple[str, float]:
    """NAME[:STRENGTH]; a name may hold colons (C:\\x.safetensors) when what follows the last is not a number."""
    name, _, strength = text.rpartition(":")
    try:
        return (name, float(strength)) if name else (text, 1.0)
    except ValueError:
        return text, 1.0


@main.command("loras")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def loras_command(as_json: bool) -> None:
    """List the LoRAs in the LoRA folder [env ZSTUDIO_LORAS, ./loras]."""
    from .lora import LoraFolder
    from .settings import load_settings

    folder = LoraFolder(load_settings().loras)
    files = _run(folder.available)
    if as_json:
        click.echo(json.dumps([f.describe() for f in files], indent=2))
        return
    if not files:
        click.echo(f"no LoRAs in {folder.folder} (put .safetensors files there, or set ZSTUDIO_LORAS)", err=True)
    for f in files:
        click.echo(f"{f.name}\t{f.size / 1e6:.1f} MB\t{f.path}")


def _bar_updater(bar):
    if bar is None:
        return None

    def update(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    return update


@main.command()
@click.option("--model", help="Hub id, diffusers folder, 'demo' or 'tiny'; reports on it without downloading it.")
@click.option("--device", help="auto, cuda, cuda:N, mps or cpu.")
@click.option("--dtype", help="auto, bfloat16, float16 or float32.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model, device, dtype, as_json: bool) -> None:
    """Show the device, dtype, free memory, model and library versions."""
    import diffusers
    import torch
    import transformers

    from .devices import free_memory_bytes
    from .engine import Generator

    def action() -> dict[str, Any]:
        generator = Generator(model=model, device=device, dtype=dtype)
        source = generator.resolve_source(download=False)  # the model that would run, without fetching it
        free = free_memory_bytes(generator.device)
        data = generator.info()
        if source.embedded and not model:
            data["note"] = (
                "the real weights are not in the Hugging Face cache: generation runs this model offline "
                "and downloads Z-Image-Turbo first where the hub is reachable (`zstudio download`)"
            )
        data.update(
            {
                "free_memory_gb": round(free / 2**30, 2) if free is not None else None,
                "gpu": torch.cuda.get_device_name(generator.device) if generator.device.type == "cuda" else None,
                "versions": {
                    "zstudio": __version__,
                    "torch": torch.__version__,
                    "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__,
                    "python": sys.version.split()[0],
                },
            }
        )
        return data

    data = _run(action)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        click.echo(f"{key:17} {value}")


@main.command("make-tiny")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DIRECTORY.")
def make_tiny_command(directory: Path, seed: int, overwrite: bool) -> None:
    """Write a tiny random Z-Image checkpoint in the real diffusers layout (for tests and offline use)."""
    from .tiny import make_tiny

    path = _run(lambda: make_tiny(directory, seed=seed, overwrite=overwrite))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    click.echo(f"{path}\t{size / 1e6:.1f} MB")


@main.command("make-demo")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the whole training run.")
@click.option("--steps", type=int, default=None, help="Transformer training steps [default: until --time-budget].")
@click.option("--time-budget", type=float, default=None, help="Seconds for the whole run; every stage stops on time.")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (bf16 autocast, compiled blocks).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty DIRECTORY/s.")
@click.option("--no-compile", is_flag=True, help="Run the transformer blocks eagerly (no C++ compiler needed; slower).")
def make_demo_command(directory: Path, seed: int, steps: int | None, time_budget: float | None, device: str,
                      overwrite: bool, no_compile: bool) -> None:  # fmt: skip
    """Train the demo model (shapes on plain backgrounds) into DIRECTORY/s; see `python -m zstudio.demo.train -h`."""
    from .demo.train import STEPS, train

    logging.getLogger("zstudio").setLevel(logging.INFO)
    paths = _run(
        lambda: train(
            directory,
            seed=seed,
            steps=steps or STEPS,
            overwrite=overwrite,
            device=device,
            compile_blocks=not no_compile,
            time_budget=time_budget,
        )
    )
    for path in paths:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        click.echo(f"{path}\t{size / 1e6:.1f} MB")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the full JSON record.")
def show(file: Path, as_json: bool) -> None:
    """Print the generation parameters stored inside an image."""
    from .outputs import read_metadata

    meta = _run(lambda: read_metadata(file))
    if "upscale" in meta and not as_json:
        _show_upscale(meta)
        if "params" not in meta:
            return
    if as_json or "params" not in meta:
        click.echo(json.dumps(meta, indent=2, ensure_ascii=False))
        return
    p = meta["params"]
    click.echo(f"prompt           {p['prompt']}")
    click.echo(f"negative_prompt  {p['negative_prompt']}")
    click.echo(f"size             {p['width']}x{p['height']}")
    click.echo(f"steps            {p['num_inference_steps']}")
    click.echo(f"cfg_scale        {p['cfg_scale']}")
    click.echo(f"seed             {p['seed']}")
    truncated = ", truncated" if meta.get("prompt_truncated") else ""
    click.echo(f"max_tokens       {p['max_sequence_length']} (the prompt used {meta.get('prompt_tokens')}{truncated})")
    click.echo(f"cfg norm/trunc   {p['cfg_normalization']} / {p['cfg_truncation']}")
    click.echo(f"format           {p['output_format']}")
    click.echo(f"model            {meta['model']['name']}")
    click.echo(f"device/dtype     {meta['device']} / {meta['dtype']}")
    click.echo(f"seconds          {meta['seconds']}")
    click.echo(f"software         {meta['software']}")
    loras = meta.get("loras") or []
    if loras:
        click.echo(
            "loras            " + ", ".join(f"{x['name']}:{x['strength']:g} ({x['sha256'][:10]})" for x in loras)
        )
    options = (f"--size {p['width']}x{p['height']} --steps {p['num_inference_steps']} --cfg {p['cfg_scale']} "
               f"--seed {p['seed']}")  # fmt: skip
    options += "".join(f" --lora {json.dumps(x['name'])}:{x['strength']:g}" for x in loras)
    options += _recipe_options(p)
    options += _show_control(meta)
    if not p.get("image"):
        click.echo(f"remake           zstudio generate {json.dumps(p['prompt'], ensure_ascii=False)} {options}")
        return
    recipe = meta.get("edit", {})
    source, mask = recipe.get("source", {}), recipe.get("mask") or {}
    click.echo(f"edit             {recipe.get('mode')}, {meta.get('transformer_evaluations')} transformer evaluations")
    click.echo(f"image            {p['image']}")
    click.echo(f"image sha256     {source.get('sha256')} ({source.get('width')}x{source.get('height')} "
               f"{source.get('format')})")  # fmt: skip
    canvas = recipe.get("canvas") or {}
    click.echo(f"canvas           {canvas.get('width')}x{canvas.get('height')}, {recipe.get('fit')} to "
               f"{p['width']}x{p['height']}")  # fmt: skip
    if mask:
        click.echo(
            f"mask             {p['mask'] or mask.get('from')}"
            + (f" sha256 {mask['sha256']}" if "sha256" in mask else "")
        )
        click.echo(f"mask_blur        {p['mask_blur']}")
    click.echo(f"strength         {p['strength']}")
    sides = ",".join(f"{side}={px}" for side, px in (p.get("outpaint") or {}).items())
    if sides:
        click.echo(f"outpaint         {sides}")
    extra = (f" --mask {json.dumps(p['mask'])}" if p.get("mask") else "") + (f" --outpaint {sides}" if sides else "")
    click.echo(f"remake           zstudio edit {json.dumps(p['image'], ensure_ascii=False)} "
               f"{json.dumps(p['prompt'], ensure_ascii=False)} {options} --strength {p['strength']}{extra} "
               f"--mask-blur {p['mask_blur']}")  # fmt: skip


def _recipe_options(p: dict[str, Any]) -> str:
    """The remake's options for the fields that differ from generate's defaults."""
    defaults = (("negative_prompt", "--negative", ""), ("max_sequence_length", "--max-tokens", 512),
                ("cfg_normalization", "--cfg-normalization", 0.0), ("cfg_truncation", "--cfg-truncation", 1.0),
                ("output_format", "--format", "png"))  # fmt: skip
    return "".join(f" {option} {json.dumps(p[name], ensure_ascii=False)}" for name, option, default in defaults
                   if name in p and p[name] != default)  # fmt: skip


def _show_control(meta: dict) -> str:
    """Print an image's control recipe; return the options that remake it."""
    recipe, p = meta.get("control"), meta["params"]
    if not recipe:
        return ""
    made = f", made by preprocessor {recipe['preprocessor']}" if recipe.get("preprocessor") else ""
    click.echo(f"control          {p['control']} ({recipe['type']}{made})")
    click.echo(f"control sha256   {recipe['sha256']}"
               + (f" (source {recipe['source_sha256']})" if recipe.get("source_sha256") else ""))  # fmt: skip
    click.echo(f"control scale    {recipe['scale']:g}, steps {recipe['start']:g}-{recipe['end']:g} of the schedule")
    click.echo(f"controlnet       {recipe['controlnet']}")
    options = (f" --controlnet {json.dumps(recipe['controlnet'])} --control {json.dumps(p['control'])} "
               f"--control-type {recipe['type']} --control-scale {recipe['scale']:g} "
               f"--control-start {recipe['start']:g} --control-end {recipe['end']:g}")  # fmt: skip
    return options + (" --control-preprocess" if recipe.get("preprocessor") else "")


# ---------------------------------------------------------------------------------------------------------- upscale
@main.command()
@click.argument("image", required=False, type=click.Path(path_type=Path))
@click.option("--scale", type=float, default=2.0, show_default=True, help="1.5, 2, 3 or 4. A model of another "
              "scale runs at its own, then Lanczos resizes (a 4x model asked for 2x: 4x, then down).")  # fmt: skip
@click.option("--model", help="Upscaler: a .pth/.safetensors file spandrel identifies (ESRGAN, Real-ESRGAN, "
              "SwinIR, HAT, DAT, ...), a name from --list, or 'lanczos' [default: lanczos].")  # fmt: skip
@click.option("--upscaler", "upscalers", multiple=True, type=click.Path(path_type=Path),
              help="A model file or folder of them that --model names can come from; repeatable "
              "[env ZSTUDIO_UPSCALERS, ':'-separated].")  # fmt: skip
@click.option("--refine", type=float, help="Then re-render at the larger size by image-to-image at this strength "
              "(0-1; 0.2-0.4 keeps the composition), with the draft's own prompt, seed and steps.")  # fmt: skip
@click.option("--tile", type=int, help="Tile side in input pixels, 0 = one piece [512].")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Output folder [./outputs].")
@click.option("--list", "list_only", is_flag=True, help="List the upscalers by name and exit.")
@click.option("--refine-model", help="Z-Image model for --refine [default: the draft's own, else ZSTUDIO_MODEL].")
@click.option("--device", help="auto, cuda, cuda:N, mps or cpu [env ZSTUDIO_DEVICE].")
@click.option("--dtype", help="auto, bfloat16, float16 or float32 [env ZSTUDIO_DTYPE].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def upscale(image, scale, model, upscalers, refine, tile, output_dir, list_only, refine_model, device, dtype,
            as_json: bool) -> None:  # fmt: skip
    """Upscale IMAGE (a draft from the outputs or any PNG/JPEG/WebP/BMP) and save a PNG with the recipe inside."""
    from .engine import Generator
    from .settings import load_settings
    from .upscale import LANCZOS, find_upscalers

    search = (*upscalers, *load_settings().upscalers)
    if list_only:
        found = _run(lambda: find_upscalers(search))
        click.echo(f"{LANCZOS}\tbuilt-in fallback (a resize, not a super-resolution model)")
        for name, path in found.items():
            click.echo(f"{name}\t{path}")
        return
    if image is None:
        raise CliError("IMAGE is required (or --list)", exit_code=2)

    def action():
        generator = Generator(model=refine_model or _draft_model(image, refine), device=device, dtype=dtype,
                              outputs=output_dir)  # fmt: skip
        return generator.upscale(image, scale=scale, model=model, tile=tile, refine=refine, search=tuple(upscalers))

    result = _run(action)
    up = result.metadata["upscale"]
    if as_json:
        click.echo(json.dumps({"path": str(result.path), "seconds": result.seconds, "metadata": result.metadata},
                              ensure_ascii=False))  # fmt: skip
        return
    click.echo(f"{result.path}\t{up['width']}x{up['height']}\t{up['upscaler']['name']}")


def _draft_model(image: Path, refine: float | None) -> str | None:
    """The Z-Image model a draft was made with, for re-rendering it (None: the settings' model)."""
    from .outputs import read_metadata

    if refine is None:
        return None
    try:
        return read_metadata(image)["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _show_upscale(meta: dict[str, Any]) -> None:
    up, src = meta["upscale"], meta["source"]
    model = up["upscaler"]
    click.echo(f"upscaled         {src['width']}x{src['height']} -> {up['width']}x{up['height']} ({up['scale']:g}x)")
    click.echo(f"upscaler         {model['name']} ({model['architecture']}, native scale {model['native_scale']})")
    if model.get("file"):
        click.echo(f"upscaler file    {model['file']} sha256 {model['sha256']} ({model['device']}, {model['dtype']})")
    click.echo(f"tile             {up['tile']}")
    click.echo(f"refine           {up['refine']}")
    click.echo(f"seconds          {up['seconds']}")
    click.echo(f"source           {src['file']} sha256 {src['sha256']} ({src.get('format')})")
    if (src.get("metadata") or {}).get("params"):
        p = src["metadata"]["params"]
        click.echo(f"source recipe    {json.dumps(p['prompt'], ensure_ascii=False)} seed {p['seed']}, "
                   f"{p['num_inference_steps']} steps, cfg {p['cfg_scale']}, {p['width']}x{p['height']}")  # fmt: skip


@main.command()
@click.argument("model", required=False)
@click.option("--revision", help="Branch, tag or commit.")
def download(model: str | None, revision: str | None) -> None:
    """Download a model (default Tongyi-MAI/Z-Image-Turbo) into the Hugging Face cache."""
    from .models import download as fetch
    from .settings import DEFAULT_MODEL

    path = _run(lambda: fetch(model or DEFAULT_MODEL, revision=revision))
    click.echo(str(path))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; others need --token.")
@click.option("--port", type=int, default=7860, show_default=True)
@click.option("--model", help="Hub id, diffusers folder, or 'tiny' [env ZSTUDIO_MODEL].")
@click.option("--outputs", type=click.Path(file_okay=False, path_type=Path), help="Output folder [./outputs].")
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the history database, never served [env ZSTUDIO_STATE, one folder per outputs].",
)
@click.option("--token", envvar="ZSTUDIO_TOKEN", help="API/UI token, 16+ characters [env ZSTUDIO_TOKEN]; required "
              "off loopback.")  # fmt: skip
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Another Host name to answer to (a reverse proxy's name); repeatable. Default: the bound names.",
)
@click.option(
    "--max-megapixel-steps",
    type=click.FloatRange(min=0, min_open=True),
    help="Per-request limit on width x height x steps x images / 1e6 [env ZSTUDIO_MAX_MEGAPIXEL_STEPS, 500].",
)
@click.option("--device", help="auto, cuda, cuda:N, mps or cpu.")
@click.option("--speed", help="auto, eager, exact, fast or fastest.")
@click.option("--memory", help="auto, resident, offload-text, 8bit, stream or lowest.")
@click.option("--no-warmup", is_flag=True, help="Skip the warm-up generation at start.")
@click.option("--no-ui", is_flag=True, help="Serve the HTTP API only (no /ui).")
@click.option("--upscaler", "upscalers", multiple=True, type=click.Path(path_type=Path),
              help="An upscaler model file or folder of them, offered by name on /api/v1/upscalers; repeatable "
              "[env ZSTUDIO_UPSCALERS, ':'-separated].")  # fmt: skip
@click.option("--max-input-mb", type=click.FloatRange(min=0, min_open=True), default=MAX_INPUT_BYTES / 2**20,
              show_default=True, help="The largest picture an edit or upscale request may upload, in MiB.")  # fmt: skip
@click.option("--ray", "use_ray", is_flag=True, help="Run the engines as Ray Serve replicas (pip install "
              "'zstudio[ray]'); this process keeps the API, queue and history. See docs/SCALE.md.")  # fmt: skip
@click.option("--replicas", type=click.IntRange(min=1), help="With --ray: engine replicas [the cluster's GPUs / "
              "--gpus-per-replica; 1 without GPUs].")  # fmt: skip
@click.option("--gpus-per-replica", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --ray: GPUs each replica holds.")  # fmt: skip
@click.option("--address", "ray_address", help="With --ray: a Ray cluster to join ('auto': the one this host "
              "belongs to) [a new local one].")  # fmt: skip
@click.option("--parallel", help="ulysses:N splits each image over N GPUs of this host (2-8); see docs/SCALE.md.")
def serve(host, port, model, outputs, state, token, allowed_hosts, max_megapixel_steps, device, speed, memory,
          no_warmup, no_ui, upscalers, max_input_mb, use_ray, replicas, gpus_per_replica, ray_address,
          parallel) -> None:  # fmt: skip
    """Serve the web UI (/ui), the HTTP API (/api/v1, /v1/images/generations, /docs), MCP (/mcp) and /metrics."""
    from .server.app import serve as run_server

    _run(
        lambda: run_server(
            host=host,
            port=port,
            model=model,
            outputs=outputs,
            token=token,
            device=device,
            speed=speed,
            memory=memory,
            warmup=not no_warmup,
            state=state,
            allowed_hosts=allowed_hosts,
            max_megapixel_steps=max_megapixel_steps,
            ui=not no_ui,
            upscalers=tuple(str(path) for path in upscalers),
            max_input_bytes=int(max_input_mb * 2**20),
            ray=use_ray,
            replicas=replicas,
            gpus_per_replica=gpus_per_replica,
            ray_address=ray_address,
            parallel=parallel,
        )
    )


@main.command("mcp")
@click.option("--server", "server_url", help="A running `zstudio serve` to forward to, e.g. http://127.0.0.1:7860.")
@click.option("--token", envvar="ZSTUDIO_TOKEN", help="That server's token [env ZSTUDIO_TOKEN].")
@click.option("--model", help="Without --server: hub id, diffusers folder, 'demo' or 'tiny' [env ZSTUDIO_MODEL].")
@click.option("--outputs", type=click.Path(file_okay=False, path_type=Path), help="Without --server: output folder.")
@click.option("--state", type=click.Path(file_okay=False, path_type=Path), help="Without --server: history folder.")
@click.option("--device", help="Without --server: auto, cuda, cuda:N, mps or cpu.")
@click.option("--speed", help="Without --server: auto, eager, exact, fast or fastest.")
@click.option("--memory", help="Without --server: auto, resident, offload-text, 8bit, stream or lowest.")
def mcp_command(server_url, token, model, outputs, state, device, speed, memory) -> None:
    """MCP over stdin/stdout for AI agents (Claude Desktop, Cursor, ...): tools generate_image, list_history,
    get_image and server_status. Forwards to --server when given, else loads the model here."""
    from .server.mcp import serve_stdio

    _run(lambda: serve_stdio(server_url=server_url, token=token, model=model, outputs=outputs, state=state,
                             device=device, speed=speed, memory=memory))  # fmt: skip


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def bench(ctx: click.Context) -> None:
    """GPU benchmark: diffusers vs zstudio's speed modes (full-size random weights). `zstudio bench --help`."""
    from .bench.run import main as bench_main

    bench_main(ctx.args)


if __name__ == "__main__":
    main()
