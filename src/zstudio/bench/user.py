"""The call a user makes, timed end to end: prompt in, PNG on disk, beside diffusers in the same run.

`python -m zstudio.bench.user calls --folder DIR` (writes the full-size random-weight checkpoint to DIR in the diffusers
layout first, if DIR has none) measures, at 1024x1024, cfg 0, 8 transformer evaluations and a new prompt on every call:
- diffusers' `ZImagePipeline` loaded from DIR: eager, + `image.save(path)`, + `transformer.compile()`, + both;
- each zstudio speed mode loaded by the product's own loader (`Generator(model=DIR)`), warmed up as `zstudio serve`
  does, then `generate(...)`: the wall time of the call, file written, and the engine's own breakdown;
- image quality: each mode's picture against diffusers eager on the same prompt and seed (PSNR), each through its own
  text path (its own prompt encoding: unpadded, bucketed, CUDA-graph);
- for the default mode: the first call at every size and batch the studio offers after the warm-up (with the
  compiler's count of new graphs), and a queue of jobs through the server's JobQueue (images per second).

`python -m zstudio.bench.user startup --folder DIR` runs two fresh processes over one new compiler cache folder
(first start ever, then second start): load, warm-up, first 1024x1024 image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .run import gpu_info, psnr, stats, sync  # noqa: E402

STEPS = 8
SIZE = (1024, 1024)
DEVICE = "cuda"  # `--device cpu` with a tiny checkpoint is the smoke test of this script
BASE_PROMPT = "A cozy evening street in Kyoto after rain, paper lanterns glowing warm orange, cinematic lighting"
QUALITY = [
    ("a red fox in fresh snow, morning light, telephoto photograph", 11),
    ("一只在雨后的京都街道上撑伞的女人, 电影感, 35mm", 22),
    ("minimalist product photo of a white sneaker on a pastel background", 33),
]


class Prompts:
    """A new prompt for every call, so the text encoder and the prompt cache never get a free pass."""

    def __init__(self, tag: str):
        self.tag, self.count = tag, 0

    def __call__(self) -> str:
        self.count += 1
        return f"{BASE_PROMPT}, {self.tag} variation {self.count}"


def ensure_checkpoint(folder: Path) -> dict[str, Any]:
    """The full-size architecture with random weights, saved in the diffusers layout (once)."""
    if (folder / "model_index.json").is_file():
        return {"written": False}
    from ..models import quiet_loading
    from .arch import build_full_pipeline

    start = time.perf_counter()
    pipe = build_full_pipeline(torch.device("cuda"))
    with quiet_loading():
        pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"written": True, "gb": size / 1e9, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------------- diffusers
def diffusers_baselines(folder: Path, calls: int, out: Path, compiled: bool = True
                        ) -> tuple[dict[str, Any], dict[tuple[str, int], Any]]:  # fmt: skip
    """diffusers as its model card shows, from the prompt string; saving timed separately (Pillow defaults).
    `compiled=False` leaves out the compiled series (the eager one and the quality references stay)."""
    from diffusers import ZImagePipeline

    from ..models import quiet_loading

    start = time.perf_counter()
    with quiet_loading():
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        pipe = ZImagePipeline.from_pretrained(folder, dtype=dtype).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    report: dict[str, Any] = {"load_s": time.perf_counter() - start}

    def call(prompt: str, seed: int):
        return pipe(prompt=prompt, width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS, guidance_scale=0.0,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]  # fmt: skip

    def series(name: str, prompts: Prompts) -> None:
        sync()
        first = time.perf_counter()
        call(prompts(), 0)
        sync()
        report[name + "_first_call_s"] = time.perf_counter() - first
        gen, save = [], []
        for i in range(calls):
            sync()
            t0 = time.perf_counter()
            image = call(prompts(), i)
            sync()
            t1 = time.perf_counter()
            image.save(out / f"{name}-{i}.png")
            save.append(time.perf_counter() - t1)
            gen.append(t1 - t0)
        report[name] = stats(gen)
        report[name + "+save"] = stats([g + s for g, s in zip(gen, save)])
        report[name + "_save_s"] = stats(save)
        print(f"  diffusers {name}: {report[name]['median']:.3f} s, +save {report[name + '+save']['median']:.3f} s "
              f"(first call {report[name + '_first_call_s']:.1f} s)", flush=True)  # fmt: skip

    with torch.inference_mode():
        series("eager", Prompts("diffusers eager"))
        references = {(p, s): np.asarray(call(p, s)) for p, s in QUALITY}
        if compiled:
            pipe.transformer.compile()
            series("compile", Prompts("diffusers compile"))
    pipe = None  # free its GPU memory before zstudio loads
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return report, references


# --------------------------------------------------------------------------------------------------------- zstudio
def compile_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def zstudio_mode(folder: Path, mode: str, calls: int, out: Path, references, sweep: bool, queue_jobs: int
                 ) -> dict[str, Any]:  # fmt: skip
    from ..engine import Generator, offered_sizes
    from ..params import GenerationParams

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    generator = Generator(model=str(folder), device=DEVICE, speed=mode, memory="resident", outputs=out / mode)
    generator.load()
    loaded = time.perf_counter()
    warm_s = generator.warmup()
    report: dict[str, Any] = {"speed": generator.speed, "load_s": loaded - start, "warmup_s": warm_s}
    prompts = Prompts(f"zstudio {mode}")
    walls, parts = [], []
    for i in range(calls):
        sync()
        t0 = time.perf_counter()
        paths, _, meta = generator.generate(prompt=prompts(), width=SIZE[0], height=SIZE[1], seed=i)
        walls.append(time.perf_counter() - t0)
        assert all(Path(p).stat().st_size > 0 for p in paths)
        parts.append(meta["timings"])
    report["generate_call_s"] = stats(walls)
    report["breakdown_median_s"] = {k: statistics.median(t[k] for t in parts) for k in parts[0]}
    report["call_minus_engine_s"] = statistics.median(w - t["total"] for w, t in zip(walls, parts))
    print(f"  zstudio {mode}: generate() {report['generate_call_s']['median']:.3f} s; engine "
          f"{json.dumps(report['breakdown_median_s'])}", flush=True)  # fmt: skip

    quality = []
    for prompt, seed in QUALITY:
        image = generator.generate_images(GenerationParams(prompt=prompt, width=SIZE[0], height=SIZE[1], seed=seed))
        quality.append(psnr(np.asarray(image.images[0]), references[(prompt, seed)]) if references else None)
    report["psnr_vs_diffusers_eager_db"] = quality
    print(f"  zstudio {mode}: PSNR vs diffusers eager {quality}", flush=True)

    if sweep:
        before = compile_count()
        firsts, graphs = {}, {}
        sizes = offered_sizes(generator.profile)
        shapes = [(w, h, 1) for w, h in sizes] + [(w, h, n) for w, h in sizes[:2] for n in (2, 3, 4)]
        for w, h, n in shapes:
            sync()
            t0, count = time.perf_counter(), compile_count()
            generator.generate(prompt=prompts(), width=w, height=h, num_images=n, seed=1)
            firsts[f"{w}x{h}x{n}"] = time.perf_counter() - t0
            graphs[f"{w}x{h}x{n}"] = compile_count() - count
        report["first_call_after_warmup_s"] = firsts
        report["graphs_compiled_per_shape"] = {k: v for k, v in graphs.items() if v}
        report["graphs_compiled_during_sweep"] = compile_count() - before
        worst = max(firsts, key=firsts.get)
        print(f"  zstudio {mode}: sweep of {len(firsts)} shapes, worst {worst} {firsts[worst]:.2f} s, "
              f"new graphs {report['graphs_compiled_during_sweep']}", flush=True)  # fmt: skip
    if queue_jobs:
        report["queue"] = queue_throughput(generator, queue_jobs, prompts, report["breakdown_median_s"]["total"])
    if DEVICE == "cuda":
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del generator
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return report


def queue_throughput(generator, jobs: int, prompts: Prompts, engine_total: float) -> dict[str, Any]:
    """Jobs submitted at once to the server's queue; time from the first submit to the last file on disk."""
    from ..params import GenerationParams
    from ..server.history import History
    from ..server.jobs import JobQueue

    history = History(Path(tempfile.mkdtemp(prefix="zstudio-queue-")) / "history.sqlite3")
    queue = JobQueue(generator, history, max_waiting=jobs)
    queue.start()
    try:
        t0 = time.perf_counter()
        submitted = [queue.submit(GenerationParams(prompt=prompts(), width=SIZE[0], height=SIZE[1])) for _ in
                     range(jobs)]  # fmt: skip
        for job in submitted:
            while not job.finished:
                queue.wait(job, job.version, timeout=1.0)
        seconds = time.perf_counter() - t0
    finally:
        queue.stop()
        history.close()
    statuses = [job.status for job in submitted]
    rate = jobs / seconds
    result = {"jobs": jobs, "seconds": seconds, "images_per_s": rate, "engine_total_s": engine_total,
              "fraction_of_engine_rate": rate * engine_total, "done": statuses.count("done")}  # fmt: skip
    print(
        f"  queue: {jobs} jobs in {seconds:.2f} s = {rate:.2f} img/s, {rate * engine_total:.2f} x 1/engine", flush=True
    )
    return result


