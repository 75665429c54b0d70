"""Session 9 probe: where a controlled step's time goes (H100, full-size random weights, `fast`, 1024x1024).

python docs/bench/2026-11-24-control-profile-probe.py UNION  (1.0 or 2.1); writes $OUT/control-profile-UNION.txt
CUDA-event times of the ControlNet's and the transformer's forwards (and their CPU launch time), then a
torch.profiler table of one controlled generate() and of one plain one.
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import zstudio.control
from zstudio.bench.arch import UNIONS, build_controlnet, random_generator
from zstudio.bench.control import control_picture
from zstudio.control import UNION_TYPES, ControlNetSource

OUT = Path(os.environ.get("OUT", "/tmp"))
union = sys.argv[1]
g = random_generator("cuda", speed="auto", memory=None, outputs="/tmp/zs-probe")
cn = build_controlnet(torch.device("cuda"), g.dtype, torch.Generator("cuda").manual_seed(1), **UNIONS[union])
g.install_controlnet(cn, ControlNetSource(f"random-union-{union}", Path("."), None, UNION_TYPES))
pic = control_picture(1024, 1024, Path("/tmp/zs-probe-control.png"))
ctl = dict(control=str(pic), control_type="canny", control_preprocess=True, control_scale=0.75)
calls = iter(range(1000))


def gen(with_control):
    return g.generate(f"a lighthouse on a cliff, variant {next(calls)}", width=1024, height=1024,
                      num_inference_steps=8, cfg_scale=0.0, seed=0, **(ctl if with_control else {}))


t = time.perf_counter()
gen(False), gen(True), gen(False)
lines = [f"union {union}, speed {g.speed}, memory {g.memory}, warm-up {time.perf_counter() - t:.1f} s"]
records = {"controlnet": [], "transformer": []}


def timed(name, fn):
    def wrapper(*a, **k):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0 = time.perf_counter()
        s.record()
        r = fn(*a, **k)
        e.record()
        records[name].append((s, e, time.perf_counter() - c0))
        return r
    return wrapper


cn_forward = vars(g.controlnet).get("forward")  # zstudio's sync-free forward, where installed
g.controlnet.forward = timed("controlnet", g.controlnet.forward)
g.pipe.transformer.forward = timed("transformer", g.pipe.transformer.forward)
stages = {"validate": [], "encode_control": []}
validate, encode_control = zstudio.control.validate, g.encode_control


def staged(name, fn, sync):
    def wrapper(*a, **k):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn(*a, **k)
        if sync:
            torch.cuda.synchronize()
        stages[name].append(time.perf_counter() - t0)
        return r
    return wrapper


zstudio.control.validate = staged("validate", validate, False)
g.encode_control = staged("encode_control", encode_control, True)
walls = {}
for c in (True, False, True, False):
    torch.cuda.synchronize()
    t = time.perf_counter()
    _, total, _ = gen(c)
    torch.cuda.synchronize()
    walls.setdefault(c, []).append((time.perf_counter() - t, total))
torch.cuda.synchronize()
for name, recs in records.items():
    gpu = [s.elapsed_time(e) for s, e, _ in recs]
    cpu = [c * 1000 for _, _, c in recs]
    lines.append(f"{name}: n={len(recs)} gpu median {statistics.median(gpu):.2f} ms (min {min(gpu):.2f}), "
                 f"cpu launch median {statistics.median(cpu):.2f} ms")
for c, w in walls.items():
    lines.append(f"generate with_control={c}: wall {[round(a, 3) for a, _ in w]} engine {[round(b, 3) for _, b in w]}")
for name, values in stages.items():
    lines.append(f"{name}: {[round(v * 1000, 1) for v in values]} ms (the validate one is the CPU's: read, fit, "
                 "preprocess, hash)")
zstudio.control.validate = validate
del g.encode_control, g.pipe.transformer.forward
if cn_forward is None:
    del g.controlnet.forward
else:
    g.controlnet.forward = cn_forward


def block_ms(block, x, *args, reps=20):
    """GPU ms of one block call (`block(x, *args)`), median of `reps` after two."""
    out = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        block(x, *args)
        e.record()
        torch.cuda.synchronize()
        if i >= 2:
            out.append(s.elapsed_time(e))
    return statistics.median(out)


with torch.inference_mode():
    tokens = 4096 + 64
    dim = 3840
    x = torch.randn(1, tokens, dim, device="cuda", dtype=g.dtype)
    freqs = torch.randn(1, tokens, 64, 2, device="cuda", dtype=torch.float32)
    adaln = torch.randn(1, 256, device="cuda", dtype=g.dtype)
    layer = g.pipe.transformer.layers[3]
    lines.append(f"transformer block: {block_ms(layer, x, None, freqs, adaln):.3f} ms at {tokens} tokens")
    control_block = g.controlnet.control_layers[1]
    state = x.clone()
    lines.append(f"control block (through the ControlNet's forward): "
                 f"{block_ms(lambda c, *a: control_block(c, x, *a), state, None, freqs, adaln):.3f} ms")
    pixels = torch.rand(1, 3, 1024, 1024, device="cuda") * 2 - 1
    lines.append(f"VAE encode of a 1024x1024 control image: {block_ms(lambda p: g.control_latents(p), pixels):.2f} ms")
for c in (True, False):
    gen(c)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        gen(c)
        torch.cuda.synchronize()
    lines.append(f"\n=== profile with_control={c}: by self CUDA time")
    lines.append(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=90))
    if c:
        lines.append("=== by CPU total")
        lines.append(p.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=90))
text = "\n".join(lines)
(OUT / f"control-profile-{union}.txt").write_text(text)
print("\n".join(lines[:8]))
