"""`python -m zstudio.bench.scale`: scale-out on one multi-GPU host, full-size random weights.

`ulysses`: one image's transformer time (8 forwards at 1024x1024) on 1, 2, 4 GPUs with Ulysses sequence parallelism
(zstudio.parallel), each degree in its own process group, and the output's PSNR against the 1-GPU output (same
weights, same inputs). Targets: 2 GPUs <= 0.60x one GPU's time, 4 GPUs <= 0.40x; PSNR >= 35 dB.

`replicas`: images per second with 1, 2, 4 Ray Serve engine replicas (one GPU each, zstudio.server.replicas) under a
bounded load: as many jobs in flight as replicas, from a local client. Target: N replicas >= 0.9 x N x one.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1): it can take a shared host's GPUs
out of service. `--tiny` runs either on the CPU with a tiny model (a smoke test of the benchmark itself).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..parallel import SAFE_NCCL_ENV

os.environ.update(SAFE_NCCL_ENV)  # before any NCCL communicator exists, in this process and the ones it starts

CAPTION_TOKENS = 128  # a typical prompt's length after the chat template


def output_psnr(reference: np.ndarray, out: np.ndarray) -> float:
    """PSNR of a transformer output against the reference's value range (the outputs are velocities, not pixels)."""
    mse = float(np.mean((reference.astype(np.float64) - out.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _why(err: BaseException) -> str:
    """One line; for a rank's failure (a whole traceback in the message) its last line, the error itself."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _build(tiny: bool, device: torch.device, speed: str, heads: int = 3) -> torch.nn.Module:
    if tiny:
        from ..tiny import Sizes, build_transformer

        torch.manual_seed(0)
        transformer = (
            build_transformer(Sizes(dim=heads * 16, n_heads=heads, n_layers=2, n_refiner_layers=2)).to(device).eval()
        )
    else:
        from .arch import build_transformer

        transformer = build_transformer(device, torch.bfloat16, torch.Generator(device).manual_seed(0))
    if speed != "eager":
        from ..speed import speed_up_transformer

        speed_up_transformer(transformer, speed)
    return transformer


def _inputs(tiny: bool, size: int, device: torch.device, dtype: torch.dtype):
    rng = torch.Generator(device).manual_seed(1)
    side = size // 8
    latents = [torch.randn(16, 1, side, side, generator=rng, device=device, dtype=dtype)]
    caption = [torch.randn(7 if tiny else CAPTION_TOKENS, 32 if tiny else 2560, generator=rng, device=device,
                           dtype=dtype)]  # fmt: skip
    return latents, caption


def _ulysses_rank(index: int, degree: int, port: int, args: dict[str, Any], folder: str) -> None:
    import torch.distributed as dist

    from ..parallel import enable_ulysses, init_group, rank_device
    from .run import sync

    base = torch.device("cpu" if args["tiny"] else "cuda")
    device = rank_device(base, index)
    init_group(index, degree, port, device)
    transformer = _build(args["tiny"], device, args["speed"], args["tiny_heads"])
    if degree > 1:
        enable_ulysses(transformer, degree, device)
    dtype = next(transformer.parameters()).dtype
    latents, caption = _inputs(args["tiny"], args["size"], device, dtype)

    def image() -> torch.Tensor:
        out = None
        for step in range(args["steps"]):
            t = torch.tensor([1.0 - step / args["steps"]], device=device)  # float32, as the engine passes it
            out = transformer(latents, t, caption, return_dict=False)[0][0]
        return out

    times = []
    with torch.no_grad():
        for repeat in range(args["warmup"] + args["repeats"]):
            dist.barrier()
            sync()
            start = time.perf_counter()
            out = image()
            sync()
            dist.barrier()
            if repeat >= args["warmup"]:
                times.append(time.perf_counter() - start)
    if index == 0:
        np.save(Path(folder) / f"out-{degree}.npy", out.float().cpu().numpy())
        np.save(Path(folder) / f"times-{degree}.npy", np.array(times))
    dist.destroy_process_group()


def bench_ulysses(degrees: list[int], args: dict[str, Any]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from ..parallel import free_port
    from .run import stats

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for degree in degrees:
            try:
                mp.start_processes(_ulysses_rank, args=(degree, free_port(), args, folder), nprocs=degree,
                                   start_method="spawn")  # fmt: skip
                times = np.load(Path(folder) / f"times-{degree}.npy").tolist()
                results[str(degree)] = {"seconds_per_image": stats(times)}
            except Exception as err:  # one degree failing (too few GPUs, a compile error) leaves the others' numbers
                results[str(degree)] = {
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                }
        reference = Path(folder) / f"out-{degrees[0]}.npy"
        one = results.get(str(degrees[0]), {}).get("seconds_per_image", {}).get("median")
        for degree in degrees[1:]:
            entry = results[str(degree)]
            if "error" in entry or not reference.exists():
                continue
            entry["psnr_db_vs_first"] = output_psnr(np.load(reference), np.load(Path(folder) / f"out-{degree}.npy"))
            if one:
                entry["time_vs_first"] = entry["seconds_per_image"]["median"] / one
    return results


def bench_replicas(counts: list[int], args: dict[str, Any], tiny_dir: Path | None) -> dict[str, Any]:
    import ray

    from ..params import GenerationParams
    from ..server.replicas import ReplicaSpec, start_replicas

    gpus = 0 if args["tiny"] else torch.cuda.device_count()
    env = {**SAFE_NCCL_ENV, "HF_HUB_OFFLINE": "1"}
    ray.init(num_gpus=gpus, num_cpus=max(counts) + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})  # fmt: skip
    if args["tiny"]:
        spec = ReplicaSpec(model=str(tiny_dir), device="cpu", warmup=True)
    else:
        spec = ReplicaSpec(factory="zstudio.bench.arch:random_generator", speed=args["speed"], warmup=True)
    size = args["size"]
    results: dict[str, Any] = {}
    try:
        for count in counts:
            try:
                runner = start_replicas(spec, replicas=count, gpus_per_replica=1.0 if gpus else 0)
                jobs = args["jobs_per_replica"] * count
                params = [GenerationParams(prompt="a lighthouse at dusk", width=size, height=size,
                                           num_inference_steps=args["steps"], seed=i) for i in range(jobs)]  # fmt: skip

                def one(p: GenerationParams, runner=runner) -> None:
                    runner.run(p, lambda step, total: None, lambda: False)

                with ThreadPoolExecutor(max_workers=count) as pool:  # the bound: one job in flight per replica
                    list(pool.map(one, params[:count]))  # each replica's first job after start: not timed
                    start = time.perf_counter()
                    list(pool.map(one, params))
                    seconds = time.perf_counter() - start
                results[str(count)] = {"jobs": jobs, "seconds": seconds, "images_per_second": jobs / seconds,
                                       "served_by": sorted(runner.served_by.values())}  # fmt: skip
                runner.owns_ray = False
                runner.stop()
            except Exception as err:
                results[str(count)] = {"error": _why(err)}
    finally:
        ray.shutdown()
    base = results.get(str(counts[0]), {}).get("images_per_second")
    for count in counts[1:]:
        entry = results[str(count)]
        if base and "images_per_second" in entry:
            entry["vs_n_times_first"] = entry["images_per_second"] / (base * count / counts[0])
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .. import __version__
    from .run import emit, gpu_info

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("ulysses", "replicas"))
    parser.add_argument("--gpus", default="1,2,4", help="Degrees (ulysses) or replica counts, comma-separated.")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="Transformer forwards per image.")
    parser.add_argument("--repeats", type=int, default=5, help="ulysses: timed images per degree.")
    parser.add_argument("--warmup", type=int, default=2, help="ulysses: untimed images first (compiles, NCCL).")
    parser.add_argument("--jobs-per-replica", type=int, default=6, help="replicas: timed jobs per replica.")
    parser.add_argument("--speed", default="eager", help="eager, fast or fastest (compiled: the warm-up compiles).")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model.")
    parser.add_argument("--tiny-heads", type=int, default=3, help="--tiny ulysses: heads (3 on 2 ranks: padded).")
    parser.add_argument("--out", type=Path, help="Write the JSON report here too.")
    ns = parser.parse_args(argv)
    counts = [int(n) for n in ns.gpus.split(",")]
    args = {"tiny": ns.tiny, "size": ns.size, "steps": ns.steps, "repeats": ns.repeats, "warmup": ns.warmup,
            "speed": ns.speed, "jobs_per_replica": ns.jobs_per_replica, "tiny_heads": ns.tiny_heads}  # fmt: skip
    report: dict[str, Any] = {"bench": f"scale-{ns.what}", "version": __version__, "torch": torch.__version__,
                              "gpu": gpu_info(), "args": args, "nccl_env": SAFE_NCCL_ENV}  # fmt: skip
    if ns.what == "ulysses":
        report["degrees"] = bench_ulysses(counts, args)
    else:
        with tempfile.TemporaryDirectory() as folder:
            tiny_dir = None
            if ns.tiny:
                from ..tiny import make_tiny

                tiny_dir = make_tiny(Path(folder) / "tiny")
            report["replicas"] = bench_replicas(counts, args, tiny_dir)
    return emit(report, ns.out)


if __name__ == "__main__":
    main()
