"""One cold start, run as its own process by `zstudio bench --cold-start`: build, warm, first 1024x1024 image.

The parent runs it twice over one fresh compiler cache folder: the first start pays the full compile, the second
shows what the caches (inductor's FX graph and autotuning caches) save.
"""

from __future__ import annotations

import json
import sys
import time

START = time.perf_counter()

import torch  # noqa: E402


def main(mode: str) -> None:
    from ..engine import Generator
    from ..models import TURBO, ModelSource
    from ..params import GenerationParams
    from .arch import build_full_pipeline
    from .run import PROMPT, SEED, STEPS

    imported = time.perf_counter()
    pipe = build_full_pipeline(torch.device("cuda"))
    torch.cuda.synchronize()
    built = time.perf_counter()
    generator = Generator.from_pipeline(pipe, ModelSource("random-full-size", ".", TURBO), speed=mode)
    params = GenerationParams(prompt=PROMPT, width=1024, height=1024, num_inference_steps=STEPS, seed=SEED)
    result = generator.generate_images(params)
    first = time.perf_counter()
    generator._prompt_cache.clear()
    second = generator.generate_images(params.replace(seed=SEED + 1))
    done = time.perf_counter()
    print(json.dumps({
        "mode": mode,
        "import_s": imported - START,
        "build_random_weights_s": built - imported,
        "first_image_s": first - built,
        "process_start_to_first_image_s": first - START,
        "second_image_s": done - first,
        "first_timings": result.timings,
        "second_timings": second.timings,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fast")
