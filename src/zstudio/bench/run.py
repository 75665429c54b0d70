"""`zstudio bench`: diffusers and each zstudio speed mode, measured side by side in one process on one GPU.

Modes run in this order because later ones change the shared modules in place (attention processor,
compiled blocks, float8 weights): diffusers eager (a), diffusers + transformer.compile() (a'), then ours.
Every mode sees the same weights, seed and prompt embeddings; its image is compared with (a)'s by PSNR.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__

PROMPT = (
    "A cozy evening street in Kyoto after rain, paper lanterns glowing warm orange, a woman in a red kimono "
    "with an umbrella walking past a small ramen shop, reflections on wet stone, cinematic lighting, 35mm film, "
    "soft bokeh, highly detailed, 一幅温馨的京都夜景"
)
SEED = 1234
STEPS = 8  # transformer evaluations: Turbo's reference sampling (diffusers 0.42's num_inference_steps=8)
ALL_MODES = ("diffusers", "diffusers-compile", "eager", "exact", "fast", "fastest")


def emit(report: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Print the report, and write it to `path` when given."""
    text = json.dumps(report, indent=2, default=str)
    print(text, flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return report


def sync() -> None:
    if torch.cuda.is_available():  # bench.user's CPU smoke test runs without one
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def stats(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix rate in TFLOP/s (random data, CUDA events, median)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        sync()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def transformer_flops(pipe, embeds: torch.Tensor, width: int, height: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    latents = torch.randn(1, 16, 1, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.5], device="cuda")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.transformer([latents[0]], t, [embeds], return_dict=False)
    return float(counter.get_total_flops())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def gpu_info() -> dict[str, Any]:
    driver = None
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    import diffusers
    import transformers

    versions = {"zstudio": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "python": sys.version.split()[0]}  # fmt: skip
    try:
        import torchao

        versions["torchao"] = torchao.__version__
    except ImportError:
        versions["torchao"] = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    return {"gpu": gpu, "driver": driver, "versions": versions}


class DiffusersRunner:
    """(a) and (a'): diffusers' ZImagePipeline called as the model card shows, from prompt embeddings."""

    def __init__(self, pipe, embeds: torch.Tensor):
        self.pipe, self.embeds = pipe, embeds

    @torch.inference_mode()
    def __call__(self, width: int, height: int, batch: int = 1) -> dict[str, Any]:
        generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]
        total, latents = timed(lambda: self.pipe(
            prompt_embeds=[self.embeds], width=width, height=height, num_inference_steps=STEPS, guidance_scale=0.0,
            num_images_per_prompt=batch, generator=generators, output_type="latent",
        ).images)  # fmt: skip
        decode, images = timed(lambda: self.decode(latents))
        return {"total": total + decode, "denoise": total, "decode": decode, "images": images, "latents": latents}

    def decode(self, latents: torch.Tensor):
        vae = self.pipe.vae
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor)[0]
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")


class EngineRunner:
    """(b) and (c): zstudio's Generator on the same components, with the same embeddings pre-cached."""

    def __init__(self, generator, embeds: torch.Tensor):
        from ..engine import PromptEmbedding

        self.generator = generator
        generator._prompt_cache[(PROMPT, 512)] = PromptEmbedding(embeds, num_tokens=len(embeds), truncated=False)
        self.latents = None
        original = generator.decode

        def keep_latents(latents):  # record the final latents for the comparison with (a)
            self.latents = latents
            return original(latents)

        generator.decode = keep_latents

    def __call__(self, width: int, height: int, batch: int = 1) -> dict[str, Any]:
        from ..params import GenerationParams

        params = GenerationParams(prompt=PROMPT, width=width, height=height, num_inference_steps=STEPS,
                                  cfg_scale=0.0, seed=SEED, num_images=batch)  # fmt: skip
        total, result = timed(lambda: self.generator.generate_images(params))
        t = result.timings
        return {"total": total, "denoise": t["denoise"], "decode": t["decode"], "images": result.images,
                "latents": self.latents}  # fmt: skip


