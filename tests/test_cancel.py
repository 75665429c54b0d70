"""Cancelling inside a step: checks before each transformer and VAE block (and their big parts), on the tiny model."""

from __future__ import annotations

import pytest

from zstudio.cancel import _blocks, cancellable
from zstudio.engine import GenerationCancelled, Generator
from zstudio.params import GenerationParams

PARAMS = GenerationParams(prompt="a red circle", width=256, height=256, num_inference_steps=3, seed=1)


def test_a_cancel_stops_the_first_step_before_its_end(generator):
    checks, steps = [], []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) >= 3  # the third block of the first step

    with cancellable(generator.pipe, should_stop) as hooks, pytest.raises(GenerationCancelled):
        assert hooks > 10
        generator.generate_images(PARAMS, progress=lambda i, total: steps.append(i))
    assert steps == [] and len(checks) == 3


def test_hooks_come_off_afterwards(generator):
    blocks = _blocks(generator.pipe)
    assert all(not block._forward_pre_hooks for block in blocks)
    with cancellable(generator.pipe, lambda: False):
        assert all(len(block._forward_pre_hooks) == 1 for block in blocks)
        generator.generate_images(PARAMS)
    assert all(not block._forward_pre_hooks for block in blocks)


def test_compiled_modules_are_left_alone(tiny_dir):
    """A hook inside a torch.compile'd graph would be traced into it; compiled modes cancel between steps."""
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    before = _blocks(generator.pipe)
    generator.pipe.transformer.compile()  # marks it compiled; nothing is compiled until it is called
    after = _blocks(generator.pipe)
    assert len(after) < len(before)
    assert not any(block in after for block in generator.pipe.transformer.modules())