def calls_command(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="zstudio-user-bench-"))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), **gpu_info(),
                              "size": f"{SIZE[0]}x{SIZE[1]}", "transformer_evaluations": STEPS,
                              "calls": args.calls}  # fmt: skip
    report["checkpoint"] = ensure_checkpoint(args.folder)

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))

    references = {}
    if not args.no_diffusers:
        report["diffusers"], references = diffusers_baselines(args.folder, args.calls, out,
                                                              compiled=not args.diffusers_eager_only)  # fmt: skip
        save()
        if args.references:  # for a later process that skips diffusers (--no-diffusers --references FILE)
            np.savez(args.references, *[references[key] for key in QUALITY])
    elif args.references and args.references.is_file():
        stored = np.load(args.references)
        references = {key: stored[f"arr_{i}"] for i, key in enumerate(QUALITY)}
    for i, mode in enumerate(m for m in args.modes.split(",") if m):
        try:
            report[mode] = zstudio_mode(args.folder, mode, args.calls, out, references, sweep=i == 0,
                                        queue_jobs=args.queue if i == 0 else 0)  # fmt: skip
        except Exception as err:  # report and go on
            report[mode] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"  {mode} failed: {report[mode]['error'][:600]}", flush=True)
        save()
    return report


# --------------------------------------------------------------------------------------------------------- startup
def start_once(folder: Path, mode: str) -> None:
    """One process: load, warm up as `zstudio serve` does, then the first 1024x1024 image on disk."""
    from ..engine import Generator

    imported = time.perf_counter()
    generator = Generator(model=str(folder), device="cuda", speed=mode, memory="resident",
                          outputs=tempfile.mkdtemp(prefix="zstudio-start-")).load()  # fmt: skip
    loaded = time.perf_counter()
    generator.warmup()
    warmed = time.perf_counter()
    generator.generate(prompt=BASE_PROMPT + ", first image", width=SIZE[0], height=SIZE[1], seed=0)
    done = time.perf_counter()
    from torch._dynamo.utils import compile_times  # private, bench only: where the warm-up's seconds went

    print(json.dumps({"import_s": imported - START, "load_s": loaded - imported, "warmup_s": warmed - loaded,
                      "first_image_s": done - warmed, "start_to_first_image_s": done - START,
                      "compile_times": compile_times(repr="str")[:4000]}), flush=True)  # fmt: skip


