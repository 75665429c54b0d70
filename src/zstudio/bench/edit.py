"""Editing as a user calls it, timed end to end: `generate(image=...)` to the PNG on disk.

`python -m zstudio.bench.edit --json out.json` builds the full-size architecture with random weights on the GPU (speed
and memory do not depend on the weight values), warms the default speed mode up at `--size` as `zstudio serve` does,
then times, with a new prompt on every call:
- text-to-image (the reference for the rest);
- image-to-image of the first result at `--strength` (default 0.6: diffusers' default; 5 of 8 evaluations);
- inpainting with a centred square mask (strength 1.0, all 8 evaluations) and with the same mask at `--strength`;
and reports the compiler's count of new graphs after the warm-up (editing runs the warm-up's graphs: 0 expected).
`--cpu-smoke DIR` runs the same calls on a checkpoint folder on the CPU (the test of this script).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from .run import emit, gpu_info
from .user import Prompts, compile_count


def timed_calls(generator, prompts: Prompts, calls: int, out: Path, **fields: Any) -> dict[str, Any]:
    """Wall seconds of `generate()` (PNG written) for `calls` new prompts, with the engine's own breakdown."""
    walls, breakdowns, paths = [], [], []
    for _ in range(calls):
        start = time.perf_counter()
        written, _, meta = generator.generate(prompt=prompts(), seed=7, output_dir=out, **fields)
        walls.append(time.perf_counter() - start)
        breakdowns.append(meta["timings"])
        paths.append(written[0])
    evaluations = meta["images"][0].get("transformer_evaluations")
    return {"median_s": statistics.median(walls), "calls_s": walls, "timings": breakdowns[-1],
            "transformer_evaluations": evaluations, "path": paths[-1]}  # fmt: skip


def centred_mask(size: tuple[int, int], folder: Path) -> str:
    """White (repaint) on the centre quarter of the picture, black elsewhere."""
    width, height = size
    mask = Image.new("L", size, 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    path = folder / "mask.png"
    mask.save(path)
    return str(path)


def run(generator, size: tuple[int, int], strength: float, calls: int, out: Path) -> dict[str, Any]:
    width, height = size
    report: dict[str, Any] = {"size": f"{width}x{height}", "speed": generator.speed, "memory": generator.memory}
    start = time.perf_counter()
    generator.warmup(sizes=(size,))
    report["warmup_s"] = time.perf_counter() - start
    graphs = compile_count()
    text = timed_calls(generator, Prompts("t2i"), calls, out, width=width, height=height)
    source = text.pop("path")
    mask = centred_mask(size, out)
    report["text_to_image"] = text
    report["image_to_image"] = timed_calls(generator, Prompts("i2i"), calls, out, image=source, strength=strength)
    report["inpaint"] = timed_calls(generator, Prompts("inpaint"), calls, out, image=source, mask=mask)
    report["inpaint_at_strength"] = timed_calls(generator, Prompts("inpaint-s"), calls, out, image=source, mask=mask,
                                                strength=strength)  # fmt: skip
    for key in ("image_to_image", "inpaint", "inpaint_at_strength"):
        report[key].pop("path")
    report["new_graphs_after_warmup"] = compile_count() - graphs
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..engine import Generator

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.edit", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--speed", default=None, help="speed mode (default: the engine's default)")
    parser.add_argument("--cpu-smoke", type=Path, help="a checkpoint folder: run on the CPU (a test, not a benchmark)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    out = Path(tempfile.mkdtemp(prefix="zstudio-bench-edit-"))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": "python -m zstudio.bench.edit " +
                              " ".join(argv if argv is not None else __import__("sys").argv[1:])}  # fmt: skip
    if args.cpu_smoke:
        generator = Generator(model=str(args.cpu_smoke), device="cpu", speed=args.speed or "auto", outputs=out)
    else:
        from .arch import random_generator

        report.update(gpu_info())
        generator = random_generator(speed=args.speed or "auto", outputs=out)
    report.update(run(generator, size, args.strength, args.calls, out))
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
