"""Ulysses sequence parallelism: one image's transformer tokens split across N processes (GPUs) of one host.

Built on diffusers' context-parallel hooks (`ContextParallelConfig(ulysses_degree=N, ulysses_anything=True)`): each
rank runs the transformer blocks on 1/N of the tokens; attention swaps tokens for heads with an all-to-all so each
rank attends over the whole sequence for a share of the heads. `ulysses_anything` pads the heads when their count
does not divide N (Z-Image has 30: 30 heads on 4 GPUs become 32, as cache-dit does). Z-Image's transformer declares
no `_cp_plan`, so `zimage_cp_plan` supplies one (the same split points as cache-dit's Z-Image plan).

`start_ulysses(generator, N)` turns a loaded-or-not `Generator` into rank 0 of a group: it spawns ranks 1..N-1 (each
its own `Generator` on its own GPU), and before every generation sends them the parameters, so all ranks run the
same generation in step. A cancel takes effect once the current image ends (stopping one rank mid-image would leave
the others waiting in a collective).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from .params import ParamError

log = logging.getLogger(__name__)
MAX_DEGREE = 8
# NVLink multicast (NVLS) can take a shared host's GPUs out of service; symmetric memory's multicast likewise.
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def parse_parallel(text: str | None) -> int:
    """`ulysses:N` -> N (2..8); None, "" or "off" -> 1."""
    if text in (None, "", "off", "none"):
        return 1
    kind, _, count = str(text).partition(":")
    if kind != "ulysses" or not count.isdigit() or not 2 <= int(count) <= MAX_DEGREE:
        raise ParamError("parallel", f"is {text!r}; use ulysses:N with N from 2 to {MAX_DEGREE}, or off")
    return int(count)


def zimage_cp_plan(transformer: torch.nn.Module) -> dict[str, Any]:
    """Split the token axis entering each stage (noise refiner, context refiner, main layers); gather after it.

    The attention mask is not split: after the all-to-all each rank attends over all keys."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def split(dims: int | None = 3) -> ContextParallelInput:
        return ContextParallelInput(split_dim=1, expected_dims=dims, split_output=False)

    def rope() -> ContextParallelInput:  # complex (batch, seq, half) or zstudio's real (batch, seq, half, 2)
        return split(None)

    plan: dict[str, Any] = {}
    for stage in ("noise_refiner", "context_refiner", "layers"):
        count = len(getattr(transformer, stage))
        # One hook name per plan key: a one-block stage splits x and freqs_cis on the "*" key, gathers on ".0".
        if count == 1:
            plan[f"{stage}.*"] = {"x": split(), "freqs_cis": rope()}
        else:
            plan[f"{stage}.0"] = {"x": split()}
            plan[f"{stage}.*"] = {"freqs_cis": rope()}
        plan[f"{stage}.{count - 1}"] = ContextParallelOutput(gather_dim=1, expected_dims=3)
    return plan


def check_compiled(heads: int, degree: int, speed: str) -> None:
    """Compiled speed modes work with plain Ulysses (heads divide N: Z-Image's 30 on 2, 3, 5 or 6 GPUs); diffusers'
    head-padding path gathers sizes inside the graph, which torch.compile (2.13) cannot trace."""
    if speed in ("fast", "fastest") and heads % degree:
        raise ParamError("parallel", f"ulysses:{degree} pads {heads} heads, which speed {speed} cannot compile; use "
                                     f"a GPU count dividing {heads}, or --speed exact")  # fmt: skip


