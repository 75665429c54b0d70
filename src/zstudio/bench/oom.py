"""Out-of-memory recovery on a real GPU: the engine's `auto` fallback, run into a genuine CUDA out-of-memory error.

`python -m zstudio.bench.oom --start resident --cap 28 --size 2048x2048 --json out.json` builds the full-size
architecture with random weights (as `zstudio bench` does), puts it in memory mode `--start`, caps the process at
`--cap` GiB (`torch.cuda.set_per_process_memory_fraction`: past the cap an allocation fails as on a smaller card),
then generates at `--size` with `memory="auto"`: the first attempt runs out of memory, the engine frees what it
held, switches to the next mode (`memory.NEXT_MODE`, which skips modes whose dependencies are missing) and retries.
Reported: whether it recovered, the mode it ended in, seconds for the recovering call and for a second call in the
new mode, peak reserved memory, and the error text when it did not recover.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .arch import random_generator
from .memory import generate, set_cap
from .run import emit, gpu_info, timed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ..memory import NEXT_MODE

    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.oom", description=__doc__)
    parser.add_argument("--start", default="resident", help="memory mode before the out-of-memory error")
    parser.add_argument("--cap", type=float, default=28.0, help="GiB the process may use (the simulated card)")
    parser.add_argument("--size", default="2048x2048")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the out-of-memory benchmark needs a CUDA GPU")
    width, height = (int(v) for v in args.size.split("x"))
    command = "python -m zstudio.bench.oom " + " ".join(sys.argv[1:] if argv is None else argv)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": command, **gpu_info(),
                              "start": args.start, "cap_gib": args.cap, "size": args.size,
                              "expected_next": NEXT_MODE[args.start]}  # fmt: skip
    generator = random_generator(speed="exact", memory="auto")
    generator.switch_memory(args.start)
    resident = getattr(generator.pipe.transformer, "_zstudio_resident_blocks", 0)  # stream: kept before the cap
    report["resident_blocks_before"] = resident
    set_cap(args.cap)
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds, _ = generate(generator, width, height)
        # In auto mode only an out-of-memory error changes the mode (or, in stream, streams its resident blocks
        # too before moving down): unchanged means the cap never bit.
        released = bool(resident) and not getattr(generator.pipe.transformer, "_zstudio_resident_blocks", 0)
        hit = generator.memory != args.start or released
        report["resident_blocks_released"] = released
        report.update(out_of_memory=hit, recovered=hit, recover_call_s=seconds, mode_after=generator.memory)
        report["second_call_s"], _ = timed(lambda: generate(generator, width, height))
    except Exception as err:  # the report says how it failed
        error = f"{type(err).__name__}: {err}"[:2000]
        report.update(out_of_memory=True, recovered=False, mode_after=generator.memory, error=error)
    report["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    emit(report, args.json)
    return report


if __name__ == "__main__":
    main()
