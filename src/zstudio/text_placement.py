"""Where the text encoder lives in the memory modes below resident, chosen by what fits.

A new prompt runs the 8 GB Qwen3 text encoder once. In the low modes it used to cross PCIe each time, pinned on the
fly (about 1 s per new prompt). Two named techniques replace that:

| placement       | what                                                                                   |
|-----------------|----------------------------------------------------------------------------------------|
| resident        | bf16 on the GPU (memory mode resident)                                                 |
| resident-8bit   | its linear layers int8 weight-only (torchao, one scale per row), kept on the GPU:      |
|                 | ~4.1 GiB instead of 7.5, no transfer per prompt; embeddings close to bf16, not equal   |
| streamed-pinned | layers streamed through the GPU from a pinned host copy, the next layer's transfer      |
|                 | overlapped with the current one's compute (diffusers group offloading): +7.5 GB RAM    |
| streamed        | the same without the pinned copy (each layer pinned as it goes): slower, lean on RAM  |

Both streamed placements keep the token table (0.78 GB of Qwen3-4B's 7.5) in host memory and look the prompt's rows
up there (`HostEmbedding`): streamed with the other top-level modules, it crossed PCIe in and out unpinned on every
prompt, 0.57 s of the 0.91 s a new prompt took on the H100 (session 8 profile, docs/perf-notes.md).

`choose_text_placement` takes resident-8bit where the card's free memory holds it beside the mode's own estimate
(`memory.needed_gb`), else streamed-pinned where host RAM holds the pinned copy, else streamed (with a log line).
The 8-bit size was estimated, then measured on the full-size model (docs/BENCHMARKS.md, "low-memory modes").
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TEXT_PLACEMENTS = ("resident", "resident-8bit", "streamed-pinned", "streamed")
GIB = 2**30
# int8 halves the linears; the embedding table and norms stay bf16. Qwen3-4B's 151,936 x 2,560 embedding is 0.72 of
# its 7.46 GiB, so (7.46 - 0.72) / 2 + 0.72 = 4.09 GiB, 0.55 of bf16 (the H100 measured 4.11 of 7.49: 0.549).
EIGHT_BIT_FRACTION = 0.55
HOST_MARGIN_GIB = 4.0  # host RAM left to everything else once the pinned copy is made


def text_8bit_gib(text_encoder_gib: float) -> float:
    """Estimated GiB on the GPU of a text encoder of `text_encoder_gib` (bf16) with int8 weight-only linears."""
    return text_encoder_gib * EIGHT_BIT_FRACTION


def module_gib(module: torch.nn.Module) -> float:
    """GiB of a module's parameters and buffers as they are stored now (torchao's 8-bit tensors by their parts)."""
    return sum(_stored_bytes(t) for t in (*module.parameters(), *module.buffers())) / GIB


def _stored_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass: its data and scales, not its logical dtype
        names, _context = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def host_available_bytes() -> int | None:
    """Host RAM available to new allocations (MemAvailable), or None where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def int8_available() -> bool:
    """torchao is an optional extra (`zstudio[fp8]`): without it the 8-bit text encoder is not offered."""
    from .memory import installed

    return installed("torchao")


def choose_text_placement(mode: str, device: torch.device, free_bytes: int | None, mode_needs_gib: float,
                          text_encoder_gib: float, host_bytes: int | None, int8: bool = True,
                          host_needs_gib: float = 0.0) -> tuple[str, str]:  # fmt: skip
    """(placement, reason) for the text encoder in memory `mode`.

    `mode_needs_gib` is the mode's own estimate (`memory.needed_gb`: it counts the streamed encoder as one layer at a
    time); `free_bytes` the card's free memory; `host_bytes` the host RAM available (None: unknown), of which the mode
    itself takes `host_needs_gib` (`memory.host_needed_gb`, when chosen before loading); `int8` whether torchao can run
    here."""
    if device.type != "cuda" or mode == "resident":
        return "resident", ""
    free_gib = (free_bytes or 0) / GIB
    eight_bit = text_8bit_gib(text_encoder_gib)
    if int8 and mode_needs_gib + eight_bit <= free_gib:
        return "resident-8bit", (f"text encoder int8 on the GPU: about {eight_bit:.1f} GiB beside the "
                                 f"{mode_needs_gib:.1f} GiB of memory mode {mode}, {free_gib:.1f} free")  # fmt: skip
    why = "no int8 copy offered" if not int8 else f"{eight_bit:.1f} GiB more than {mode} needs does not fit"
    pinned_needs = host_needs_gib + text_encoder_gib + HOST_MARGIN_GIB
    if host_bytes is not None and host_bytes / GIB >= pinned_needs:
        return "streamed-pinned", f"text encoder streamed from a pinned copy ({why} on the GPU)"
    host = "unknown" if host_bytes is None else f"{host_bytes / GIB:.1f} GiB"
    return "streamed", (f"text encoder streamed without a pinned copy: host RAM available {host}, memory mode {mode} "
                        f"with a pinned copy needs {pinned_needs:.1f} GiB: a new prompt is slower")  # fmt: skip


