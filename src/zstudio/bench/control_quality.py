"""How close zstudio's controlled images are to diffusers' `ZImageControlNetPipeline` on the same weights and seeds.

`python -m zstudio.bench.control_quality --folder CKPT --json OUT` writes the full-size random-weight checkpoint to
CKPT if it is not there (`bench.user.ensure_checkpoint`) and, per Union layout (`--unions`), a full-size random
ControlNet folder beside it. diffusers' pipeline, loaded from those folders, draws the references from the prompt
text (its own text path) with a Canny control image; then zstudio's `Generator` (speed `--speed`, default `fast`)
draws the same requests from its own text path, with the same control image passed as it is (`control_type` canny,
no preprocessing) and the same starting latents. PSNR per request, in dB. `--size 128 --folder TINY` runs it on the
tiny checkpoint on the CPU (the tests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .arch import UNIONS, build_controlnet, randomize_
from .run import emit, gpu_info, psnr

REQUESTS = [("a lighthouse on a cliff at dusk, oil painting", 0), ("a bowl of ramen, studio photo", 1),
            ("一只在雪地里的红狐狸", 2)]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    from ..control import canny
    from ..engine import Generator
    from ..models import quiet_loading
    from ..params import GenerationParams
    from .control import control_picture
    from .user import ensure_checkpoint

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.control_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, required=True, help="checkpoint folder (written if missing)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--unions", nargs="+", default=sorted(UNIONS), choices=sorted(UNIONS))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.75)
    parser.add_argument("--speed", default="fast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not (args.folder / "model_index.json").is_file():
        ensure_checkpoint(args.folder)
    work = Path(tempfile.mkdtemp(prefix="zstudio-control-quality-"))
    control_path = work / "canny.png"
    canny(Image.open(control_picture(args.size, args.size, work / "scene.png")).convert("RGB")).save(control_path)
    control_image = Image.open(control_path).convert("RGB")
    folders = {}
    for union in args.unions:  # random ControlNets on disk, as a user's would be
        folders[union] = work / f"controlnet-{union}"
        random_controlnet(union, args.size, device, dtype).save_pretrained(folders[union])

    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), **gpu_info(), "size": args.size,
                              "steps": args.steps, "control_scale": args.scale, "speed": args.speed,
                              "command": "python -m zstudio.bench.control_quality " + " ".join(
                                  sys.argv[1:] if argv is None else argv), "psnr_db": {}}  # fmt: skip
    generator = Generator(model=str(args.folder), device=str(device), speed="eager", outputs=work / "out").load()
    latents = {seed: generator.prepare_latents([seed], args.size, args.size).cpu() for _, seed in REQUESTS}
    generator = None

    references: dict[str, list[np.ndarray]] = {}
    with quiet_loading():
        pipe = None
        for union, folder in folders.items():
            controlnet = ZImageControlNetModel.from_pretrained(folder, torch_dtype=dtype)
            if pipe is None:
                pipe = ZImageControlNetPipeline.from_pretrained(args.folder, controlnet=controlnet, torch_dtype=dtype)
                pipe.to(device)
                pipe.set_progress_bar_config(disable=True)
            else:
                pipe.controlnet = ZImageControlNetModel.from_transformer(controlnet, pipe.transformer).to(device)
            with torch.inference_mode():
                references[union] = [np.asarray(pipe(prompt=prompt, width=args.size, height=args.size,
                                                     num_inference_steps=args.steps, guidance_scale=0.0,
                                                     control_image=control_image,
                                                     controlnet_conditioning_scale=args.scale,
                                                     latents=latents[seed].to(device)).images[0])
                                     for prompt, seed in REQUESTS]  # fmt: skip
    pipe = None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    for union, folder in folders.items():
        generator = Generator(model=str(args.folder), device=str(device), speed=args.speed, memory="resident",
                              controlnet=str(folder), outputs=work / "out").load()  # fmt: skip
        scores = []
        for (prompt, seed), reference in zip(REQUESTS, references[union]):
            params = GenerationParams(prompt=prompt, width=args.size, height=args.size, seed=seed,
                                      num_inference_steps=args.steps, cfg_scale=0.0, control=str(control_path),
                                      control_type="canny", control_scale=args.scale)  # fmt: skip
            image = generator.generate_images(params).images[0]
            scores.append(round(psnr(np.asarray(image), reference), 2))
        report["psnr_db"][union] = scores
        report.setdefault("zstudio_speed", {})[union] = generator.speed
        print(f"Union {union}: PSNR vs diffusers' ZImageControlNetPipeline {scores} dB", flush=True)
        generator = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit(report, args.json)
    return report


def random_controlnet(union: str, size: int, device: torch.device, dtype: torch.dtype):
    """The full-size ControlNet of `union`'s layout; below 512 px (the tiny checkpoint) one of the tiny sizes in
    that layout, two control blocks."""
    if size >= 512:
        return build_controlnet(device, dtype, torch.Generator(device).manual_seed(1), **UNIONS[union])
    from diffusers import ZImageControlNetModel

    from ..tiny import TINY_SIZES
    from ..tiny import build_controlnet as tiny_controlnet

    layout, config = UNIONS[union], tiny_controlnet(TINY_SIZES).config
    refiner = layout.get("add_control_noise_refiner")
    refiner_places = list(range(config["n_refiner_layers"])) if refiner else None
    config = {**config, "control_layers_places": [0, 1], "control_in_dim": layout["control_in_dim"],
              "add_control_noise_refiner": refiner, "control_refiner_layers_places": refiner_places}  # fmt: skip
    model = ZImageControlNetModel.from_config(config).eval()
    randomize_(model, torch.Generator().manual_seed(1), std=0.1)
    return model


if __name__ == "__main__":
    main()
