"""ControlNet benchmark: seconds per image without control, with control, and without again, and whether switching
compiled anything after the warm-up.

`python -m zstudio.bench.control --folder random-full-size --json OUT` builds the full-size Z-Image-Turbo and a
full-size Union 2.x ControlNet (`arch.CONTROLNET`) with random weights on the GPU, in the default speed mode (`fast`:
both compiled), warms up at the timed size (a plain and a controlled image), then makes `--repeats` images each
without control, with a Canny control (the preprocessing is part of the request), and without control again, a new
prompt every call, through the product's `Generator.generate`. `graphs_compiled_after_warmup` counts the graphs dynamo
compiled during the timed part (0: switching control on and off recompiled nothing). `ratio` is the median with
control over the median without (the issue's target: at most 1.35), per `generate` call with its PNG save;
`engine_ratio` the same without the save. `--folder CKPT` uses a checkpoint folder and its
`controlnet/` (the tiny one, on the CPU, in the tests).
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
from PIL import Image, ImageDraw

from .arch import RANDOM, UNIONS, build_controlnet, random_generator
from .run import emit, gpu_info, stats, sync, timed


def control_picture(width: int, height: int, path: Path) -> Path:
    """A drawn scene (discs, bars, a ring) whose Canny edges are a realistic control image."""
    image = Image.new("RGB", (width, height), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(0)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 20, width // 6))
        colour = tuple(int(v) for v in rng.integers(60, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    draw.ellipse((width // 3, height // 3, 2 * width // 3, 2 * height // 3), outline="white", width=8)
    image.save(path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from ..control import UNION_TYPES, ControlNetSource
    from ..engine import Generator
    from ..tiny import CONTROLNET_FOLDER

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.control", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help=f"a diffusers checkpoint folder with a controlnet/ folder "
                        f"(the tiny one), or {RANDOM!r}: the full-size architecture and a full-size Union 2.x "
                        "ControlNet with random weights built on the GPU")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.75, help="control_scale")
    parser.add_argument("--end", type=float, default=1.0, help="control_end: control on the steps before it")
    parser.add_argument("--speed", default=None, help="speed mode [default: the device's default]")
    parser.add_argument("--memory", default=None, help="memory mode [default: auto]")
    parser.add_argument("--device", default=None)
    parser.add_argument("--union", choices=sorted(UNIONS), default="2.1", help="the random ControlNet's layout: "
                        "2.1 (15 control blocks + 2 refiner blocks, as 2.0) or 1.0 (6 control blocks)")  # fmt: skip
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    outputs = tempfile.mkdtemp(prefix="zstudio-bench-control-")

    def build() -> Generator:
        if args.folder == RANDOM:
            device = args.device or "cuda"
            generator = random_generator(device, speed=args.speed or "auto", memory=args.memory, outputs=outputs)
            rng = torch.Generator(device).manual_seed(1)
            controlnet = build_controlnet(torch.device(device), generator.dtype, rng, **UNIONS[args.union])
            source = ControlNetSource(f"random-union-{args.union}", Path("."), None, UNION_TYPES)
            generator.install_controlnet(controlnet, source)
            return generator
        return Generator(model=args.folder, controlnet=str(Path(args.folder) / CONTROLNET_FOLDER), speed=args.speed,
                         memory=args.memory, device=args.device, outputs=outputs).load()  # fmt: skip

    load_s, generator = timed(build)
    picture = control_picture(width, height, Path(outputs) / "control-source.png")
    control = {"control": str(picture), "control_type": "canny", "control_preprocess": True,
               "control_scale": args.scale, "control_end": args.end}  # fmt: skip
    calls = iter(range(10_000))

    engine_s: dict[bool, list[float]] = {False: [], True: []}

    def image(with_control: bool) -> float:
        """Wall seconds of one `generate` call (with its PNG save); the engine's own total (no save) is kept aside."""
        prompt = f"a lighthouse on a cliff at dusk, oil painting, variant {next(calls)}"  # a new prompt each call
        extra = control if with_control else {}
        seconds, (_, total, _) = timed(lambda: generator.generate(prompt, width=width, height=height,
                                                                  num_inference_steps=args.steps, cfg_scale=0.0,
                                                                  seed=0, **extra))  # fmt: skip
        engine_s[with_control].append(total)
        return seconds

    # Warm-up at the timed size only: one plain and one controlled image compile every graph the timed calls meet
    # (`Generator.warmup` would also compile batches 2-4 and guided requests, minutes of no use here).
    warmup_s = image(False) + image(True) + image(False)
    print(f"loaded in {load_s:.1f} s, warmed up in {warmup_s:.1f} s", flush=True)
    graphs_before = counters["stats"]["unique_graphs"]
    for samples in engine_s.values():
        samples.clear()  # the warm-up's
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timings: dict[str, list[float]] = {"without": [], "with": [], "without_again": []}
    for label in timings:
        timings[label] = [image(label == "with") for _ in range(args.repeats)]
        print(f"{label}: {stats(timings[label])}", flush=True)
    sync()
    medians = {label: stats(samples)["median"] for label, samples in timings.items()}
    controlnet_params = sum(p.numel() for n, p in generator.controlnet.named_parameters()
                            if n.startswith("control_"))  # fmt: skip
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m zstudio.bench.control " + " ".join(sys.argv[1:] if argv is None else argv),
        **gpu_info(),
        "device": str(generator.device),
        "speed": generator.speed,
        "memory": generator.memory,
        "size": args.size,
        "steps": args.steps,
        "control_scale": args.scale,
        "control_end": args.end,
        "union": args.union if args.folder == RANDOM else None,
        "controlnet_own_params_b": round(controlnet_params / 1e9, 3),
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),
        "per_image_s": {label: stats(samples) for label, samples in timings.items()},
        "ratio": round(medians["with"] / medians["without"], 3),
        # Without the PNG save (the engine's timings.total: encode, denoise, decode; "without" holds both plain runs).
        "engine_s": {"without": stats(engine_s[False]), "with": stats(engine_s[True])},
        "engine_ratio": round(stats(engine_s[True])["median"] / stats(engine_s[False])["median"], 3),
        "target_ratio": 1.35,
        "graphs_compiled_after_warmup": counters["stats"]["unique_graphs"] - graphs_before,
    }
    if torch.cuda.is_available():
        report["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