def startup_command(args: argparse.Namespace) -> dict[str, Any]:
    ensure_checkpoint(args.folder)
    cache = tempfile.mkdtemp(prefix="zstudio-cache-")
    env = {**os.environ, "ZSTUDIO_CACHE": cache, "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "mode": args.mode}
    for attempt in ("first_start", "second_start"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "zstudio.bench.user", "start-once", "--folder", str(args.folder),
                               "--mode", args.mode], capture_output=True, text=True, env=env)  # fmt: skip
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        entry = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
        entry["wall_s"] = time.perf_counter() - t0
        report[attempt] = entry
        print(f"  {attempt}: {json.dumps(entry)[:600]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.user", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    calls = sub.add_parser("calls", help="generate() and the queue beside diffusers")
    calls.add_argument("--modes", default="fast,fastest", help="zstudio speed modes, comma list (first: the sweep)")
    calls.add_argument("--calls", type=int, default=5)
    calls.add_argument("--queue", type=int, default=20, help="jobs through the server queue (first mode)")
    calls.add_argument("--no-diffusers", action="store_true")
    calls.add_argument("--diffusers-eager-only", action="store_true", help="diffusers eager and the quality "
                       "references only, no compiled series")  # fmt: skip
    calls.add_argument(
        "--references", type=Path, help=".npz of diffusers' quality images: written, or read with --no-diffusers"
    )
    startup = sub.add_parser("startup", help="first and second start in fresh processes")
    startup.add_argument("--mode", default="fast")
    once = sub.add_parser("start-once")
    once.add_argument("--mode", default="fast")
    calls.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test on a tiny checkpoint")
    calls.add_argument("--size", default="1024x1024")
    for p in (calls, startup, once):
        p.add_argument("--folder", type=Path, required=True, help="diffusers folder (written if missing)")
        p.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    global DEVICE, SIZE
    if args.command == "calls":
        DEVICE = args.device
        SIZE = tuple(int(v) for v in args.size.split("x"))
    if args.command == "start-once":
        start_once(args.folder, args.mode)
        return None
    return calls_command(args) if args.command == "calls" else startup_command(args)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
