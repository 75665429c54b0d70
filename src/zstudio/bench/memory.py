"""Memory modes on one GPU: peak memory, seconds per image and PSNR against all-resident, each under a memory cap.

`python -m zstudio.bench.memory --json out.json` builds the full-size architecture with random weights (as
`zstudio bench` does), then walks the modes downwards through the engine's own `switch_memory`, the path an
out-of-memory recovery takes. Smaller cards are simulated on the big one with
`torch.cuda.set_per_process_memory_fraction`: an allocation past the cap fails as it would on a card of that size.
`--soak N` then runs N generations at mixed sizes and records reserved memory after each, for the creep curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .run import PROMPT, SEED, STEPS, gpu_info, psnr, stats, sync, timed

# The card each mode is meant for, in GiB; `lowest` is also held to 4 GiB at 512x512.
CAPS_GB = {"resident": None, "offload-text": 16, "8bit": 12, "stream": 8, "lowest": 6}
LOWEST_512_CAP_GB = 4
SOAK_SIZES = ((512, 512), (1024, 1024), (768, 768), (1024, 768), (768, 1360), (1152, 864), (512, 768))


def set_cap(gb: float | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if gb is None else gb * 2**30 / total)


def generate(generator, width: int, height: int, prompt: str = PROMPT, steps: int = STEPS, seed: int = SEED):
    from ..params import GenerationParams

    params = GenerationParams(prompt=prompt, width=width, height=height, num_inference_steps=steps, cfg_scale=0.0,
                              seed=seed)  # fmt: skip
    return timed(lambda: generator.generate_images(params))


def activation_peaks(pipe, width: int, height: int, embeds: torch.Tensor) -> dict[str, float]:
    """GiB above the weights that one transformer forward and one VAE decode need at this size."""
    out = {}
    latents = torch.randn(1, 16, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.5], device="cuda")
    with torch.inference_mode():
        for name, fn in (
            (
                "transformer_forward",
                lambda: pipe.transformer([latents[0].unsqueeze(1)], t, [embeds], return_dict=False),
            ),
            ("vae_decode", lambda: pipe.vae.decode(latents)),
        ):
            sync()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            sync()
            out[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out


def largest_cuda_tensors(pipe, count: int = 8) -> list[str]:
    """What holds GPU memory between generations: the biggest live CUDA tensors, named where they are parameters."""
    import gc

    names = {}
    for component in ("transformer", "text_encoder", "vae"):
        for name, tensor in getattr(pipe, component).state_dict(keep_vars=True).items():
            names[id(tensor)] = f"{component}.{name}"
    gc.collect()
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                found.append((obj.untyped_storage().nbytes(), obj))
        except Exception:  # some tracked objects refuse isinstance/inspection
            continue
    found.sort(key=lambda x: -x[0])
    return [f"{n / 2**30:.3f} GiB {tuple(t.shape)} {t.dtype} {names.get(id(t), type(t).__name__)}"
            for n, t in found[:count]]  # fmt: skip


def measure(generator, mode: str, sizes, repeats: int, reference: dict) -> dict[str, Any]:
    """Uncapped: time, peaks, PSNR. Then once more under the mode's cap: does it fit that card?"""
    result: dict[str, Any] = {"mode": mode, "sizes": {}}
    for width, height in sizes:
        key = f"{width}x{height}"
        cap = LOWEST_512_CAP_GB if mode == "lowest" and width * height <= 512 * 512 else CAPS_GB[mode]
        set_cap(None)
        torch.cuda.reset_peak_memory_stats()
        entry: dict[str, Any] = {"cap_gib": cap, "resident_before_gib": torch.cuda.memory_allocated() / 2**30}
        first, _ = generate(generator, width, height)
        runs = [generate(generator, width, height) for _ in range(repeats)]
        image = np.asarray(runs[-1][1].images[0])
        reference.setdefault(key, image)
        entry.update(
            first_call_s=first,
            total_s=stats([t for t, _ in runs]),
            encode_s=statistics.median(r.timings["encode"] for _, r in runs),
            peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            psnr_db=psnr(image, reference[key]),
        )
        # A new prompt: the text encoder runs (and, off the GPU between prompts, moves in and out).
        entry["new_prompt_s"] = generate(generator, width, height, prompt=f"{PROMPT} ({mode} {key})")[0]
        if cap is not None:
            set_cap(cap)
            torch.cuda.reset_peak_memory_stats()
            try:
                generate(generator, width, height, prompt=f"{PROMPT} (capped {mode} {key})")
                entry["fits_cap"] = True
                entry["capped_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            except Exception as err:  # an out-of-memory under the cap is a result, not a crash
                entry["fits_cap"] = False
                entry["capped_error"] = f"{type(err).__name__}: {err}"[:300]
            set_cap(None)
        result["sizes"][key] = entry
        print(f"  {mode:13} {key:9} median {entry['total_s']['median']:.3f}s  peak reserved "
              f"{entry['peak_reserved_gib']:.2f} GiB (weights {entry['resident_before_gib']:.2f})  fits {cap} GiB: "
              f"{entry.get('fits_cap')}  psnr {entry['psnr_db']:.1f}  new prompt {entry['new_prompt_s']:.2f}s",
              flush=True)  # fmt: skip
    return result


def soak(generator, count: int, steps: int) -> dict[str, Any]:
    """`count` generations cycling through sizes and prompts; reserved and allocated memory after each."""
    reserved, allocated, seconds = [], [], []
    for i in range(count):
        width, height = SOAK_SIZES[i % len(SOAK_SIZES)]
        t, _ = generate(generator, width, height, prompt=f"{PROMPT} #{i % 50}", steps=steps, seed=i)
        sync()
        reserved.append(torch.cuda.memory_reserved() / 2**30)
        allocated.append(torch.cuda.memory_allocated() / 2**30)
        seconds.append(t)
        if i % 100 == 0 or i == count - 1:
            print(f"  soak {i:5d} reserved {reserved[-1]:.2f} GiB allocated {allocated[-1]:.2f} GiB", flush=True)
    warm = len(SOAK_SIZES) * 2  # every size seen twice
    return {
        "count": count,
        "steps": steps,
        "sizes": [f"{w}x{h}" for w, h in SOAK_SIZES],
        "reserved_gib": reserved,
        "allocated_gib": allocated,
        "seconds": seconds,
        "reserved_after_warm_gib": reserved[warm - 1],
        "reserved_max_after_warm_gib": max(reserved[warm:]) if count > warm else None,
        "reserved_last_gib": reserved[-1],
        "allocated_first_last_gib": [allocated[0], allocated[-1]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..engine import Generator
    from ..memory import MEMORY_MODES
    from ..models import TURBO, ModelSource
    from ..settings import load_settings
    from .arch import build_full_pipeline

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.memory", description=__doc__)
    parser.add_argument("--modes", default=",".join(MEMORY_MODES))
    parser.add_argument("--sizes", default="1024x1024,512x512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed", default="exact", help="speed mode for resident and offload-text")
    parser.add_argument("--soak", type=int, default=0, help="generations in the creep test (0 = none)")
    parser.add_argument("--soak-steps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the memory benchmark needs a CUDA GPU")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": "python -m zstudio.bench.memory " +
                              " ".join(argv or []), **gpu_info(), "steps": STEPS, "modes": {}}  # fmt: skip
    print(json.dumps({k: report[k] for k in ("gpu", "driver", "versions")}), flush=True)

    build_s, pipe = timed(lambda: build_full_pipeline(torch.device("cuda")))
    report["build_s"] = build_s
    source = ModelSource(spec="random-full-size", path=Path("."), profile=TURBO)
    with torch.inference_mode():  # outside it, autograd would keep every text-encoder weight alive
        embeds = pipe._encode_prompt(PROMPT, device="cuda", max_sequence_length=512)[0]
    report["activation_gib"] = {f"{w}x{h}": activation_peaks(pipe, w, h, embeds) for w, h in sizes}
    print(f"activations above the weights: {report['activation_gib']}", flush=True)
    # stream's own footprint, what auto's estimate (memory.MEASURED_PEAK_GIB) is built from: no blocks kept resident
    # (the switch runs before the cap, so the whole card's free memory would keep every block)
    settings = dataclasses.replace(load_settings(), resident_blocks=0)
    generator = Generator.from_pipeline(pipe, source, speed=args.speed, memory="resident", settings=settings)
    reference: dict[str, np.ndarray] = {}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))

    for mode in modes:
        print(f"mode {mode}", flush=True)
        switch_s, _ = timed(lambda m=mode: generator.switch_memory(m))
        try:
            report["modes"][mode] = measure(generator, mode, sizes, args.repeats, reference)
        except Exception as err:  # report and go on
            report["modes"][mode] = {"mode": mode, "error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"  {mode} failed: {report['modes'][mode]['error']}", flush=True)
        report["modes"][mode]["switch_s"] = switch_s
        report["modes"][mode]["largest_cuda_tensors"] = largest_cuda_tensors(pipe)
        te = next(pipe.text_encoder.parameters())
        print(
            f"  text encoder on {te.device}; allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB; largest "
            f"{report['modes'][mode]['largest_cuda_tensors'][:4]}",
            flush=True,
        )
        report["modes"][mode]["speed"] = generator.speed
        report["modes"][mode]["weights_8bit"] = getattr(pipe.transformer, "_zstudio_8bit", None)
        save()
    base = report["modes"].get(modes[0], {}).get("sizes", {})
    for mode in modes:
        for key, entry in report["modes"][mode].get("sizes", {}).items():
            if "total_s" in entry and "total_s" in base.get(key, {}):
                entry["x_first_mode"] = entry["total_s"]["median"] / base[key]["total_s"]["median"]
    if args.soak:
        print(f"soak: {args.soak} generations in memory mode {generator.memory}", flush=True)
        report["soak"] = soak(generator, args.soak, args.soak_steps)
    save()
    return report


if __name__ == "__main__":
    main()
