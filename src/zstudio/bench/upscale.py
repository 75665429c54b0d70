"""Upscale benchmark: a Real-ESRGAN x4plus-sized network (RRDBNet, 23 blocks, 64 features) with random weights,
saved in the released file's layout, loaded through zstudio's loader (spandrel's detection runs), then a tiled 4x of
a 1024x1024 image timed on the GPU with its peak memory.

    python -m zstudio.bench.upscale --json OUT            # on cuda, the full-size network
    python -m zstudio.bench.upscale --tiny --device cpu --size 64 --json OUT   # the tests' smoke run
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..devices import DTYPES, dtype_name, pick_device, pick_dtype
from ..upscale import DEFAULT_MARGIN, DEFAULT_TILE, import_spandrel, load_upscaler
from .run import emit


def realesrgan_state_dict(blocks: int = 23, features: int = 64, scale: int = 4, seed: int = 0) -> dict[str, Any]:
    """A random RRDBNet in Real-ESRGAN's released key layout (`params_ema` of BasicSR names: conv_first,
    body.N.rdbM.convK, conv_body, conv_up1/2, conv_hr, conv_last); scale 2 is x2plus's pixel-unshuffle variant.

    Built from spandrel's own RRDBNet (old ESRGAN names: model.0, model.1.sub.N.RDBM.convK.0, ...) and renamed."""
    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    if scale not in (2, 4):
        raise ValueError(f"scale {scale}: Real-ESRGAN's RRDBNet files are x2plus (2) or x4plus (4)")
    torch.manual_seed(seed)
    shuffle = 2 if scale == 2 else None
    net = ESRGAN(in_nc=3 * (shuffle or 1) ** 2, out_nc=3, num_filters=features, num_blocks=blocks, scale=4,
                 shuffle_factor=shuffle)  # fmt: skip
    # Two upsampling stages: model.3 and model.6 are conv_up1/2, model.8 conv_hr, model.10 conv_last.
    names = {"0": "conv_first", "3": "conv_up1", "6": "conv_up2", "8": "conv_hr", "10": "conv_last"}
    state = {}
    for key, value in net.state_dict().items():
        if m := re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
            new = f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
        elif m := re.fullmatch(rf"model\.1\.sub\.{blocks}\.(weight|bias)", key):
            new = f"conv_body.{m[1]}"
        elif m := re.fullmatch(r"model\.(\d+)\.(weight|bias)", key):
            new = f"{names[m[1]]}.{m[2]}"
        else:
            raise KeyError(f"unexpected RRDBNet key {key}")
        state[new] = value.clone()
    return {"params_ema": state}


def run(device: str, dtype: str | None, size: int, tile: int, tiny: bool, repeats: int) -> dict[str, Any]:
    target = pick_device(device)
    torch_dtype = DTYPES[dtype] if dtype else pick_dtype("auto", target)
    blocks, features = (1, 8) if tiny else (23, 64)
    with tempfile.TemporaryDirectory(prefix="zstudio-bench-upscale-") as folder:
        path = Path(folder) / "RealESRGAN_x4plus_random.pth"
        torch.save(realesrgan_state_dict(blocks, features, 4), path)
        start = time.perf_counter()
        upscaler = load_upscaler(path, target, torch_dtype)
        load_seconds = time.perf_counter() - start
    image = Image.effect_noise((size, size), 64).convert("RGB")
    upscaler.upscale(image.crop((0, 0, min(size, 64), min(size, 64))), 4.0, tile)  # warm-up: kernels, allocator
    if target.type == "cuda":
        torch.cuda.synchronize(target)
        torch.cuda.reset_peak_memory_stats(target)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = upscaler.upscale(image, 4.0, tile)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        times.append(time.perf_counter() - start)
    return {
        "benchmark": "upscale",
        "network": f"RRDBNet {blocks} blocks, {features} features (Real-ESRGAN x4plus layout), random weights",
        "architecture": upscaler.architecture,
        "device": str(target),
        "gpu": torch.cuda.get_device_name(target) if target.type == "cuda" else None,
        "dtype": dtype_name(upscaler.dtype),
        "input": f"{size}x{size}",
        "output": f"{out.width}x{out.height}",
        "tile": tile,
        "margin": DEFAULT_MARGIN,
        "load_seconds": round(load_seconds, 3),
        "seconds": [round(t, 3) for t in times],
        "median_seconds": round(statistics.median(times), 3),
        "output_megapixels_per_second": round(out.width * out.height / 1e6 / statistics.median(times), 3),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(target) / 2**30, 3) if target.type == "cuda" else None,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.upscale", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPUs, float32 on the CPU")
    parser.add_argument("--size", type=int, default=1024, help="input side in pixels (default 1024)")
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile side (default {DEFAULT_TILE})")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="1 block, 8 features: a smoke test, not a benchmark")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    report = run(args.device, args.dtype, args.size, args.tile, args.tiny, args.repeats)
    return emit(report, args.json)


if __name__ == "__main__":
    main()
