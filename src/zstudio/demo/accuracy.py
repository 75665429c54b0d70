"""How often the demo model draws what it was asked for, judged by `zstudio.demo.evaluator`.

`python -m zstudio.demo.accuracy --count 200 --json docs/demo/accuracy.json --grid docs/demo/grid.png` generates
through the engine (the same path as the CLI, server and UI), at the model's default steps and at Turbo's 8, from
prompts about one-shape and two-shape scenes whose (shape, colour, background) combinations training never saw, and
writes the table the README shows (with the evaluator's decision margins) and a grid of 32 held-out pictures.
`--split validation` draws prompts about combinations training did see, with another seed: the set for choosing
between candidate models and settings, so that the held-out prompts stay a test, looked at once per shipped model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .dataset import PairScene, Scene, split_pair_scenes, split_scenes
from .evaluator import judge, judge_pair

SPLITS = ("held-out", "validation")
KINDS = ("single", "pair")
FACTORS = {"single": ("color", "background", "shape", "position"), "pair": ("background", "shapes", "relation", "all")}
# The bars, on the held-out prompts of each language, at the default steps and at 8.
TARGETS = {
    "single": {"color": 0.98, "background": 0.98, "shape": 0.95, "position": 0.90},
    "pair": {"all": 0.80},
}
NEAR = 0.05  # a shape margin below this is "near a decision boundary"


def demo_prompts(
    count: int, language: str, seed: int = 0, split: str = "held-out", kind: str = "single"
) -> list[tuple[Scene | PairScene, str]]:
    """`count` (scene, caption) pairs drawn with a fixed seed from the held-out (or validation) combinations."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    train, test = split_scenes() if kind == "single" else split_pair_scenes()
    pool = test if split == "held-out" else train
    rng = random.Random(f"{seed}-{language}-{split}-{kind}")
    scenes = [rng.choice(pool) for _ in range(count)]
    return [(s, rng.choice(s.captions_en() if language == "en" else s.captions_zh())) for s in scenes]


def score(image, scene: Scene | PairScene) -> tuple[dict[str, bool], list[float], Any]:
    """Each factor right or wrong, the shape margins, and what the evaluator saw."""
    if isinstance(scene, Scene):
        j = judge(image)
        right = {
            "color": j.color == scene.color,
            "background": j.background == scene.background,
            "shape": j.shape == scene.shape,
            "position": j.position == scene.position,
        }
        return right, ([j.margin] if j.color is not None else []), [j.color, j.background, j.shape, j.position]
    p = judge_pair(image, scene)
    right = {"background": p.background, "shapes": p.a and p.b, "relation": p.relation, "all": p.all_right}
    return right, [m for m in p.margins if m > -1], [p.background, p.a, p.b, p.seen_relation, p.count]


def measure(
    generator, prompts: list[tuple[Scene | PairScene, str]], steps: int | None = None, cfg: float | None = None
) -> dict[str, Any]:
    """Generate each prompt once (seed = its index) and judge it; per-factor accuracy, margins and the misses."""
    from ..params import GenerationParams

    kind = "single" if isinstance(prompts[0][0], Scene) else "pair"
    right = dict.fromkeys(FACTORS[kind], 0)
    misses, images, margins = [], [], []
    start = time.perf_counter()
    for seed, (scene, prompt) in enumerate(prompts):
        params = GenerationParams(prompt=prompt, seed=seed, num_inference_steps=steps, cfg_scale=cfg)
        image = generator.generate_images(params).images[0]
        images.append(image)
        result, shape_margins, seen = score(image, scene)
        margins += shape_margins
        for factor in right:
            right[factor] += result[factor]
        if not all(result.values()):
            misses.append({"prompt": prompt, "seed": seed, "seen": seen})
    n = len(prompts)
    return {
        "kind": kind,
        "prompts": n,
        "accuracy": {factor: right[factor] / n for factor in right},
        "margins": {
            "median": round(statistics.median(margins), 3) if margins else None,
            f"below_{NEAR}": sum(m < NEAR for m in margins),
            "judged_shapes": len(margins),
        },
        "seconds_per_image": (time.perf_counter() - start) / n,
        "misses": misses,
        "images": images,
    }


