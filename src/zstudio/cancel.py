"""Cancel inside a step: a check before every transformer block and VAE decoder block, not only between steps.

A 2048x2048 step of the full model on a small card (or any step on a CPU) takes many seconds; checking only between
steps would let a cancelled job hold the device that long. A forward pre-hook on each block, and on the attention,
feed-forward and resnet parts inside it, raises `GenerationCancelled` as soon as `should_stop()` is true, so a cancel
lands within one part's time.

The hooks go on for one generation and come off afterwards. They are not installed on compiled modules: a hook
inside a `torch.compile`d graph would be traced into it (and recompiled on every install); compiled steps are short
anyway, so between-step checks suffice there.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import torch

from .engine import GenerationCancelled

BLOCK_LISTS = {
    "transformer": ("noise_refiner", "context_refiner", "layers"),
    "vae": ("decoder.mid_block", "decoder.up_blocks"),
}
# Inside each block, its large parts are checked too: attention and feed-forward halves of a transformer block, the
# resnets and attention of a VAE block (at 2048x2048 on a CPU one of those takes seconds).
PARTS = re.compile(r"(Attention|FeedForward|ResnetBlock2D|Upsample2D)$")


def _blocks(pipe) -> list[torch.nn.Module]:
    found = []
    for component, names in BLOCK_LISTS.items():
        root = getattr(pipe, component, None)
        if root is None or _compiled(root):
            continue
        for name in names:
            module = root
            for part in name.split("."):
                module = getattr(module, part, None)
            if module is None:
                continue
            for block in module if isinstance(module, torch.nn.ModuleList) else [module]:
                found += [m for m in block.modules() if m is block or PARTS.search(type(m).__name__)]
    return [module for module in found if not _compiled(module)]


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def cancellable(pipe, should_stop: Callable[[], bool]) -> Iterator[int]:
    """Within the block, every transformer and VAE-decoder block first checks `should_stop`; yields the count."""

    def check(module, args):
        if should_stop():
            raise GenerationCancelled()

    handles = [block.register_forward_pre_hook(check) for block in _blocks(pipe)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
