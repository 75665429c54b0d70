"""How often the demo model draws what it was asked for, judged by `zstudio.demo.evaluator`.

`python -m zstudio.demo.accuracy --count 120 --json docs/demo/accuracy.json` generates through the engine (the same
path as the CLI, server and UI) from prompts about (shape, colour, background) combinations that training never saw,
and writes the table the README shows. `--grid FILE` also saves a labelled picture grid. `--split training` draws
prompts about combinations training did see (another seed): the validation set for choosing between models and
settings, so that the held-out prompts stay a test.
"""

from __future__ import annotations

import argparse
import json
import random
import textwrap
import time
from pathlib import Path
from typing import Any

from .dataset import Scene
from .evaluator import judge
from .train import split_scenes

FACTORS = ("color", "background", "shape", "position")


SPLITS = ("held-out", "training")


def demo_prompts(count: int, language: str, seed: int = 0, split: str = "held-out") -> list[tuple[Scene, str]]:
    """`count` (scene, caption) pairs drawn with a fixed seed from the held-out (or the training) combinations."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    train, test = split_scenes()
    pool, key = (test, f"{seed}-{language}") if split == "held-out" else (train, f"{seed}-{language}-{split}")
    rng = random.Random(key)
    scenes = [rng.choice(pool) for _ in range(count)]
    return [(s, rng.choice(s.captions_en() if language == "en" else s.captions_zh())) for s in scenes]


def measure(generator, prompts: list[tuple[Scene, str]], steps: int | None = None, cfg: float | None = None
            ) -> dict[str, Any]:  # fmt: skip
    """Generate each prompt once (seed = its index) and judge it; returns per-factor accuracy and the misses."""
    from ..params import GenerationParams

    right = dict.fromkeys(FACTORS, 0)
    misses, images = [], []
    start = time.perf_counter()
    for seed, (scene, prompt) in enumerate(prompts):
        params = GenerationParams(prompt=prompt, seed=seed, num_inference_steps=steps, cfg_scale=cfg)
        image = generator.generate_images(params).images[0]
        images.append(image)
        seen = judge(image)
        for factor in FACTORS:
            right[factor] += getattr(seen, factor) == getattr(scene, factor)
        if (seen.color, seen.background, seen.shape) != (scene.color, scene.background, scene.shape):
            misses.append({"prompt": prompt, "seed": seed, "seen": [seen.color, seen.background, seen.shape]})
    n = len(prompts)
    return {
        "prompts": n,
        "accuracy": {factor: right[factor] / n for factor in FACTORS},
        "seconds_per_image": (time.perf_counter() - start) / n,
        "misses": misses,
        "images": images,
    }


def grid(images, captions: list[str], columns: int = 4, scale: int = 3):
    """Pictures enlarged `scale` times (nearest, so pixels stay honest) with their prompt underneath."""
    from PIL import Image, ImageDraw

    side = images[0].width * scale
    label = 30
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (side + 8) + 8, rows * (side + label + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = 8 + (i % columns) * (side + 8), 8 + (i // columns) * (side + label + 8)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x, y + side + 2), "\n".join(textwrap.wrap(caption, 32)[:2]), fill="black", spacing=1)
    return sheet


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..engine import Generator

    parser = argparse.ArgumentParser(prog="python -m zstudio.demo.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--steps", default="default,9", help="comma list; 'default' is the model's own")
    parser.add_argument("--split", choices=SPLITS, default="held-out", help="whose combinations the prompts are about")
    parser.add_argument("--cfg", type=float, help="CFG scale [default: the model's own]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid", type=Path, help="save a grid of the first English pictures here")
    args = parser.parse_args(argv)
    generator = Generator(model=args.model, device=args.device, dtype="float32").load()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "split": args.split, "runs": []}
    cfg = generator.profile.cfg_scale if args.cfg is None else args.cfg
    for steps_text in args.steps.split(","):
        steps = None if steps_text == "default" else int(steps_text)
        for language in ("en", "zh"):
            prompts = demo_prompts(args.count, language, split=args.split)
            result = measure(generator, prompts, steps=steps, cfg=cfg)
            images = result.pop("images")
            if args.grid and language == "en" and steps is None:
                grid(images[:12], [p for _, p in prompts[:12]]).save(args.grid)
            result.update(language=language, steps=steps or generator.profile.num_inference_steps, cfg=cfg)
            report["runs"].append(result)
            scores = ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items())
            print(
                f"steps {result['steps']:3} {language}: {scores} ({result['seconds_per_image']:.2f} s/image)",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    main()
