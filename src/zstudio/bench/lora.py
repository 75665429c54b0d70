"""LoRA benchmark: per-image seconds with 0, 1 and 3 LoRAs, the cost of switching sets, and whether switching
compiled anything new.

`python -m zstudio.bench.lora --folder CKPT --json OUT` loads CKPT in the default speed mode (`fast` on a GPU:
blocks compiled, LoRAs fused into the weights), writes random rank-32 LoRAs for every attention and feed-forward
linear of its transformer, warms up, then times generations in the order 0 → 1 → 3 → 0 LoRAs (each switch timed
alone through `Generator.apply_loras`) and counts the graphs dynamo compiled during the timed part (0 means no
request recompiled). On the CPU tests run it on the tiny checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..lora import LoraFolder
from .arch import RANDOM, random_generator
from .run import emit, gpu_info, stats, sync, timed


def random_loras(transformer, folder: Path, count: int, rank: int = 32, seed: int = 0) -> list[str]:
    """`count` random rank-`rank` LoRAs (diffusers/PEFT layout) on every attention and feed-forward linear."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        tensors = {}
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and (".attention." in name or ".feed_forward." in name):
                scale = 0.1 / rank**0.5
                a = torch.randn(rank, module.in_features, generator=gen) * scale
                b = torch.randn(module.out_features, rank, generator=gen) * scale
                tensors[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16)
                tensors[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16)
        save_file(tensors, str(folder / f"bench{i}.safetensors"))
        names.append(f"bench{i}")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from ..engine import Generator
    from ..params import GenerationParams

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help=f"a diffusers checkpoint folder (Z-Image, or a tiny one), or "
                        f"{RANDOM!r}: the full-size architecture with random weights built on the GPU")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--speed", default=None, help="speed mode [default: the device's default]")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    if args.folder == RANDOM:
        load_s, generator = timed(lambda: random_generator(args.device or "cuda", speed=args.speed or "auto",
                                                           outputs=tempfile.mkdtemp()))  # fmt: skip
    else:
        generator = Generator(model=args.folder, speed=args.speed, device=args.device, outputs=tempfile.mkdtemp())
        load_s, _ = timed(generator.load)
    folder = Path(tempfile.mkdtemp(prefix="zstudio-bench-lora-"))
    generator.loras.folder = LoraFolder(folder)
    names = random_loras(generator.pipe.transformer, folder, 3, args.rank)
    sets = {"0": (), "1": ((names[0], 0.8),), "3": tuple((n, 0.5) for n in names)}

    def params(loras) -> GenerationParams:
        return GenerationParams(prompt="a lighthouse at dusk, oil painting", width=width, height=height,
                                num_inference_steps=args.steps, seed=0, loras=loras)  # fmt: skip

    warmup_s, _ = (  # the timed size only: every graph a request here meets
        timed(lambda: generator.warmup(sizes=((width, height),)))
        if generator.compiled
        else timed(lambda: generator.generate_images(params(())))
    )
    print(f"loaded in {load_s:.1f} s, warmed up in {warmup_s:.1f} s", flush=True)
    for loras in sets.values():  # loads each file once and runs each set once: first-use costs stay out of the timings
        generator.generate_images(params(loras))
    graphs_before = counters["stats"]["unique_graphs"]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m zstudio.bench.lora " + " ".join(sys.argv[1:] if argv is None else argv),
        **gpu_info(),
        "device": str(generator.device),
        "speed": generator.speed,
        "memory": generator.memory,
        "way": "fused" if generator.loras.fused else "adapters",
        "size": args.size,
        "steps": args.steps,
        "rank": args.rank,
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),
        "per_image_s": {},
        "switch_s": {},
    }
    previous = "3"
    for label in ("0", "1", "3"):
        switch = []
        for _ in range(args.repeats):
            generator.apply_loras(params(sets[previous]))
            sync()
            seconds, _ = timed(lambda label=label: generator.apply_loras(params(sets[label])))
            switch.append(seconds)
        report["switch_s"][f"{previous}->{label}"] = stats(switch)
        per_image = [timed(lambda label=label: generator.generate_images(params(sets[label])))[0]
                     for _ in range(args.repeats)]  # fmt: skip
        report["per_image_s"][label] = stats(per_image)
        print(f"{previous}->{label}: switch {report['switch_s'][f'{previous}->{label}']}, per image "
              f"{report['per_image_s'][label]}", flush=True)  # fmt: skip
        previous = label
    report["graphs_compiled_while_switching"] = counters["stats"]["unique_graphs"] - graphs_before
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
