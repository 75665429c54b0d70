"""Running the Qwen3 text encoder: on the prompt's own tokens, or padded to a few fixed lengths and replayed
as CUDA graphs.

Under the causal mask a token never sees the tokens after it, so right padding cannot change the states we keep
(tests check the equality). diffusers pads every prompt to 512; we either skip padding (eager) or pad only to the
next of a few bucket lengths, so each bucket is one CUDA graph and the 36 layers' ~500 kernel launches become one
replay. The graphs are captured from the eager modules (`torch.cuda.graph`), not compiled: dynamo splits Qwen3 into
many graphs (transformers' output hooks) and took minutes at warm-up (docs/perf-notes.md, session 5), while a
capture takes a fraction of a second per bucket.
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
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-2]


class CapturedBuckets:
    """One CUDA graph per input length, captured on first use from the eager module, sharing one memory pool.

    A length whose capture fails (an op that syncs with the host, say) runs eagerly from then on, with a log line:
    a slower prompt, never a failed one."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor] | None] = {}
        self.pool = None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.device.type != "cuda":
            return self.module(input_ids)
        length = input_ids.shape[1]
        if length not in self.graphs:
            self.graphs[length] = self._capture(input_ids)
        entry = self.graphs[length]
        if entry is None:
            return self.module(input_ids)
        graph, static_in, static_out = entry
        static_in.copy_(input_ids)
        graph.replay()
        return static_out

    def _capture(self, input_ids: torch.Tensor):
        import logging

        device = input_ids.device
        static_in = input_ids.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(side):  # warm-up runs on a side stream, as torch.cuda.graph's docs ask
                for _ in range(2):
                    self.module(static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.module(static_in)
        except RuntimeError as err:  # capture refused: eager for this length
            torch.cuda.synchronize(device)
            logging.getLogger(__name__).warning("text encoder at %d tokens runs eagerly: CUDA graph capture failed "
                                                "(%s)", input_ids.shape[1], str(err).splitlines()[0][:200])  # fmt: skip
            return None
        self.pool = graph.pool()
        return graph, static_in, static_out


class TokenEncoder:
    """ids → (tokens, hidden) states on the device. `buckets` pads to fixed lengths; `graphs` captures them."""

    def __init__(self, text_encoder, pad_id: int = 0, buckets: tuple[int, ...] = (), graphs: bool = False):
        self.module = PenultimateHidden(text_encoder)
        self.pad_id = pad_id
        self.buckets = tuple(sorted(buckets))
        self.graphs = graphs
        self.forward = CapturedBuckets(self.module) if graphs else self.module.forward

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
