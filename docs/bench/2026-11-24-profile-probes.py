"""Session 8 probes: where Generator.load's seconds go (cProfile), where the streamed text encoder's go."""
import cProfile, io, json, os, pstats, sys, time
import torch
from pathlib import Path
OUT = Path(os.environ["OUT"])
which = sys.argv[1]
def top(prof, n=45):
    s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(n); return s.getvalue()
if which == "load":
    t0 = time.perf_counter()
    prof = cProfile.Profile(); prof.enable()
    from zstudio.engine import Generator
    t1 = time.perf_counter()
    g = Generator(model=sys.argv[2], device="cuda", speed="fast", memory="resident", outputs="/tmp/o").load()
    t2 = time.perf_counter()
    prof.disable()
    (OUT / "load_profile.txt").write_text(f"import {t1-t0:.2f} load {t2-t1:.2f}\n" + top(prof, 70))
    print(f"import {t1-t0:.2f} load {t2-t1:.2f}")
elif which == "text":
    from transformers import Qwen3Config, Qwen3Model
    from zstudio.bench.arch import TEXT_ENCODER, _default_dtype, randomize_
    from zstudio.speed.text_encoder import TokenEncoder
    from zstudio.memory import stream_weights
    dev = torch.device("cuda")
    with torch.device("cpu"), _default_dtype(torch.bfloat16):
        te = Qwen3Model(Qwen3Config(**TEXT_ENCODER))
    te.eval()
    stream_weights(te, dev, leaf=False, low_ram=False)
    enc = TokenEncoder(te)
    ids = lambda i: [100 + (i * 7 + k) % 5000 for k in range(120 + i)]
    with torch.inference_mode():
        enc(ids(0), dev); torch.cuda.synchronize()
        prof = cProfile.Profile(); prof.enable()
        t = time.perf_counter()
        for i in range(3): enc(ids(i + 1), dev)
        torch.cuda.synchronize(); el = (time.perf_counter() - t) / 3
        prof.disable()
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            enc(ids(9), dev); torch.cuda.synchronize()
    (OUT / "text_profile.txt").write_text(f"per prompt {el:.3f}\n" + top(prof, 60) + "\n" +
        p.key_averages().table(sort_by="cpu_time_total", row_limit=30) + "\n" + p.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    print(f"per prompt {el:.3f}")