def enable_ulysses(transformer: torch.nn.Module, degree: int, device: torch.device) -> None:
    """Put Ulysses attention and the token split on `transformer`; torch.distributed must be initialised with
    `degree` ranks. Works with diffusers' processor and zstudio's fast one (both dispatch through diffusers)."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != degree:
        raise ValueError(f"ulysses:{degree} needs {degree} ranks; torch.distributed has {world}")
    mesh = dist.device_mesh.init_device_mesh(device.type, (1, degree), mesh_dim_names=("ring", "ulysses"))
    # Heads that divide evenly take diffusers' plain Ulysses path; others its "anything" path, which pads them.
    heads = transformer.config.n_heads
    config = ContextParallelConfig(ulysses_degree=degree, ulysses_anything=heads % degree != 0, mesh=mesh)

    # diffusers picks the device as rank % accelerator count, which fails on CPU (gloo, the tests): give our own.
    def resolve(cp_config: ContextParallelConfig) -> ParallelConfig:
        resolved = ParallelConfig(context_parallel_config=cp_config)
        resolved.setup(rank, world, device, mesh=mesh)
        transformer._parallel_config = resolved
        return resolved

    transformer._resolve_parallel_config = resolve
    transformer.enable_parallelism(config=config, cp_plan=zimage_cp_plan(transformer))
    _prime_split_hooks(transformer)


def _prime_split_hooks(transformer: torch.nn.Module) -> None:
    """diffusers' split hook reads the block's signature on its first call, which torch.compile cannot trace
    (compiled fast modes then fail); fill that cache now, outside any compiled region."""
    import inspect

    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, ContextParallelSplitHook):
                metadata = hook.module_forward_metadata
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # without self
                metadata.cached_parameter_indices = {name: index for index, name in enumerate(names)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_group(rank: int, degree: int, port: int, device: torch.device) -> None:
    os.environ.update(SAFE_NCCL_ENV)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=degree)


def rank_device(base: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if base.type == "cuda" else base


def _follow(index: int, degree: int, port: int, spec: dict[str, Any]) -> None:
    """Ranks 1..N-1 (spawned as 0..N-2): the same generator on their own device, running what rank 0 broadcasts."""
    rank = index + 1
    from .engine import Generator
    from .params import GenerationParams

    device = rank_device(torch.device(spec["device"]), rank)
    init_group(rank, degree, port, device)
    generator = Generator(**{**spec, "device": str(device)}).load()
    enable_ulysses(generator.pipe.transformer, degree, device)
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        try:
            generator.generate_images(GenerationParams.from_dict(box[0]))
        except Exception:  # rank 0 meets the same error and reports it; this rank waits for the next job
            log.exception("rank %d: generation failed", rank)
    dist.destroy_process_group()


def start_ulysses(generator: Any, degree: int) -> Any:
    """Make `generator` (a `zstudio.engine.Generator`, on cuda:0 or the CPU) rank 0 of a Ulysses group of `degree`;
    it loads here, before the other ranks start.

    Returns the spawned processes' context; call `stop_ulysses(generator)` to end them."""
    import torch.multiprocessing as mp

    if degree < 2:
        return None
    base = generator.device
    if base.type == "cuda" and torch.cuda.device_count() < degree:
        raise ParamError("parallel", f"ulysses:{degree} needs {degree} GPUs; this host has {torch.cuda.device_count()}")
    generator.load()  # first: a refusal below leaves no rank waiting
    check_compiled(generator.pipe.transformer.config.n_heads, degree, generator.speed)
    port = free_port()
    spec = {"model": generator.model_spec, "device": str(base), "dtype": str(generator.dtype).removeprefix("torch."),
            "speed": generator.speed, "memory": "resident", "settings": generator.settings}  # fmt: skip
    context = mp.start_processes(_follow, args=(degree, port, spec), nprocs=degree - 1, join=False,
                                 start_method="spawn")  # fmt: skip
    init_group(0, degree, port, rank_device(base, 0))
    enable_ulysses(generator.pipe.transformer, degree, rank_device(base, 0))
    single = generator.generate_images

    @functools.wraps(single)
    def generate_images(params, progress=None):
        dist.broadcast_object_list([params.to_dict()], src=0)
        return single(params, progress=progress)

    generator.generate_images = generate_images
    generator.parallel_degree = degree
    generator.parallel_processes = context
    return context


def stop_ulysses(generator: Any) -> None:
    """Tell the other ranks to exit and wait for them."""
    context = getattr(generator, "parallel_processes", None)
    if context is None:
        return
    dist.broadcast_object_list([None], src=0)
    context.join()
    dist.destroy_process_group()
    generator.parallel_processes = None
