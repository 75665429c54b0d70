"""Low-memory modes with a new prompt on every call, under memory caps: `generate()` to a PNG on disk.

`python -m zstudio.bench.lowmem --folder DIR --json OUT` writes the full-size random-weight checkpoint to DIR (diffusers
layout, once), then runs one fresh process per step, each with a time limit, so one failure does not end the run:
- `quality` (uncapped, resident, speed exact): the text encoder's hidden states on a set of prompts in bf16 on the GPU,
  then streamed from a pinned copy and without one (both must be identical), then int8 weight-only (cosine similarity
  and relative error per prompt), seconds per new prompt in each placement, and one 1024x1024 picture with the bf16
  encoder against the int8 one (PSNR);
- `cap` per cap (`--caps`, GiB; `torch.cuda.set_per_process_memory_fraction`, which a process cannot lift for what it
  already holds, hence one process each): the product's loader with `memory=auto` and `--speed` (default auto: compiled
  where the memory mode allows), the chosen memory mode, text-encoder placement and speed, load seconds, one warm-up
  call (it compiles), then `--calls` calls of `generate()` at 1024x1024, 8 steps, cfg 0, each with a new prompt, PNG
  written: wall seconds, the engine's breakdown, peak reserved GPU memory, peak host RSS, and one repeated-prompt call.

The compiler's caches are the product's (under the zstudio cache folder), so a later cap in the same memory mode reuses
the first one's kernels. `--device cpu --folder TINY --size 256x256 --steps 2` is the smoke test on a tiny checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .run import emit, gpu_info, psnr, stats, sync

CAPS = (16, 12, 8, 6)
TARGETS_S = {16: 1.5, 12: 1.7, 8: 2.5, 6: 5.0}  # issue 12: seconds per call with a new prompt, per cap in GiB
QUALITY_PROMPTS = (
    "a red fox in fresh snow, morning light, telephoto photograph",
    "一只在雨后的京都街道上撑伞的女人, 电影感, 35mm",
    "minimalist product photo of a white sneaker on a pastel background",
    "A cozy evening street in Kyoto after rain, paper lanterns glowing warm orange, a woman in a red kimono with an "
    "umbrella walking past a small ramen shop, reflections on wet stone, cinematic lighting, 35mm film, soft bokeh",
    "an isometric pixel-art city at night with neon signs that read OPEN 24H",
    "watercolor portrait of an old fisherman, loose brush strokes, muted palette",
    "macro photo of a dew drop on a spider web, shallow depth of field",
    "a bowl of ramen, top-down, studio lighting, 8k food photography",
)
QUALITY_SEED = 11


def host_peak_gb() -> float:
    """This process's peak resident host memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def new_prompts(tag: str):
    count = 0

    def prompt() -> str:
        nonlocal count
        count += 1
        return f"{QUALITY_PROMPTS[3]}, {tag} variation {count}"

    return prompt


# ---------------------------------------------------------------------------------------------------- one cap
def run_cap(args) -> dict[str, Any]:
    """One process under one cap: auto's choice, then new-prompt calls through `Generator.generate`."""
    from ..devices import cap_memory
    from ..engine import Generator

    device = torch.device(args.device)
    if device.type == "cuda":
        cap_memory(device, args.cap)
        torch.cuda.reset_peak_memory_stats()
    out = tempfile.TemporaryDirectory(prefix="zstudio-lowmem-")  # the PNGs, removed at the end
    generator = Generator(model=str(args.folder), device=args.device, memory="auto", speed=args.speed,
                          outputs=out.name)  # fmt: skip
    load_s, _ = timed_call(generator.load)
    report: dict[str, Any] = {
        "cap_gib": args.cap,
        "memory_mode": generator.memory,
        "text_encoder": generator.text_placement,
        "speed": generator.speed,
        # memory mode stream: transformer blocks kept on the GPU (zstudio.memory.keep_fitting_blocks); None elsewhere
        "resident_blocks": getattr(generator.pipe.transformer, "_zstudio_resident_blocks", None),
        "load_s": load_s,
        "host_peak_gb_after_load": host_peak_gb(),
    }
    print(f"cap {args.cap} GiB: memory {generator.memory}, text encoder {generator.text_placement}, speed "
          f"{generator.speed}, resident blocks {report['resident_blocks']}, loaded in {load_s:.1f} s",
          flush=True)  # fmt: skip
    prompt = new_prompts(f"cap {args.cap}")
    width, height = args.size

    def call(text: str) -> tuple[float, dict[str, Any]]:
        seconds, (_paths, _gen_s, summary) = timed_call(
            lambda: generator.generate(
                text, width=width, height=height, num_inference_steps=args.steps, cfg_scale=0.0, seed=1
            )  # fmt: skip
        )
        return seconds, summary["timings"]

    report["warmup_call_s"], _ = call(prompt())
    print(f"  warm-up call {report['warmup_call_s']:.1f} s", flush=True)
    calls = [call(prompt()) for _ in range(args.calls)]
    walls = [seconds for seconds, _ in calls]
    report["new_prompt_call_s"] = stats(walls)
    report["breakdown_median_s"] = {k: statistics.median(t[k] for _, t in calls) for k in calls[0][1]}
    last = f"{QUALITY_PROMPTS[3]}, cap {args.cap} variation {args.calls + 1}"  # the last call's prompt again
    report["repeated_prompt_call_s"], _ = call(last)
    report["memory_mode_after"] = generator.memory  # an out-of-memory recovery would have moved it down
    report["text_encoder_after"] = generator.text_placement
    report["host_peak_gb"] = host_peak_gb()
    report["png_files"] = len(list(Path(out.name).glob("*.png")))
    out.cleanup()
    if device.type == "cuda":
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    target = TARGETS_S.get(int(args.cap)) if args.cap else None
    report["target_s"] = target
    report["meets_target"] = None if target is None else report["new_prompt_call_s"]["median"] <= target
    print(f"  new prompt per call: median {report['new_prompt_call_s']['median']:.3f} s (target {target}); "
          f"repeated prompt {report['repeated_prompt_call_s']:.3f} s; breakdown {report['breakdown_median_s']}",
          flush=True)  # fmt: skip
    return report


