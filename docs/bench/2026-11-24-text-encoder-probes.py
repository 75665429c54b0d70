"""Session 8 GPU probes: text encoder streaming variants, captured text-encoder graphs, loading paths."""
import json, os, subprocess, sys, time
import torch
from pathlib import Path
OUT = Path(os.environ["OUT"])
res = {}
def save():
    (OUT / "exp2.json").write_text(json.dumps(res, indent=1, default=str))

def timeit(fn, n=7):
    ts = []
    for i in range(n):
        torch.cuda.synchronize(); t = time.perf_counter(); out = fn(i); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts)//2], out

which = sys.argv[1]
dev = torch.device("cuda")
if which == "text":
    from transformers import Qwen3Config, Qwen3Model
    from zstudio.bench.arch import TEXT_ENCODER, _default_dtype, randomize_
    from zstudio.speed.text_encoder import TokenEncoder, BUCKETS
    from diffusers.hooks import apply_group_offloading
    from zstudio.memory import stream_weights, _stop_streaming
    rng = torch.Generator(dev).manual_seed(0)
    with torch.device(dev), _default_dtype(torch.bfloat16):
        te = Qwen3Model(Qwen3Config(**TEXT_ENCODER)); randomize_(te, rng)
    te.eval()
    ids = lambda i: [100 + (i * 7 + k) % 5000 for k in range(120 + i)]
    with torch.inference_mode():
        plain = TokenEncoder(te)
        ref = [plain(ids(i), dev) for i in range(7)]
        t, _ = timeit(lambda i: plain(ids(i), dev)); res["resident_eager_s"] = t
        graphed = TokenEncoder(te, pad_id=0, buckets=BUCKETS, graphs=True)
        t0 = time.perf_counter()
        for L in BUCKETS: graphed([0] * L, dev)
        torch.cuda.synchronize(); res["capture_4_buckets_s"] = time.perf_counter() - t0
        t, _ = timeit(lambda i: graphed(ids(i), dev)); res["resident_graphs_s"] = t
        res["graphs_max_abs_diff"] = max(float((graphed(ids(i), dev).float() - ref[i].float()).abs().max()) for i in range(7))
        res["graphs_captured"] = {k: v is not None for k, v in graphed.forward.graphs.items()}
        save()
        te.to("cpu"); torch.cuda.empty_cache()
        variants = {"current(block,sync)": dict(non_blocking=False, record_stream=False),
                    "nonblocking+record": dict(non_blocking=True, record_stream=True),
                    "nonblocking": dict(non_blocking=True, record_stream=False)}
        for name, kw in variants.items():
            _stop_streaming(te); te.to("cpu")
            apply_group_offloading(te, onload_device=dev, offload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True, low_cpu_mem_usage=False, **kw)
            enc = TokenEncoder(te)
            enc(ids(0), dev)
            t, _ = timeit(lambda i: enc(ids(i), dev))
            diff = max(float((enc(ids(i), dev).float() - ref[i].float()).abs().max()) for i in range(7))
            res[f"streamed {name}"] = {"s": t, "max_abs_diff": diff}
            print(name, t, diff, flush=True); save()
        # pure copy bandwidth of the same bytes, pinned
        tensors = [p.detach().cpu().pin_memory() for p in Qwen3Model.parameters(te)] if False else None
        nbytes = sum(p.numel() * p.element_size() for p in te.parameters())
        big = torch.empty(nbytes // 2, dtype=torch.bfloat16).pin_memory()
        t, _ = timeit(lambda i: big.to(dev, non_blocking=True), n=3)
        res["pinned_h2d_one_tensor_gbps"] = nbytes / t / 1e9
    save()
elif which == "load":
    folder = sys.argv[2]; how = sys.argv[3]
    from diffusers import ZImagePipeline
    t = time.perf_counter()
    if how == "to":
        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True); pipe.to(dev)
    else:
        pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True, device_map="cuda")
    torch.cuda.synchronize()
    print(json.dumps({"how": how, "s": time.perf_counter() - t, "dev": str(pipe.transformer.device), "te": str(pipe.text_encoder.device)}))