def default_placement(mode: str, device: torch.device, text_encoder_gib: float, host_needs_gib: float = 0.0) -> str:
    """Without a free-memory reading (the out-of-memory path, weights already loaded): stream, pinned where host RAM
    allows beside `host_needs_gib` still to come (stream's pinned transformer copy)."""
    if device.type != "cuda" or mode == "resident":
        return "resident"
    placement, note = choose_text_placement(mode, device, 0, 0.0, text_encoder_gib, host_available_bytes(),
                                            int8=False, host_needs_gib=host_needs_gib)  # fmt: skip
    if placement == "streamed":
        log.info(note)
    return placement


def quantize_text_encoder_8bit(text_encoder: torch.nn.Module, device: torch.device) -> None:
    """int8 weight-only linears (one scale per output row), quantized onto `device` one layer at a time from host
    memory (no full bf16 copy on the GPU); the embedding table and norms move as they are."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise RuntimeError("the 8-bit text encoder needs torchao: pip install 'zstudio[fp8]' (or torchao)") from None
    if getattr(text_encoder, "_zstudio_8bit", None):
        text_encoder.to(device)
        return
    config = Int8WeightOnlyConfig(set_inductor_config=False)  # True would retune every later compile in the process
    quantize_(text_encoder, config, filter_fn=lambda m, _name: isinstance(m, torch.nn.Linear), device=device)
    text_encoder.to(device)
    text_encoder._zstudio_8bit = "int8 weight-only"
    log.info("text encoder linears quantized to int8 weight-only on %s", device)


class HostEmbedding(torch.nn.Module):
    """A token table kept in host memory, outside the streaming: a prompt reads ~100 of its 151,936 rows, so the
    lookup runs on the CPU and only those rows go to the device. The table is a plain attribute, not a parameter,
    so diffusers' offloading hooks (which move parameters and buffers) never carry it across PCIe."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.padding_idx = embedding.padding_idx
        self.__dict__["table"] = embedding.weight.detach().to("cpu")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.cpu(), self.table, self.padding_idx)
        return rows.to(input_ids.device)


def keep_embedding_on_host(text_encoder: torch.nn.Module) -> None:
    """Swap the encoder's input embedding (transformers' `get_input_embeddings` API) for a `HostEmbedding`."""
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(embedding, HostEmbedding):
        text_encoder.set_input_embeddings(HostEmbedding(embedding))


def place_text_encoder(text_encoder: torch.nn.Module, placement: str, device: torch.device) -> None:
    """Put the text encoder where `placement` says (TEXT_PLACEMENTS)."""
    from .memory import stream_weights

    if placement not in TEXT_PLACEMENTS:
        raise ValueError(f"text encoder placement {placement!r}; allowed: {', '.join(TEXT_PLACEMENTS)}")
    if placement == "resident":
        text_encoder.to(device)
    elif placement == "resident-8bit":
        quantize_text_encoder_8bit(text_encoder, device)
    else:
        keep_embedding_on_host(text_encoder)
        stream_weights(text_encoder, device, leaf=False, low_ram=placement == "streamed")


def embedding_error(reference: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """How far `test` hidden states (tokens, hidden) are from `reference`: mean and min per-token cosine similarity,
    and the relative error ||test - ref|| / ||ref|| over the whole prompt (float32)."""
    ref, out = reference.float(), test.float()
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "relative_error": float((out - ref).norm() / ref.norm().clamp_min(1e-12)),
    }