def meets_targets(result: dict[str, Any]) -> bool:
    return all(result["accuracy"][f] >= bar for f, bar in TARGETS[result["kind"]].items())


def grid(images, captions: list[str], columns: int = 8, scale: int = 1):
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
        wrapped = textwrap.wrap(caption, max(10, side // 6))[:2]
        draw.multiline_text((x, y + side + 2), "\n".join(wrapped), fill="black", spacing=1)
    return sheet


_GENERATORS: dict[tuple, Any] = {}


def show(result: dict[str, Any]) -> dict[str, Any]:
    scores = ", ".join(f"{k} {v:.1%}" for k, v in result["accuracy"].items())
    print(
        f"steps {result['steps']:3} {result['kind']:6} {result['language']}: {scores}; margins {result['margins']} "
        f"({result['seconds_per_image']:.2f} s/image)",
        flush=True,
    )
    return result


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (steps, kind, language) run; the generator is loaded once per process."""
    from ..engine import Generator

    key = (job["model"], job["device"], job["speed"])
    if key not in _GENERATORS:
        _GENERATORS[key] = Generator(model=key[0], device=key[1], dtype="float32", speed=key[2]).load()
    generator = _GENERATORS[key]
    cfg = generator.profile.cfg_scale if job["cfg"] is None else job["cfg"]
    prompts = demo_prompts(job["count"], job["language"], split=job["split"], kind=job["kind"])
    result = measure(generator, prompts, steps=job["steps"], cfg=cfg)
    images = result.pop("images")
    keep = job["language"] == "en" and job["steps"] is None  # the grid's pictures
    result["grid"] = list(zip(images[:16], [p for _, p in prompts[:16]])) if keep else []
    result.update(language=job["language"], steps=job["steps"] or generator.profile.num_inference_steps, cfg=cfg)
    result["meets_targets"] = meets_targets(result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m zstudio.demo.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="'demo' (the shipped model) or a checkpoint folder")
    parser.add_argument("--count", type=int, default=200, help="prompts per language, kind and step count")
    parser.add_argument("--steps", default="default,8", help="comma list; 'default' is the model's own")
    parser.add_argument("--kinds", default="single,pair", help="comma list of single, pair")
    parser.add_argument("--split", choices=SPLITS, default="held-out", help="whose combinations the prompts are about")
    parser.add_argument("--cfg", type=float, help="CFG scale [default: the model's own]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--speed", default="exact", help="the engine's speed mode (exact: what the CPU runs)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one run each (a GPU has room for 8)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid", type=Path, help="save 32 English pictures at the default steps (16 of each kind)")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "device": args.device,
        "split": args.split,
        "targets": TARGETS,
        "runs": [],
    }
    jobs = [
        {"model": args.model, "device": args.device, "speed": args.speed, "count": args.count, "split": args.split,
         "cfg": args.cfg, "kind": kind, "language": language, "steps": None if steps == "default" else int(steps)}
        for steps in args.steps.split(",") for kind in args.kinds.split(",") for language in ("en", "zh")
    ]  # fmt: skip
    if args.workers > 1:  # spawned: CUDA cannot be forked
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.workers, len(jobs)), mp_context=context) as pool:
            results = pool.map(run_one, jobs)
            report["runs"] = [show(r) for r in results]
    else:
        report["runs"] = [show(run_one(job)) for job in jobs]
    pictures = [p for r in report["runs"] for p in r.pop("grid")]
    report["meets_targets"] = all(r["meets_targets"] for r in report["runs"])
    # One number to choose candidates by (on the validation split): the mean accuracy over the targets' factors.
    report["score"] = round(statistics.mean(r["accuracy"][f] for r in report["runs"] for f in TARGETS[r["kind"]]), 4)
    print(f"score {report['score']:.4f}; meets the targets: {report['meets_targets']}", flush=True)
    if args.grid and pictures:
        grid([p for p, _ in pictures], [c for _, c in pictures]).save(args.grid)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


if __name__ == "__main__":
    main()