def measure_mode(name, runner, sizes, repeats, batch, reference, floor) -> dict[str, Any]:
    torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"mode": name, "sizes": {}}
    first_cost = None
    for width, height in sizes:
        key = f"{width}x{height}"
        first, _ = timed(lambda w=width, h=height: runner(w, h))
        runs = [runner(width, height) for _ in range(repeats)]
        totals = [r["total"] for r in runs]
        entry = {
            "first_call_s": first,
            "total_s": stats(totals),
            "denoise_s": statistics.median(r["denoise"] for r in runs),
            "decode_s": statistics.median(r["decode"] for r in runs),
        }
        if first_cost is None:
            first_cost = first - entry["total_s"]["median"]
        image = np.asarray(runs[-1]["images"][0])
        latents = runs[-1]["latents"]
        if key not in reference:
            reference[key] = (image, latents)
        ref_image, ref_latents = reference[key]
        entry["psnr_db"] = psnr(image, ref_image)
        entry["max_abs_latent_diff"] = float((latents.float() - ref_latents.float()).abs().max())
        entry["finite"] = bool(torch.isfinite(latents).all())
        if key in floor:
            entry["x_floor"] = entry["total_s"]["median"] / floor[key]
        result["sizes"][key] = entry
        print(
            f"  {name:18} {key:10} median {entry['total_s']['median']:.3f}s (denoise {entry['denoise_s']:.3f}, "
            f"decode {entry['decode_s']:.3f}) first {first:.1f}s psnr {entry['psnr_db']:.1f}",
            flush=True,
        )
    result["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    result["one_off_s"] = first_cost
    result["batch"] = {}
    for width, height in batch:
        key = f"{width}x{height}"
        runner(width, height, batch=4)
        single = result["sizes"].get(key, {}).get("total_s", {}).get("median")
        four = statistics.median(runner(width, height, batch=4)["total"] for _ in range(3))
        result["batch"][key] = {"batch4_images_per_s": 4 / four, "batch1_images_per_s": single and 1 / single}
        print(f"  {name:18} {key:10} batch4 {4 / four:.2f} img/s vs batch1 {single and 1 / single}", flush=True)
    return result


@torch.inference_mode()
def text_encoder_timings(pipe, generator, repeats: int = 10) -> dict[str, Any]:
    """diffusers' padded encoding (512 tokens) against the mode's own, and their relative difference."""
    padded_s = [timed(lambda: pipe._encode_prompt(PROMPT, device="cuda", max_sequence_length=512))[0]
                for _ in range(repeats)]  # fmt: skip
    saved = dict(generator._prompt_cache)
    ours_s = []
    for _ in range(repeats + 2):  # the first calls of a graph mode capture its graph
        generator._prompt_cache.clear()
        ours_s.append(timed(lambda: generator.encode_prompt(PROMPT, 512))[0])
    padded = pipe._encode_prompt(PROMPT, device="cuda", max_sequence_length=512)[0].float()
    ours = generator.encode_prompt(PROMPT, 512)
    cached_s = timed(lambda: generator.encode_prompt(PROMPT, 512))[0]
    generator._prompt_cache.clear()
    generator._prompt_cache.update(saved)
    return {
        "prompt_tokens": ours.num_tokens,
        "diffusers_padded_512_s": stats(padded_s[2:]),
        "ours_s": stats(ours_s[4:]),
        "ours_first_calls_s": ours_s[:4],
        "ours_cached_s": cached_s,
        "relative_diff": float((ours.embeds.float() - padded).norm() / padded.norm()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="zstudio bench", description=__doc__)
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list of {', '.join(ALL_MODES)}")
    parser.add_argument("--sizes", default="1024x1024,768x768,512x512,1024x768")
    parser.add_argument("--batch-sizes", default="1024x1024,512x512", help="sizes measured at batch 4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("zstudio bench needs a CUDA GPU")

    from ..engine import Generator
    from ..models import TURBO, ModelSource
    from .arch import build_full_pipeline

    def parse(text: str) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]

    sizes, batch_sizes = parse(args.sizes), parse(args.batch_sizes)
    modes = [m for m in args.modes.split(",") if m]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": "zstudio bench " + " ".join(argv or []),
                              **gpu_info(), "steps": STEPS, "modes": {}}  # fmt: skip
    from ..settings import load_settings

    report["cuda_graphs"] = load_settings().cuda_graphs
    print(json.dumps({k: report[k] for k in ("gpu", "driver", "versions")}), flush=True)

    rate = matmul_rate()
    build_s, pipe = timed(lambda: build_full_pipeline(torch.device("cuda")))
    source = ModelSource(spec="random-full-size", path=Path("."), profile=TURBO)
    with torch.inference_mode():  # outside it, autograd would keep every text-encoder weight alive
        embeds = pipe._encode_prompt(PROMPT, device="cuda", max_sequence_length=512)[0]
    flops = {f"{w}x{h}": transformer_flops(pipe, embeds, w, h) for w, h in sizes}
    floor = {k: v * STEPS / (rate * 1e12) for k, v in flops.items()}  # one forward per step
    report.update({"matmul_tflops": rate, "build_s": build_s, "transformer_tflop_per_forward":
                   {k: v / 1e12 for k, v in flops.items()}, "floor_s": floor})  # fmt: skip
    print(f"bf16 matmul {rate:.0f} TFLOP/s; floor (8 forwards) " +
          ", ".join(f"{k} {v:.3f}s" for k, v in floor.items()), flush=True)  # fmt: skip

    reference: dict[str, Any] = {}
    for mode in modes:
        print(f"mode {mode}", flush=True)
        if mode == "diffusers":
            runner = DiffusersRunner(pipe, embeds)
        elif mode == "diffusers-compile":
            pipe.transformer.compile()
            runner = DiffusersRunner(pipe, embeds)
        else:
            pipe.transformer._compiled_call_impl = None  # undo (a')'s whole-model compile
            generator = Generator.from_pipeline(pipe, source, speed=mode)
            if mode in ("eager", "fast"):
                report.setdefault("text_encoder", {})[mode] = text_encoder_timings(pipe, generator)
                print(f"  text encoder: {json.dumps(report['text_encoder'][mode])}", flush=True)
            runner = EngineRunner(generator, embeds)
        try:
            report["modes"][mode] = measure_mode(mode, runner, sizes, args.repeats, batch_sizes, reference, floor)
        except Exception as err:  # report the failure and go on with the next mode
            report["modes"][mode] = {"mode": mode, "error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"  {mode} failed: {type(err).__name__}: {str(err)[:500]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    print("\nmode                size        median s   x floor   denoise   decode   psnr dB   peak GB")
    for name, mode in report["modes"].items():
        if "error" in mode:
            print(f"{name:18}  failed: {mode['error'][:80]}")
            continue
        for key, e in mode["sizes"].items():
            print(
                f"{name:18}  {key:10}  {e['total_s']['median']:8.3f}  {e.get('x_floor', 0):8.2f}  "
                f"{e['denoise_s']:8.3f}  {e['decode_s']:7.3f}  {e['psnr_db']:8.1f}  {mode['peak_allocated_gb']:7.1f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
