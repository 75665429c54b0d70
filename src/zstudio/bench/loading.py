"""Loading from disk: host RAM, seconds and time to the first image, through the product's own loader.

`python -m zstudio.bench.loading write DIR` saves the full-size random-weight pipeline in the diffusers layout
(safetensors, bf16). `python -m zstudio.bench.loading load DIR --memory lowest --speed exact` then starts like
`zstudio serve` would: load (`zstudio.models.load_pipeline` + the memory mode), one 1024x1024 image, and prints one
JSON line with the process's peak resident set (host RAM), the weights' size on disk and the timings. Run twice
over one TORCHINDUCTOR_CACHE_DIR, it shows a compiled mode's first and second start.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402


def write(folder: Path) -> None:
    from ..models import quiet_loading
    from .arch import build_full_pipeline

    pipe = build_full_pipeline(torch.device("cuda"))
    start = time.perf_counter()
    with quiet_loading():
        pipe.save_pretrained(folder, safe_serialization=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(json.dumps({"written_gb": size / 1e9, "write_s": time.perf_counter() - start}), flush=True)


def load(folder: Path, memory: str, speed: str) -> None:
    from ..engine import Generator
    from ..params import GenerationParams
    from .run import PROMPT, SEED, STEPS

    imported = time.perf_counter()
    generator = Generator(model=str(folder), device="cuda", speed=speed, memory=memory).load()
    loaded = time.perf_counter()
    params = GenerationParams(prompt=PROMPT, width=1024, height=1024, num_inference_steps=STEPS, seed=SEED)
    generator.generate_images(params)
    done = time.perf_counter()
    second = generator.generate_images(params.replace(seed=SEED + 1))
    weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    print(json.dumps({
        "memory": generator.memory,
        "speed": generator.speed,
        "weights_on_disk_gb": weights / 1e9,
        "peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "import_s": imported - START,
        "load_s": loaded - imported,
        "load_gb_per_s": weights / 1e9 / (loaded - imported),
        "first_image_s": done - loaded,
        "process_start_to_first_image_s": done - START,
        "second_image_s": second.timings["total"],
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "write":
        write(folder)
    else:
        options = dict(zip(sys.argv[3::2], sys.argv[4::2]))
        load(folder, options.get("--memory", "auto"), options.get("--speed", "auto"))
