"""LoRA benchmark: per-image seconds with 0, 1 and 3 LoRAs, the cost of switching sets, and whether switching
compiled anything new; in the 8-bit modes also the pictures' distance from full precision.

`python -m zstudio.bench.lora --folder CKPT --json OUT` loads CKPT in the default speed mode (`fast` on a GPU:
blocks compiled, LoRAs fused into the weights), writes random rank-32 LoRAs for every attention and feed-forward
linear of its transformer, warms up, then times generations in the order 0 → 1 → 3 → 0 LoRAs (each switch timed
alone through `Generator.apply_loras`) and counts the graphs dynamo compiled during the timed part (0 means no
request recompiled). On the CPU tests run it on the tiny checkpoint.

`--memory 8bit` or `--speed fastest` (8-bit weights: LoRAs fused into each layer's bf16 weight and re-quantized)
first makes the reference pictures in bf16 (memory resident, speed exact) with 0, 1 and 3 LoRAs, then moves the
same model to the 8-bit mode and reports, beside the timings, the PSNR of each 8-bit picture against its bf16 twin
(same prompt, seed and LoRAs; the 0-LoRA line is what 8-bit weights cost without LoRAs).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..lora import LoraFolder
from .arch import RANDOM, random_generator
from .run import emit, gpu_info, psnr, stats, sync, timed


def random_loras(transformer, folder: Path, count: int, rank: int = 32, seed: int = 0) -> list[str]:
    """`count` random rank-`rank` LoRAs (diffusers/PEFT layout) on every attention and feed-forward linear."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        tensors = {}
        for name, module in transformer.named_modules():
            if isinstance(module, torch.nn.Linear) and (".attention." in name or ".feed_forward." in name):
                scale = 0.1 / rank**0.5
                a = torch.randn(rank, module.in_features, generator=gen) * scale
                b = torch.randn(module.out_features, rank, generator=gen) * scale
                tensors[f"transformer.{name}.lora_A.weight"] = a.to(torch.bfloat16)
                tensors[f"transformer.{name}.lora_B.weight"] = b.to(torch.bfloat16)
        save_file(tensors, str(folder / f"bench{i}.safetensors"))
        names.append(f"bench{i}")
    return names


