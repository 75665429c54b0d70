"""Running the Qwen3 text encoder: on the prompt's own tokens, or padded to a few fixed lengths and replayed
as CUDA graphs.

Under the causal mask a token never sees the tokens after it, so right padding cannot change the states we keep
(tests check the equality). diffusers pads every prompt to 512; we either skip padding (eager) or pad only to the
next of a few bucket lengths, so each bucket is one captured graph and the 36 layers' ~500 kernel launches
become one replay. The length is symbolic in the compiled graph: one compile serves every bucket (each bucket then
records its own CUDA graph, in well under a second).
"""

from __future__ import annotations

import torch

BUCKETS = (64, 128, 256, 512)


class PenultimateHidden(torch.nn.Module):
    """The encoder's second-to-last hidden states: what Z-Image conditions on."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, output_hidden_states=True).hidden_states[-2]


class TokenEncoder:
    """ids → (tokens, hidden) states on the device. `buckets` pads to fixed lengths; `graphs` captures them."""

    def __init__(self, text_encoder, pad_id: int = 0, buckets: tuple[int, ...] = (), graphs: bool = False):
        self.module = PenultimateHidden(text_encoder)
        self.pad_id = pad_id
        self.buckets = tuple(sorted(buckets))
        self.graphs = graphs
        self.forward = (
            torch.compile(self.module, mode="reduce-overhead", dynamic=True) if graphs else self.module.forward
        )

    def padded_length(self, n: int) -> int:
        return next((b for b in self.buckets if b >= n), n)

    def __call__(self, ids: list[int], device: torch.device) -> torch.Tensor:
        """`device` is where the encoder computes: its weights may live elsewhere and be streamed in."""
        length = self.padded_length(len(ids))
        input_ids = torch.full((1, length), self.pad_id, dtype=torch.long)
        input_ids[0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        hidden = self.forward(input_ids.to(device))
        # A graph replay overwrites its output buffer: keep our own copy of the kept rows.
        return hidden[0, : len(ids)].clone()
