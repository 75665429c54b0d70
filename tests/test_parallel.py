"""Ulysses sequence parallelism on the CPU: 2 gloo processes give the single process's result (float32 noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zstudio.engine import Generator
from zstudio.parallel import (
    check_compiled,
    enable_ulysses,
    free_port,
    init_group,
    parse_parallel,
    start_ulysses,
    stop_ulysses,
)
from zstudio.params import GenerationParams, ParamError
from zstudio.tiny import Sizes, build_transformer

FLOAT32_BOUND = 1e-4  # measured 0.0 on the CPU: attention per head and linears per token are computed alike


def test_parse_parallel_names_the_field_and_the_choices():
    assert parse_parallel(None) == 1
    assert parse_parallel("off") == 1
    assert parse_parallel("ulysses:4") == 4
    for bad in ("ulysses:1", "ulysses:9", "ring:2", "ulysses"):
        with pytest.raises(ParamError, match="parallel.*ulysses:N"):
            parse_parallel(bad)


def odd_head_transformer(fast: bool) -> torch.nn.Module:
    """3 heads: 2 ranks cannot share them evenly, so the Ulysses all-to-all pads them."""
    torch.manual_seed(0)
    transformer = build_transformer(Sizes(dim=48, n_heads=3, axes_dims=(8, 4, 4), n_layers=2, n_refiner_layers=2))
    if fast:
        from zstudio.speed.attention import use_fast_attention

        use_fast_attention(transformer, real_rope=True)
    return transformer.eval()


def forward(transformer: torch.nn.Module) -> np.ndarray:
    generator = torch.Generator().manual_seed(1)
    latents = [torch.randn(16, 1, 8, 8, generator=generator)]
    caption = [torch.randn(7, 32, generator=generator)]
    with torch.no_grad():
        return transformer(latents, torch.tensor([0.5]), caption, return_dict=False)[0][0].numpy()


def _rank(rank: int, port: int, results) -> None:
    init_group(rank, 2, port, torch.device("cpu"))
    for fast in (False, True):
        transformer = odd_head_transformer(fast)
        enable_ulysses(transformer, 2, torch.device("cpu"))
        results.put((rank, fast, forward(transformer)))
    dist.destroy_process_group()


def test_two_ranks_match_one_process_with_an_odd_head_count():
    """diffusers' attention processor and zstudio's fast one (speed fast/fastest), in the same two ranks."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for process in ranks:
        process.start()
    outs = [results.get(timeout=120) for _ in range(4)]
    for process in ranks:
        process.join(30)
    for fast in (False, True):
        expected = forward(odd_head_transformer(fast))
        for rank in range(2):
            out = next(o for r, f, o in outs if r == rank and f == fast)
            assert out.shape == expected.shape
            assert np.abs(out - expected).max() <= FLOAT32_BOUND, f"rank {rank}, fast {fast}"


def test_compiled_speed_is_refused_where_heads_need_padding():
    check_compiled(30, 2, "fast")  # plain Ulysses: compiles (checked on the CPU with bench.scale --tiny --speed fast)
    check_compiled(30, 4, "exact")
    with pytest.raises(ParamError, match="parallel.*--speed exact"):
        check_compiled(30, 4, "fast")


def test_serve_refuses_a_bad_parallel_name_and_ulysses_with_replicas(tmp_path):
    from click.testing import CliRunner

    from zstudio.cli import main

    bad = CliRunner().invoke(main, ["serve", "--parallel", "ring:2", "--outputs", str(tmp_path)])
    assert bad.exit_code == 2 and "parallel" in bad.output and "ulysses:N" in bad.output
    both = CliRunner().invoke(main, ["serve", "--ray", "--parallel", "ulysses:2", "--outputs", str(tmp_path)])
    assert both.exit_code == 2 and "with --ray" in both.output


def test_ulysses_generator_draws_the_single_process_image(tiny_dir, generator, tmp_path):
    params = GenerationParams(prompt="a red square", width=256, height=256, num_inference_steps=2, seed=7)
    expected = np.asarray(generator.generate_images(params).images[0], dtype=np.int16)
    parallel = Generator(model=str(tiny_dir), device="cpu", outputs=tmp_path)
    start_ulysses(parallel, 2)
    try:
        assert parallel.pipe.transformer._parallel_config is not None
        image = np.asarray(parallel.generate_images(params).images[0], dtype=np.int16)
        again = np.asarray(parallel.generate_images(params.replace(seed=8)).images[0], dtype=np.int16)
    finally:
        stop_ulysses(parallel)
    assert np.abs(image - expected).max() <= 1  # 8-bit pixels: float32 noise can move one rounding
    assert np.abs(again - expected).max() > 1  # a second job ran in step on both ranks, and its seed mattered
