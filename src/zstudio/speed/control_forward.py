"""The ControlNet's forward without host round trips, for the compiled speed modes.

This is diffusers' `ZImageControlNetModel.forward` (0.42, the basic single-image mode) on the same modules with the
same arithmetic, written so that the GPU is never left waiting. A profile on the H100
(docs/bench/2026-11-24-control-profile-probe.py; numbers in docs/BENCHMARKS.md, session 9) showed diffusers' forward
taking more CPU time to launch its work than the GPU took to run it: three boolean-mask assignments per call
(`x[pad_mask] = pad_token`) each wait for the GPU to finish everything queued before them (`nonzero`, then
`cudaStreamSynchronize`), which also stops the CPU from running ahead of the GPU. What differs here:

- pad tokens go in through `torch.where`, as the transformer's own `_prepare_sequence` does;
- no attention mask where every item of the batch has the same length, as in the transformer (an all-true mask also
  keeps SDPA off its fastest kernels);
- each control block hands back its hint and its state instead of re-stacking every hint so far (diffusers'
  `torch.stack([*hints, hint, c])` copies O(n²) activations);
- every block of the ControlNet runs through one block function (`inner`, the compiled one in the fast modes);
- where the ControlNet's noise refiner takes no hints (Union 1.0), its output is the transformer's own (the same
  modules on the same inputs), so the transformer takes it instead of running the refiners again
  (`shared_refiners`: two blocks over the image tokens a step).

`install` puts it on a ControlNet; `uninstall` gives back diffusers' forward. Tests compare the two outputs
(tests/test_control_speed.py), so a change in diffusers shows.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch.nn.utils.rnn import pad_sequence

_FLAG = "_zstudio_control_forward"
_REFINED = "_zstudio_refined"  # (image tokens, caption tokens) after the refiners, for the transformer's next call


def install(controlnet, inner: Callable) -> None:
    """Run `controlnet` through `forward`, each of its blocks through `inner` (`ZImageTransformerBlock.forward`, or
    a compiled copy of it, called with the block as `self`)."""
    from diffusers.models.controlnets.controlnet_z_image import ZImageControlTransformerBlock

    controlnet.forward = functools.partial(forward, controlnet)
    own = [*controlnet.control_layers, *(controlnet.control_noise_refiner or [])]  # not the transformer's refiners
    for block in own:
        if isinstance(block, ZImageControlTransformerBlock):
            block.forward = functools.partial(control_block, block, inner)
        else:  # Union 1.0's control noise refiner: plain blocks
            block.forward = functools.partial(_block, block, inner)
        setattr(block, _FLAG, True)
    setattr(controlnet, _FLAG, True)


def uninstall(module) -> None:
    """Undo `install` on `module` and everything in it (their class's forward again), dropping any refined tokens a
    forward left for a transformer call that never came (a run that failed in between): diffusers' forward leaves
    none, so `shared_refiners` would otherwise hand stale ones to the next call."""
    for block in module.modules():
        vars(block).pop(_REFINED, None)
        if vars(block).pop(_FLAG, False):
            del block.forward


def _block(block, inner: Callable, x, attn_mask, freqs_cis, adaln_input=None) -> torch.Tensor:
    """A plain block through `inner`, its rotary table contiguous outside any graph (its strides would be a guard)."""
    return inner(block, x, attn_mask, freqs_cis.contiguous(), adaln_input)


def control_block(block, inner: Callable, c: torch.Tensor, x: torch.Tensor, attn_mask, freqs_cis,
                  adaln_input=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """diffusers' `ZImageControlTransformerBlock.forward` without its stack: (hint, new state) for one state in.
    The block's middle is exactly `ZImageTransformerBlock.forward` with the control block as `self`."""
    if block.block_id == 0:
        c = block.before_proj(c) + x
    c = _block(block, inner, c, attn_mask, freqs_cis, adaln_input)
    return block.after_proj(c), c


def _mask(lengths: list[int], device: torch.device) -> torch.Tensor | None:
    """The attention mask of a padded batch; None when nothing is padded (the transformer's rule)."""
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return None
    return torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def _padded(feats: torch.Tensor, pad: torch.Tensor, pad_token: torch.Tensor, lengths: list[int]):
    """Pad tokens where the patchify padded (`pad`: its masks joined, one column; no host sync), then the items
    padded to one batch tensor."""
    feats = torch.where(pad, pad_token.to(feats.dtype), feats)
    return pad_sequence(list(feats.split(lengths)), batch_first=True, padding_value=0.0)


def _rope(controlnet, pos_ids: list[torch.Tensor], length: int) -> torch.Tensor:
    freqs = controlnet.rope_embedder(torch.cat(pos_ids)).split([len(p) for p in pos_ids])
    return pad_sequence(list(freqs), batch_first=True, padding_value=0.0)[:, :length]


def _joined(first: torch.Tensor, second: torch.Tensor, first_lengths: list[int], second_lengths: list[int]):
    """Per item, its first tokens then its second ones, padded to one batch (diffusers' `unified` sequences)."""
    items = [torch.cat([a[:m], b[:n]]) for a, b, m, n in zip(first, second, first_lengths, second_lengths)]
    return pad_sequence(items, batch_first=True, padding_value=0.0)


def forward(controlnet, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor],
            control_context: torch.Tensor | list[torch.Tensor], conditioning_scale: float = 1.0, patch_size: int = 2,
            f_patch_size: int = 1) -> dict[int, torch.Tensor]:  # fmt: skip
    """`ZImageControlNetModel.forward`'s hints {transformer layer: hint x scale}, computed as described above."""
    cn = controlnet
    key = f"{patch_size}-{f_patch_size}"
    adaln_input = cn.t_embedder(t * cn.t_scale)
    x, cap_feats, _, x_pos_ids, cap_pos_ids, x_pad, cap_pad = cn.patchify_and_embed(
        x, cap_feats, patch_size, f_patch_size
    )
    x_lengths = [len(item) for item in x]
    cap_lengths = [len(item) for item in cap_feats]
    device = x[0].device

    control = cn.control_all_x_embedder[key](torch.cat(cn.patchify(list(control_context), patch_size, f_patch_size)))
    x_pad = torch.cat(x_pad).unsqueeze(-1)  # the control tokens and the image tokens share it
    control = _padded(control, x_pad, cn.x_pad_token, x_lengths)
    x = cn.all_x_embedder[key](torch.cat(x))
    adaln_input = adaln_input.type_as(x)
    x = _padded(x, x_pad, cn.x_pad_token, x_lengths)
    x_freqs = _rope(cn, x_pos_ids, x.shape[1])
    x_mask = _mask(x_lengths, device)

    refiner_hints: dict[int, torch.Tensor] = {}
    if cn.add_control_noise_refiner is not None:  # Union 2.x: control blocks beside the noise refiner
        layers = cn.control_layers if cn.add_control_noise_refiner == "control_layers" else cn.control_noise_refiner
        hints = []
        for layer in layers:
            hint, control = layer(control, x, x_mask, x_freqs, adaln_input)
            hints.append(hint)
        # diffusers keeps one hint per control block it ran (all but the last state), placed by the refiner layers
        places = cn.control_refiner_layers_places
        refiner_hints = {place: hints[i] * conditioning_scale for i, place in enumerate(places)}
    for index, layer in enumerate(cn.noise_refiner):
        x = layer(x, x_mask, x_freqs, adaln_input)
        if index in refiner_hints:
            x = x + refiner_hints[index]

    cap_pad = torch.cat(cap_pad).unsqueeze(-1)
    cap = _padded(cn.cap_embedder(torch.cat(cap_feats)), cap_pad, cn.cap_pad_token, cap_lengths)
    cap_freqs = _rope(cn, cap_pos_ids, cap.shape[1])
    cap_mask = _mask(cap_lengths, device)
    for layer in cn.context_refiner:
        cap = layer(cap, cap_mask, cap_freqs)

    unified = _joined(x, cap, x_lengths, cap_lengths)
    unified_freqs = _joined(x_freqs, cap_freqs, x_lengths, cap_lengths)
    unified_mask = _mask([a + b for a, b in zip(x_lengths, cap_lengths)], device)

    if cn.add_control_noise_refiner is None:  # the refiners ran on exactly the transformer's inputs
        setattr(cn, _REFINED, (x, cap))
    if not cn.add_control_noise_refiner:  # Union 1.0: plain blocks refine the control tokens first
        for layer in cn.control_noise_refiner:
            control = layer(control, x_mask, x_freqs, adaln_input)
    control = _joined(control, cap, x_lengths, cap_lengths)
    hints = []
    for layer in cn.control_layers:
        hint, control = layer(control, unified, unified_mask, unified_freqs, adaln_input)
        hints.append(hint)
    return {place: hints[i] * conditioning_scale for i, place in enumerate(cn.control_layers_places)}


class _Given(torch.nn.Module):
    """Stands in for a transformer's refiner: hands back what the ControlNet's forward computed for it."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


@contextlib.contextmanager
def shared_refiners(transformer, controlnet) -> Iterator[None]:
    """Around the transformer's call that follows the ControlNet's `forward` on the same latents, timestep and
    prompts: where that forward left its refined image and caption tokens (Union 1.0), the transformer's noise and
    context refiners hand them back instead of running. Otherwise nothing changes. (diffusers' transformer runs its
    refiners in order and keeps the last one's output; tests compare the result with the refiners run.)"""
    refined = vars(controlnet).pop(_REFINED, None) if controlnet is not None else None
    if refined is None:
        yield
        return
    saved = transformer.noise_refiner, transformer.context_refiner
    transformer.noise_refiner = torch.nn.ModuleList([_Given(refined[0])])
    transformer.context_refiner = torch.nn.ModuleList([_Given(refined[1])])
    try:
        yield
    finally:
        transformer.noise_refiner, transformer.context_refiner = saved