# ---------------------------------------------------------------------------------------------------- quality
def run_quality(args) -> dict[str, Any]:
    """The text encoder's placements against bf16 on the GPU: identical when streamed, close when int8."""
    from ..engine import Generator
    from ..memory import _stop_streaming
    from ..params import GenerationParams
    from ..speed.text_encoder import TokenEncoder
    from ..text_placement import embedding_error, module_gib, place_text_encoder

    device = torch.device(args.device)
    generator = Generator(model=str(args.folder), device=args.device, memory="resident", speed="exact")
    generator.load()
    text_encoder = generator.pipe.text_encoder
    width, height = args.size
    picture = GenerationParams(prompt=QUALITY_PROMPTS[0], width=width, height=height, num_inference_steps=args.steps,
                               cfg_scale=0.0, seed=QUALITY_SEED)  # fmt: skip

    def encode_all(tag: str) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Each prompt encoded once (a new prompt each time: the cache is emptied), and the seconds per prompt."""
        generator._prompt_cache.clear()
        generator.token_encoder = TokenEncoder(text_encoder)
        seconds, states = [], []
        with torch.inference_mode():
            for text in QUALITY_PROMPTS:
                t, embedding = timed_call(lambda text=text: generator.encode_prompt(text, 512))
                seconds.append(t)
                states.append(embedding.embeds.float().cpu())
        print(f"  {tag}: {statistics.median(seconds):.3f} s per new prompt (median)", flush=True)
        return states, stats(seconds[1:] if len(seconds) > 1 else seconds)  # the first call allocates

    report: dict[str, Any] = {"prompts": len(QUALITY_PROMPTS), "placements": {}}
    reference, report["placements"]["resident"] = encode_all("bf16 resident")
    report["text_encoder_gib"] = {"bf16": module_gib(text_encoder)}
    reference_image = np.asarray(generator.generate_images(picture).images[0])
    if device.type == "cuda":
        for placement in ("streamed-pinned", "streamed"):
            _stop_streaming(text_encoder)
            place_text_encoder(text_encoder, placement, device)
            states, report["placements"][placement] = encode_all(placement)
            report["placements"][placement]["identical"] = all(torch.equal(a, b) for a, b in zip(reference, states))
            report["placements"][placement]["max_abs_diff"] = max(float((a - b).abs().max())
                                                                  for a, b in zip(reference, states))  # fmt: skip
        _stop_streaming(text_encoder)
    text_encoder.to("cpu")
    try:
        place_text_encoder(text_encoder, "resident-8bit", device)
    except RuntimeError as err:  # torchao absent: report it
        report["int8_error"] = str(err)
        return report
    report["text_encoder_gib"]["int8"] = module_gib(text_encoder)
    states, report["placements"]["resident-8bit"] = encode_all("int8 resident")
    errors = [embedding_error(a, b) for a, b in zip(reference, states)]
    report["int8_embedding_error"] = {
        "per_prompt": errors,
        "cosine_mean": statistics.mean(e["cosine_mean"] for e in errors),
        "cosine_min": min(e["cosine_min"] for e in errors),
        "relative_error_mean": statistics.mean(e["relative_error"] for e in errors),
        "relative_error_max": max(e["relative_error"] for e in errors),
    }
    generator._prompt_cache.clear()
    int8_image = np.asarray(generator.generate_images(picture).images[0])
    report["int8_image_psnr_db"] = psnr(int8_image, reference_image)
    print(f"  int8 text encoder: {report['int8_embedding_error']['cosine_min']:.5f} min cosine, "
          f"{report['int8_embedding_error']['relative_error_max']:.4f} max relative error, picture "
          f"{report['int8_image_psnr_db']:.1f} dB", flush=True)  # fmt: skip
    return report


def timed_call(fn):
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


# ---------------------------------------------------------------------------------------------------- driver
def child(step: list[str], args, timeout: float) -> dict[str, Any]:
    """Run `python -m zstudio.bench.lowmem STEP ...` in a fresh process (its printout passes through); its JSON, or
    what went wrong with the end of its error output."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "zstudio.bench.lowmem", *step, "--folder", str(args.folder),
                   "--device", args.device, "--size", f"{args.size[0]}x{args.size[1]}", "--steps", str(args.steps),
                   "--calls", str(args.calls), "--speed", args.speed, "--json", str(result_path)]  # fmt: skip
        start = time.perf_counter()
        try:
            done = subprocess.run(command, timeout=timeout, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        except subprocess.TimeoutExpired as err:
            tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else str(err.stderr or "")
            return {"error": f"timed out after {timeout:.0f} s", "log_tail": tail[-3000:], "seconds": timeout}
        seconds = time.perf_counter() - start
        if done.returncode != 0 or not result_path.is_file():
            print(done.stderr[-3000:], flush=True)
            return {"error": f"exit {done.returncode}", "log_tail": done.stderr[-3000:], "seconds": seconds}
        return {**json.loads(result_path.read_text()), "seconds": seconds}


def drive(args) -> dict[str, Any]:
    start = time.perf_counter()
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), **gpu_info(),
                              "size": f"{args.size[0]}x{args.size[1]}", "steps": args.steps, "calls": args.calls,
                              "speed_requested": args.speed}  # fmt: skip
    if args.device == "cuda":
        from .user import ensure_checkpoint

        report["checkpoint"] = ensure_checkpoint(args.folder)
        torch.cuda.empty_cache()
    elif not (args.folder / "model_index.json").is_file():
        from ..tiny import make_tiny

        make_tiny(args.folder, seed=0)
    print(f"checkpoint ready in {time.perf_counter() - start:.1f} s", flush=True)

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    def save() -> None:  # after every step: a run cut short still leaves what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    if not args.skip_quality:
        print("quality", flush=True)
        report["quality"] = child(["quality"], args, min(args.child_timeout, left()))
        save()
    report["caps"] = {}
    for cap in args.caps:
        if left() < 60:
            report["caps"][str(cap)] = {"error": "skipped: out of the time budget"}
            continue
        print(f"cap {cap} GiB", flush=True)
        report["caps"][str(cap)] = child(["cap", "--cap", str(cap)], args, min(args.child_timeout, left()))
        save()
    report["total_s"] = time.perf_counter() - start
    report["summary"] = {cap: {k: entry.get(k) for k in ("memory_mode", "text_encoder", "speed", "resident_blocks",
                                                         "meets_target", "target_s", "error")}
                         | {"median_s": entry.get("new_prompt_call_s", {}).get("median")}
                         for cap, entry in report["caps"].items()}  # fmt: skip
    return emit(report, args.json)


def size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.split("x"))
    return width, height


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.lowmem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("step", nargs="?", default="all", choices=("all", "quality", "cap"))
    parser.add_argument("--folder", type=Path, default=Path("/tmp/zstudio-full"), help="full-size checkpoint")
    parser.add_argument("--caps", default=",".join(str(c) for c in CAPS), help="GiB, comma-separated")
    parser.add_argument("--cap", type=float, help="(cap step) this process's cap in GiB")
    parser.add_argument("--speed", default="auto", help="speed requested (auto: compiled where the mode allows)")
    parser.add_argument("--size", type=size, default=(1024, 1024))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3, help="timed new-prompt calls after one warm-up call")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run (caps after it skip)")
    parser.add_argument("--child-timeout", type=float, default=240.0)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.caps = [float(c) if "." in c else int(c) for c in args.caps.split(",") if c]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the low-memory benchmark needs a CUDA GPU (or --device cpu with a tiny checkpoint)")
    if args.step == "all":
        return drive(args)
    report = run_cap(args) if args.step == "cap" else run_quality(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