def to_eight_bit(generator, memory: str, speed: str) -> None:
    """Move a bf16 generator (its reference pictures made, speed exact) to 8-bit weights in place, as loading in that
    mode would have made it: memory `8bit` (float8 on fp8 GPUs; int8 weight-only elsewhere: the CPU smoke test),
    then `speed` (`fast`: compiled blocks over the 8-bit weights), or speed `fastest` (float8, compiled)."""
    from ..memory import quantize_8bit
    from ..speed import apply_speed

    generator.loras.unload(generator.pipe)  # the reference ran PEFT adapters: quantize the plain base layers
    if memory == "8bit" and generator.device.type == "cuda":
        generator.switch_memory(memory)
    elif memory == "8bit":  # the memory mode places nothing off a GPU: quantize as it would
        quantize_8bit(generator.pipe.transformer, generator.device)
    if speed != generator.speed:
        generator.speed = speed
        generator.token_encoder = apply_speed(generator.pipe, speed, graphs=generator.graphs,
                                              cache_dir=generator.compile_cache)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    from ..engine import Generator
    from ..params import GenerationParams
    from ..quantized import layers_of
    from ..speed import choose_speed

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help=f"a diffusers checkpoint folder (Z-Image, or a tiny one), or "
                        f"{RANDOM!r}: the full-size architecture with random weights built on the GPU")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--speed", default=None, help="speed mode [default: the device's default]; fastest: 8-bit "
                        "weights; with --memory 8bit, fast compiles the blocks over them")  # fmt: skip
    parser.add_argument("--memory", default="resident", choices=("resident", "8bit"))
    parser.add_argument("--bf16-from", default="auto", choices=("auto", "kept", "checkpoint"),
                        help="8-bit runs: where LoRAs take each layer's bf16 weights from; auto: the model's own "
                        "checkpoint, kept on the host where it has none (random-full-size); checkpoint: the "
                        "transformer written to a temporary folder first (12 GB for the full size); kept: host copies "
                        "made at quantize time")  # fmt: skip
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    eight_bit = args.memory == "8bit" or args.speed == "fastest"
    speed = args.speed or choose_speed("auto", torch.device(args.device or "cuda"))[0]
    if args.memory == "8bit" and speed == "fastest":
        speed = "fast"  # as the engine does: the weights already are 8-bit, compiled blocks over them
    first_speed = "exact" if eight_bit else args.speed  # 8-bit runs: the bf16 references first

    if args.folder == RANDOM:
        load_s, generator = timed(lambda: random_generator(args.device or "cuda", speed=first_speed or "auto",
                                                           outputs=tempfile.mkdtemp()))  # fmt: skip
    else:
        generator = Generator(model=args.folder, speed=first_speed, device=args.device, outputs=tempfile.mkdtemp())
        load_s, _ = timed(generator.load)
    written = None
    if eight_bit and args.bf16_from != "auto":
        written = point_bf16_source(generator.pipe.transformer, args.bf16_from)
    folder = Path(tempfile.mkdtemp(prefix="zstudio-bench-lora-"))
    generator.loras.folder = LoraFolder(folder)
    names = random_loras(generator.pipe.transformer, folder, 3, args.rank)
    sets = {"0": (), "1": ((names[0], 0.8),), "3": tuple((n, 0.5) for n in names)}

    def params(loras) -> GenerationParams:
        return GenerationParams(prompt="a lighthouse at dusk, oil painting", width=width, height=height,
                                num_inference_steps=args.steps, seed=0, loras=loras)  # fmt: skip

    def picture(label: str) -> np.ndarray:
        return np.asarray(generator.generate_images(params(sets[label])).images[0])

    references, to_8bit_s = {}, None
    if eight_bit:
        references = {label: picture(label) for label in sets}
        print(f"bf16 references made ({generator.memory}, {generator.speed})", flush=True)
        to_8bit_s, _ = timed(lambda: to_eight_bit(generator, args.memory, speed))
    warmup_s, _ = (  # the timed size only: every graph a request here meets
        timed(lambda: generator.warmup(sizes=((width, height),)))
        if generator.compiled
        else timed(lambda: generator.generate_images(params(())))
    )
    print(f"loaded in {load_s:.1f} s, warmed up in {warmup_s:.1f} s", flush=True)
    for loras in sets.values():  # loads each file once and runs each set once: first-use costs stay out of the timings
        generator.generate_images(params(loras))
    graphs_before = counters["stats"]["unique_graphs"]
    quantized = layers_of(generator.pipe.transformer)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m zstudio.bench.lora " + " ".join(sys.argv[1:] if argv is None else argv),
        **gpu_info(),
        "device": str(generator.device),
        "speed": generator.speed,
        "memory": generator.memory,
        "weights_8bit": type(next(iter(quantized_weights(generator.pipe.transformer)), None)).__name__
        if quantized
        else None,
        "way": "fused" if generator.loras.fused else "adapters",
        "size": args.size,
        "steps": args.steps,
        "rank": args.rank,
        "load_s": round(load_s, 2),
        "to_8bit_s": to_8bit_s and round(to_8bit_s, 2),
        "warmup_s": round(warmup_s, 2),
        "per_image_s": {},
        "switch_s": {},
    }
    if quantized is not None:  # where the bf16 weights come back from, and the host memory they hold
        report["bf16_source"] = "kept on the host" if quantized.kept else "checkpoint files"
        report["bf16_kept_layers"] = len(quantized.kept)
        report["bf16_kept_gib"] = round(sum(t.numel() * t.element_size() for t in quantized.kept.values()) / 2**30, 2)
    cuda = generator.device.type == "cuda"
    peaks = []
    previous = "3"
    for label in ("0", "1", "3"):
        switch = []
        for _ in range(args.repeats):
            generator.apply_loras(params(sets[previous]))
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
            seconds, _ = timed(lambda label=label: generator.apply_loras(params(sets[label])))
            switch.append(seconds)
            if cuda:
                peaks.append((torch.cuda.max_memory_allocated() - held) / 2**30)
        report["switch_s"][f"{previous}->{label}"] = stats(switch)
        per_image = [timed(lambda label=label: generator.generate_images(params(sets[label])))[0]
                     for _ in range(args.repeats)]  # fmt: skip
        report["per_image_s"][label] = stats(per_image)
        print(f"{previous}->{label}: switch {report['switch_s'][f'{previous}->{label}']}, per image "
              f"{report['per_image_s'][label]}", flush=True)  # fmt: skip
        previous = label
    report["graphs_compiled_while_switching"] = counters["stats"]["unique_graphs"] - graphs_before
    if peaks:  # GPU memory a switch needs above what is held: one layer's float32 sum and its new 8-bit copy
        report["switch_peak_extra_gib"] = round(max(peaks), 3)
    if references:
        report["psnr_8bit_vs_bf16_db"] = {
            label: round(psnr(picture(label), ref), 2) for label, ref in references.items()
        }
        report["psnr_lora_effect_bf16_db"] = {  # how far the LoRAs move the bf16 picture, for scale
            label: round(psnr(references[label], references["0"]), 2) for label in ("1", "3")
        }
        print(f"PSNR 8-bit vs bf16: {report['psnr_8bit_vs_bf16_db']}", flush=True)
    if written is not None:
        shutil.rmtree(written, ignore_errors=True)
    emit(report, args.json)
    return report


def point_bf16_source(transformer, source: str) -> Path | None:
    """Where quantizing will find the bf16 weights (`zstudio.quantized.checkpoint_files` reads diffusers'
    `_name_or_path`): a temporary copy of the transformer's weights (`checkpoint`, returned to be deleted), or none
    (`kept`: host copies at quantize time)."""
    if source == "kept":
        transformer.register_to_config(_name_or_path=None)
        return None
    written = Path(tempfile.mkdtemp(prefix="zstudio-bench-transformer-"))
    seconds, _ = timed(lambda: transformer.save_pretrained(written))
    print(f"transformer written to {written} in {seconds:.1f} s (the bf16 source)", flush=True)
    transformer.register_to_config(_name_or_path=str(written))
    return written


def quantized_weights(transformer):
    """The 8-bit weight tensors of `transformer` (for the report's name of their kind)."""
    from ..quantized import is_quantized

    return (m.weight for m in transformer.modules() if isinstance(m, torch.nn.Linear) and is_quantized(m.weight))


if __name__ == "__main__":
    main()
