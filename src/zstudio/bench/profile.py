"""Where one full-size transformer forward spends its GPU time, per speed setting.

`python -m zstudio.bench.profile --size 1024 --variant fast --variant fast:cudnn --variant fastest:whole` builds the
full-size transformer with random weights, applies each variant in turn (compiler caches reset in between), times
forwards with CUDA events and lists the top kernels from torch.profiler, so a guess about where time goes (which
SDPA kernel runs under compile, how much the fp8 casts cost) can be checked against the kernels that ran.
A variant is `MODE[:OPTION...]` with options `cudnn`/`flash`/`efficient` (the only SDPA backend allowed),
`whole`/`blocks` (compile scope).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch


def parse_variant(text: str) -> dict[str, Any]:
    mode, *options = text.split(":")
    backends = [o for o in options if o in ("cudnn", "flash", "efficient")]
    scope = [o for o in options if o in ("whole", "blocks")]
    unknown = set(options) - set(backends) - set(scope)
    if unknown:
        raise ValueError(f"variant {text!r}: unknown options {sorted(unknown)}; allowed cudnn, flash, efficient, "
                         "whole, blocks")  # fmt: skip
    return {"mode": mode, "backends": backends, "regional": None if not scope else scope[0] == "blocks"}


def forward_times(transformer, latents, t, embeds, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        transformer([latents], t, [embeds], return_dict=False)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def top_kernels(transformer, latents, t, embeds, count: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        transformer([latents], t, [embeds], return_dict=False)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in rows) or 1.0
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        {
            "kernel": e.key[:110],
            "ms": e.self_device_time_total / 1e3,
            "share": e.self_device_time_total / total,
            "calls": e.count,
        }
        for e in rows[:count]
    ]


def profile_variant(variant: str, size: int, tokens: int, repeats: int, kernels: int) -> dict[str, Any]:
    import time

    from ..speed import speed_up_transformer
    from ..speed.attention import PREFERRED_BACKENDS, prefer_backends
    from .arch import build_transformer

    spec = parse_variant(variant)
    torch._dynamo.reset()
    saved = list(PREFERRED_BACKENDS)
    if spec["backends"]:
        prefer_backends(spec["backends"])
    try:
        transformer = build_transformer(torch.device("cuda"), torch.bfloat16, torch.Generator("cuda").manual_seed(0))
        speed_up_transformer(transformer, spec["mode"], whole=spec["regional"] is False)
        gen = torch.Generator("cuda").manual_seed(0)
        latents = torch.randn(16, 1, size // 8, size // 8, device="cuda", dtype=torch.bfloat16, generator=gen)
        embeds = torch.randn(tokens, 2560, device="cuda", dtype=torch.bfloat16, generator=gen)
        t = torch.tensor([0.5], device="cuda")
        with torch.inference_mode():
            start = time.perf_counter()
            transformer([latents], t, [embeds], return_dict=False)
            torch.cuda.synchronize()
            first = time.perf_counter() - start
            forward_times(transformer, latents, t, embeds, 2)
            times = forward_times(transformer, latents, t, embeds, repeats)
            top = top_kernels(transformer, latents, t, embeds, kernels)
    finally:
        PREFERRED_BACKENDS[:] = saved
    del transformer
    torch.cuda.empty_cache()
    forward_ms = {"median": 1e3 * statistics.median(times), "min": 1e3 * min(times)}
    return {"variant": variant, "size": size, "tokens": tokens, "first_call_s": first, "forward_ms": forward_ms,
            "kernels": top}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=100, help="prompt length in tokens")
    parser.add_argument("--variant", action="append", help="MODE[:OPTION...], repeatable (default: fast)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--kernels", type=int, default=12)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for variant in args.variant or ["fast"]:
        result = profile_variant(variant, args.size, args.tokens, args.repeats, args.kernels)
        results.append(result)
        print(f"\n{variant}: {result['forward_ms']['median']:.1f} ms per forward at {args.size}² "
              f"(first call {result['first_call_s']:.0f} s)", flush=True)  # fmt: skip
        for k in result["kernels"]:
            print(f"  {k['ms']:8.2f} ms {k['share']:6.1%} x{k['calls']:<4} {k['kernel']}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
