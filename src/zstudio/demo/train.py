"""Train the demo model: the real Z-Image architecture at a small size, taught to draw the shapes dataset.

`python -m zstudio.demo.train --out DIR` (or `zstudio make-demo`) runs it, seeded:
1. the training pictures are rendered: every one-shape scene and every two-shape picture whose (shape, colour,
   background) triples are all training triples (`dataset.split`), at 128x128;
2. a small `AutoencoderKL` (8x downsampling, 16 latent channels, as Flux's) learns to reconstruct them; its latent
   shift and scale are then measured on the training pictures, as the Flux VAE's were;
3. the small Qwen3 text encoder stays random and frozen; captions (several phrasings per picture, English and
   Chinese) are encoded once through the pipeline's own `_encode_prompt`, so training sees exactly the features
   that inference will;
4. each candidate transformer (`--candidates`, sizes in `CANDIDATES`) learns flow matching under the pipeline's
   convention (`zstudio.demo.flow`), with caption dropout so that CFG and negative prompts work; an exponential
   moving average of its weights is what gets saved, to DIR/<candidate>, a complete checkpoint folder.
With `--time-budget SECONDS` every stage stops on time (the learning rate follows whichever of steps and time runs
out first) and the run ends inside the budget; without it, `--steps` decides and a run is reproducible on one
machine. On a GPU (`--device cuda`) the transformer runs under bf16 autocast with compiled blocks.
Pick between candidates with `python -m zstudio.demo.accuracy --split validation`, never on the held-out split.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..tiny import Sizes, build_components, build_transformer
from .dataset import SIDE, PairScene, Scene, held_out_triples, render, split_pair_scenes, split_scenes
from .flow import model_time, noisy_latents, velocity_target

log = logging.getLogger(__name__)

VERSION = 2  # zstudio.json's "version": 1 was the 64x64 one-shape model
TEXT = {"text_hidden": 64, "text_layers": 2}
VAE = {"vae_channels": (32, 64, 64), "vae_groups": 8}  # three blocks: 4x, so 128x128 is 32x32 latents, 256 image tokens
CANDIDATES: dict[str, Sizes] = {
    # ~5.1M transformer parameters (10 MB in bf16): 0.35 s a picture at 20 steps on 2 CPU cores
    "s": Sizes(**TEXT, dim=192, n_layers=6, n_refiner_layers=1, n_heads=4, axes_dims=(16, 16, 16), **VAE),
    # ~7.1M (14 MB in bf16): the largest that keeps the checkpoint under 20 MB
    "m": Sizes(**TEXT, dim=224, n_layers=6, n_refiner_layers=1, n_heads=4, axes_dims=(16, 20, 20), **VAE),
}
SHIFT = 3.0  # the scheduler's shift: training draws noise levels the way inference visits them
CAPTION_DROPOUT = 0.1  # of the batches whose captions pad to 32 tokens (most of them); the empty prompt pads to 32
PAIR_SHARE = 0.5  # of training samples that are two-shape pictures
CAPTIONS_PER_PAIR = 6  # phrasings kept per two-shape picture (3 English, 3 Chinese, of both ways of telling it)
SEQ_MULTIPLE = 32  # diffusers pads captions to a multiple of this (SEQ_MULTI_OF)
STEPS = 20000  # transformer steps when no time budget stops it first
DEFAULTS = {"steps": 20, "cfg": 3.0}  # the profile the saved model asks for (zstudio.json "defaults")


# ----------------------------------------------------------------------------------------- pictures
def training_pictures(seed: int = 0, limit: int | None = None) -> tuple[list[Scene], list[PairScene]]:
    """The one-shape scenes and two-shape pictures (one telling of each) training may show."""
    singles, _ = split_scenes(seed)
    pairs, _ = split_pair_scenes(seed)
    pairs = [p for p in pairs if p.relation in ("left", "above")]  # each picture once; captions add the mirror
    if limit is not None:
        rng = random.Random(seed)
        singles, pairs = rng.sample(singles, min(limit, len(singles))), rng.sample(pairs, min(limit, len(pairs)))
    return singles, pairs


def _render_chunk(scenes: list) -> np.ndarray:
    return np.stack([np.asarray(render(s, SIDE)) for s in scenes])


def images_tensor(scenes: list, workers: int = 1) -> torch.Tensor:
    """Scenes as a uint8 batch (N, 3, side, side); rendering is spread over `workers` processes."""
    if workers > 1 and len(scenes) > 256:
        chunks = [scenes[i : i + 256] for i in range(0, len(scenes), 256)]
        with ProcessPoolExecutor(workers) as pool:
            array = np.concatenate(list(pool.map(_render_chunk, chunks)))
    else:
        array = _render_chunk(scenes)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pictures to floats in [-1, 1], the range the pipeline's image processor decodes from."""
    return images.float() / 127.5 - 1


def caption_texts(singles: list[Scene], pairs: list[PairScene], seed: int) -> list[list[str]]:
    """Each picture's captions: every phrasing of a one-shape scene; some of both tellings of a two-shape one."""
    rng = random.Random(seed)
    texts = [s.captions_en() + s.captions_zh() for s in singles]
    for p in pairs:
        half = CAPTIONS_PER_PAIR // 2
        english = p.captions_en() + p.mirrored().captions_en()
        chinese = p.captions_zh() + p.mirrored().captions_zh()
        texts.append(rng.sample(english, half) + rng.sample(chinese, half))
    return texts


# ----------------------------------------------------------------------------------------------- VAE
class Progress:
    """Where a stage is, 0 → 1, by steps or by time, whichever runs out first; and its learning-rate factor."""

    def __init__(self, steps: int, seconds: float | None, warmup: int):
        self.steps, self.seconds, self.warmup = steps, seconds, warmup
        self.start = time.perf_counter()

    def fraction(self, step: int) -> float:
        by_steps = step / self.steps
        if self.seconds is None:
            return by_steps
        return max(by_steps, (time.perf_counter() - self.start) / self.seconds)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then a cosine down to a tenth."""
        warm = min(1.0, (step + 1) / self.warmup)
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(self.fraction(step), 1.0))))


def train_vae(
    vae, images: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 5e-4, seconds: float | None = None
) -> dict:
    """Reconstruction (L1 + MSE, the shapes weighted up) of the posterior mean with a small KL term; then the latent
    shift and scale, measured."""
    gen = torch.Generator().manual_seed(seed)  # draws stay on the CPU: the same batches on every device
    device = vae.device
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    progress = Progress(steps, seconds, warmup=50)
    vae.train()
    step = 0
    loss = torch.zeros(())
    while step < steps and progress.fraction(step) < 1:
        for group in opt.param_groups:
            group["lr"] = lr * progress.lr_factor(step)
        x = to_unit(images[torch.randint(len(images), (batch,), generator=gen).to(images.device)].to(device))
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.mean).sample  # the mean: sampling at the initial σ ≈ 1 blurs colours away
        loss = reconstruction_loss(recon.float(), x) + 1e-6 * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0:
            log.info("vae step %d loss %.4f", step, loss.item())
        step += 1
    log.info("vae stopped after %d steps (%.0f s), loss %.4f", step, time.perf_counter() - progress.start, loss.item())
    vae.eval()
    means = latent_means(vae, images)
    shift, scale = float(means.mean()), float(1 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"shift_factor": shift, "scaling_factor": scale, "vae_final_loss": loss.item(), "vae_steps_run": step}


def autocast(device: torch.device):
    """bf16 autocast on a GPU; plain float32 elsewhere (reproducible on the CPU)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def latent_means(vae, images: torch.Tensor) -> torch.Tensor:
    """The encoder's posterior means (float32), in chunks that keep memory small."""
    with torch.no_grad():
        return torch.cat([vae.encode(to_unit(chunk.to(vae.device))).latent_dist.mean for chunk in images.split(256)])


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE, the shapes' pixels weighted up: they cover 7-25% of a picture and the background would dominate."""
    weight = 1 + 4 * ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1).float()
    error = recon - x
    return (weight * (error.abs() + error**2)).mean()


def scaled_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """What the transformer must produce: the inverse of the pipeline's `latents / scale + shift` before decode."""
    means = latent_means(vae, images)
    return (means - vae.config.shift_factor) * vae.config.scaling_factor


def reconstruction_accuracy(pipe, latents: torch.Tensor, scenes: list) -> dict[str, float]:
    """How often the evaluator reads the right factors off decoded training latents: the VAE's ceiling."""
    from .evaluator import judge_scene

    vae = pipe.vae
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    judged = [judge_scene(image, s) for image, s in zip(pipe.image_processor.postprocess(pixels.float()), scenes)]
    keys = sorted({k for j in judged for k in j})
    return {k: sum(j[k] for j in judged if k in j) / max(1, sum(k in j for j in judged)) for k in keys}


# -------------------------------------------------------------------------------------------- captions
def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption's features through the pipeline's own prompt encoder (chat template, hidden_states[-2]):
    (N, longest padded length, hidden) zero-padded, and each caption's length."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(captions), 512):
            chunk = captions[start : start + 512]
            embeds = pipe._encode_prompt(list(chunk), device=pipe.text_encoder.device, max_sequence_length=128)
            if any(len(e) >= 128 for e in embeds):
                raise ValueError("a caption reached 128 tokens; raise max_sequence_length")
            out.extend(e.float() for e in embeds)
    lengths = torch.tensor([len(e) for e in out])
    width = int(padded(lengths).max())
    features = torch.zeros(len(out), width, out[0].shape[1], device=out[0].device)
    for i, e in enumerate(out):
        features[i, : len(e)] = e
    return features, lengths


def padded(lengths: torch.Tensor) -> torch.Tensor:
    return (lengths + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE


# ------------------------------------------------------------------------------------------ transformer
@dataclass(frozen=True)
class Tokens:
    """A batch's token layout as diffusers' Z-Image builds it per picture: patch size 2, the image tokens' rotary
    positions after the caption's, every caption padded to one length; and the time embedding."""

    b: int
    ht: int
    wt: int
    length: int
    adaln: torch.Tensor
    image_freqs: torch.Tensor
    caption_freqs: torch.Tensor

    @property
    def n(self) -> int:
        return self.ht * self.wt

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """ "c f pf h ph w pw -> (f h w) (pf ph pw c)", per picture, as diffusers' _patchify_image."""
        k = x.shape[1]
        return (
            x.view(self.b, k, 1, 1, self.ht, 2, self.wt, 2)
            .permute(0, 2, 4, 6, 3, 5, 7, 1)
            .reshape(self.b, self.n, 4 * k)
        )


def tokens(transformer, latents: torch.Tensor, t: torch.Tensor, length: int) -> Tokens:
    b, _, h, w = latents.shape
    ht, wt = h // 2, w // 2
    n = ht * wt
    if n % SEQ_MULTIPLE or length % SEQ_MULTIPLE:
        raise ValueError(f"{n} image tokens and {length} caption tokens must be multiples of {SEQ_MULTIPLE}")
    device = latents.device
    grid = torch.stack(torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij"), -1).reshape(n, 2)
    image_ids = torch.cat([torch.full((n, 1), length + 1), grid], 1).to(device, torch.int32)
    caption_ids = torch.stack([torch.arange(1, length + 1), torch.zeros(length), torch.zeros(length)], 1)
    return Tokens(
        b,
        ht,
        wt,
        length,
        adaln=transformer.t_embedder(t * transformer.t_scale).type_as(latents),
        image_freqs=transformer.rope_embedder(image_ids).unsqueeze(0).expand(b, -1, -1),
        caption_freqs=transformer.rope_embedder(caption_ids.to(device, torch.int32)).unsqueeze(0).expand(b, -1, -1),
    )


def caption_states(transformer, captions: torch.Tensor, lengths: torch.Tensor, layout: Tokens) -> torch.Tensor:
    """The captions embedded, their padding set to the pad token, through the context refiner."""
    cap = transformer.cap_embedder(captions)
    pad = torch.arange(layout.length, device=cap.device)[None, :, None] >= lengths.to(cap.device)[:, None, None]
    cap = torch.where(pad, transformer.cap_pad_token.to(cap.dtype), cap)
    for layer in transformer.context_refiner:
        cap = layer(cap, None, layout.caption_freqs)
    return cap


def batched_forward(
    transformer,
    latents: torch.Tensor,
    t: torch.Tensor,
    captions: torch.Tensor,
    lengths: torch.Tensor,
    hints: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`ZImageTransformer2DModel.forward` for a batch whose captions all pad to one length, without its per-sample
    Python loops (which cost more than the math on a GPU at this size). `latents` (B, 16, H, W); `captions`
    (B, L, hidden) with L that padded length and `lengths` the real ones; `hints` are a ControlNet's block samples,
    added after the layers they name (diffusers' `controlnet_block_samples`). `tests/test_demo_train.py` holds it
    equal to the diffusers forward."""
    b, c, h, w = latents.shape
    layout = tokens(transformer, latents, t, captions.shape[1])
    x = transformer.all_x_embedder["2-1"](layout.patchify(latents))
    for layer in transformer.noise_refiner:
        x = layer(x, None, layout.image_freqs, layout.adaln)
    unified = torch.cat([x, caption_states(transformer, captions, lengths, layout)], 1)
    freqs = torch.cat([layout.image_freqs, layout.caption_freqs], 1)
    for index, layer in enumerate(transformer.layers):
        unified = layer(unified, None, freqs, layout.adaln)
        if hints is not None and index in hints:
            unified = unified + hints[index]
    out = transformer.all_final_layer["2-1"](unified, c=layout.adaln)[:, : layout.n]
    # "(f h w) (pf ph pw c) -> c (f pf) (h ph) (w pw)", as diffusers' unpatchify
    return out.view(b, layout.ht, layout.wt, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform in the scheduler's unshifted time, then shifted: the noise levels inference visits most."""
    u = torch.rand(n, generator=gen)
    return SHIFT * u / (1 + (SHIFT - 1) * u)


class Batches:
    """Seeded batches of (picture, caption) drawn so that every batch's captions pad to one length."""

    def __init__(self, owner: torch.Tensor, lengths: torch.Tensor, is_pair: torch.Tensor, seed: int):
        self.owner = owner  # caption → picture
        self.gen = torch.Generator().manual_seed(seed)
        pair_captions = int(is_pair[owner].sum())
        single_captions = len(owner) - pair_captions
        weight = torch.where(
            is_pair[owner], PAIR_SHARE / max(pair_captions, 1), (1 - PAIR_SHARE) / max(single_captions, 1)
        )
        size = padded(lengths)
        self.buckets = [(int(s), (size == s).nonzero().squeeze(1), weight[size == s]) for s in size.unique()]
        self.bucket_weight = torch.tensor([float(w.sum()) for _, _, w in self.buckets])

    def draw(self, batch: int) -> tuple[int, torch.Tensor]:
        """(padded caption length, caption indices)."""
        k = int(torch.multinomial(self.bucket_weight, 1, generator=self.gen))
        length, members, weight = self.buckets[k]
        return length, members[torch.multinomial(weight, batch, replacement=True, generator=self.gen)]


def train_transformer(
    transformer,
    latents: torch.Tensor,
    captions: tuple[torch.Tensor, torch.Tensor],
    owner: torch.Tensor,
    is_pair: torch.Tensor,
    empty: tuple[torch.Tensor, int],
    steps: int,
    batch: int,
    seed: int,
    lr: float = 8e-4,
    ema_decay: float = 0.999,
    compile_blocks: bool = False,
    seconds: float | None = None,
    warmup: int = 200,
):
    """Flow matching: at noise level σ the model sees x_σ and time 1 − σ and must output x₀ − ε.

    Returns the moving average of the weights and a record of the run. `compile_blocks` compiles each transformer
    block (every batch pads its captions to one length, so shapes repeat)."""
    features, lengths = captions
    device = latents.device
    gen = torch.Generator().manual_seed(seed)  # small draws on the CPU
    noise_gen = torch.Generator(device).manual_seed(seed)  # the noise where it is used: a GPU step is milliseconds
    batches = Batches(owner, lengths, is_pair, seed)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    if compile_blocks:
        # Dynamic lengths: one graph serves both caption buckets. Should compiling fail (no C++ compiler, a Triton
        # problem on some GPU), dynamo runs the block eagerly instead of ending a budgeted run.
        if hasattr(torch._dynamo.config, "suppress_errors"):
            torch._dynamo.config.suppress_errors = True
        for block in (*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers):
            block.compile(dynamic=True)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98), **fused)
    progress = Progress(steps, seconds, warmup=warmup)
    transformer.train()
    params, averages = list(transformer.parameters()), list(ema.parameters())
    step, losses = 0, []
    while step < steps and progress.fraction(step) < 1:
        for group in opt.param_groups:
            group["lr"] = lr * progress.lr_factor(step)
        length, idx = batches.draw(batch)
        x0 = latents[owner[idx].to(device)]
        cap = features[idx.to(device), :length]
        cap_lengths = lengths[idx]
        if length == padded(torch.tensor(empty[1])):
            drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
            cap = torch.where(drop.to(device)[:, None, None], empty[0][:length], cap)
            cap_lengths = torch.where(drop, empty[1], cap_lengths)
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        sigma = sample_sigmas(batch, gen).to(device)
        with autocast(device):
            out = batched_forward(transformer, noisy_latents(x0, noise, sigma), model_time(sigma), cap, cap_lengths)
        loss = F.mse_loss(out.float(), velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(averages, params, 1 - decay)
        if step % 250 == 0:
            losses.append(round(loss.item(), 4))
            log.info("transformer step %d loss %.4f (%.0f s)", step, losses[-1], time.perf_counter() - progress.start)
        step += 1
    seconds_run = time.perf_counter() - progress.start
    log.info("transformer stopped after %d steps in %.0f s, loss %.4f", step, seconds_run, loss.item())
    return ema, {
        "steps_run": step,
        "seconds": round(seconds_run, 1),
        "final_loss": round(loss.item(), 4),
        "losses_every_250": losses,
    }


# ---------------------------------------------------------------------------------------------- the run
def train(
    out: str | os.PathLike,
    seed: int = 0,
    candidates: tuple[str, ...] = ("s",),
    vae_steps: int = 3000,
    vae_batch: int = 32,
    steps: int = STEPS,
    batch: int = 64,
    overwrite: bool = False,
    device: str = "cpu",
    sizes: dict[str, Sizes] | None = None,
    compile_blocks: bool = True,
    time_budget: float | None = None,
    vae_share: float = 0.2,
    pictures: int | None = None,
    workers: int = 1,
    lr: float = 8e-4,
    warmup: int = 200,
    init: str | os.PathLike | None = None,
) -> list[Path]:
    """Train and write each candidate's checkpoint to `out`/<name> (built aside, renamed into place).

    `time_budget` (seconds, for the whole run) gives the VAE `vae_share` of what is left after the data is ready, and
    the candidates equal shares of the rest, keeping back time to save. `pictures` caps each kind of training
    picture (for quick tries); `sizes` maps candidate names to sizes (default `CANDIDATES`). `init` continues from a
    checkpoint this function wrote (a second phase, for runs longer than one sitting): its VAE, text encoder and
    transformer weights are loaded, the VAE is not trained again, and `candidates` must name its one candidate."""
    from diffusers import ZImagePipeline

    sizes = sizes or CANDIDATES
    target = Path(out)
    folders = [target / name for name in candidates]
    busy = [f for f in folders if f.exists() and any(f.iterdir())]
    if busy and not overwrite:
        raise FileExistsError(f"{busy[0]} exists and is not empty; pass overwrite=True or pick another folder")
    started = time.perf_counter()
    dev = torch.device(device)
    deadline = started + time_budget if time_budget else None

    singles, pairs = training_pictures(seed, pictures)
    scenes: list = [*singles, *pairs]
    images = images_tensor(scenes, workers).to(dev)  # uint8: 0.8 GB for all of them
    is_pair = torch.tensor([isinstance(s, PairScene) for s in scenes])
    log.info(
        "%d one-shape and %d two-shape training pictures rendered in %.0f s",
        len(singles),
        len(pairs),
        time.perf_counter() - started,
    )

    torch.manual_seed(seed)
    previous: dict | None = None
    if init is None:
        shared = build_components(seed, sizes[candidates[0]])  # the VAE, text encoder, tokenizer candidates share
        pipe = ZImagePipeline(**shared).to(dev)
        vae_seconds = None if deadline is None else vae_share * (deadline - time.perf_counter())
        vae_stats = train_vae(pipe.vae, images, vae_steps, vae_batch, seed, seconds=vae_seconds)
    else:
        pipe, previous = load_phase(Path(init), candidates, seed)
        pipe.to(dev)
        vae_stats = {k: v for k, v in previous["training"].items() if k.startswith("vae_") or k.endswith("_factor")}
    latents = scaled_latents(pipe.vae, images)
    check = random.Random(seed).sample(range(len(scenes)), min(200, len(scenes)))
    vae_stats["reconstruction"] = reconstruction_accuracy(pipe, latents[check], [scenes[i] for i in check])
    log.info("vae reconstructions judged right: %s", vae_stats["reconstruction"])

    texts = caption_texts(singles, pairs, seed)
    flat = [t for group in texts for t in group]
    owner = torch.tensor([i for i, group in enumerate(texts) for _ in group])
    features, lengths = encode_captions(pipe, [*flat, ""])
    empty = (features[-1], int(lengths[-1]))
    captions = (features[:-1], lengths[:-1])
    log.info("%d captions encoded; padded lengths %s", len(flat), sorted(set(padded(lengths).tolist())))

    written = []
    for k, (name, folder) in enumerate(zip(candidates, folders)):
        candidate_start = time.perf_counter()
        seconds = None
        if deadline is not None:  # an equal share of what is left, less time to save
            reserve = min(5.0, 0.1 * time_budget)  # saving a candidate takes ~1 s
            seconds = (deadline - candidate_start - reserve * (len(candidates) - k)) / (len(candidates) - k)
            if seconds < 1:
                raise RuntimeError(f"no time left for candidate {name}; raise --time-budget")
        torch.manual_seed(seed + 10 + k)
        transformer = (pipe.transformer if previous else build_transformer(sizes[name])).to(dev)
        log.info(
            "candidate %s: %.1fM transformer parameters, %s s",
            name,
            sum(p.numel() for p in transformer.parameters()) / 1e6,
            f"{seconds:.0f}" if seconds else "no limit",
        )
        ema, record = train_transformer(
            transformer,
            latents,
            captions,
            owner,
            is_pair,
            empty,
            steps,
            batch,
            seed,
            compile_blocks=compile_blocks,
            seconds=seconds,
            lr=lr,
            warmup=warmup,
        )
        info = {
            "name": f"zstudio-demo-{name}",
            "profile": "demo",
            "version": VERSION,
            "sizes": [[SIDE, SIDE]],
            "defaults": DEFAULTS,
            "seed": seed,
            "held_out_triples": sorted(held_out_triples(seed)),
            "training": {
                "candidate": name,
                "sizes": {k: v for k, v in vars(sizes[name]).items()},
                "pictures": {"one_shape": len(singles), "two_shape": len(pairs), "captions": len(flat)},
                "vae_steps": vae_steps,
                "vae_batch": vae_batch,
                "steps": steps,
                "batch": batch,
                "lr": lr,
                "warmup": warmup,
                "time_budget": time_budget,
                "compiled_blocks": compile_blocks,
                "seconds_to_here": round(time.perf_counter() - started, 1),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else device,
                "threads": torch.get_num_threads(),
                **record,
                **vae_stats,
                **({"init": str(init), "previous_phase": previous["training"]} if previous else {}),
            },
        }
        written.append(save(pipe, ema, folder, info))
    log.info("wrote %s in %.0f s", ", ".join(str(f) for f in written), time.perf_counter() - started)
    return written


def load_phase(folder: Path, candidates: tuple[str, ...], seed: int):
    """A checkpoint `train` wrote, in float32, to go on training: (pipeline, its zstudio.json)."""
    from diffusers import ZImagePipeline

    from ..models import quiet_loading

    info = json.loads((folder / "zstudio.json").read_text())
    name = info["training"]["candidate"]
    if tuple(candidates) != (name,):
        raise ValueError(f"--init {folder} holds candidate {name}; pass --candidates {name}")
    if info.get("seed") != seed:
        raise ValueError(f"--init {folder} was trained with --seed {info.get('seed')}; pass the same seed")
    with quiet_loading():
        pipe = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    return pipe, info


def save(pipe, transformer, folder: Path, info: dict) -> Path:
    """The pipeline with this transformer (in bf16: the checkpoint must stay under 20 MB), atomically."""
    from diffusers import ZImagePipeline

    from ..models import quiet_loading

    transformer = transformer.to("cpu", torch.bfloat16)
    parts = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "scheduler")}
    out = ZImagePipeline(transformer=transformer, **parts)
    devices = pipe.vae.device, pipe.text_encoder.device

    def write(staging: Path) -> None:
        out.vae.to("cpu")
        out.text_encoder.to("cpu")
        with quiet_loading():
            out.save_pretrained(staging, safe_serialization=True)
        out.vae.to(devices[0])
        out.text_encoder.to(devices[1])

    return publish(folder, write, info)


def publish(folder: Path, write, info: dict) -> Path:
    """`write(staging)` fills a folder built beside `folder`, with `info` as its zstudio.json; then it replaces
    `folder` in one rename, so a reader never sees half a checkpoint."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(staging)
        (staging / "zstudio.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zstudio.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for one checkpoint folder per candidate, and train.log")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default="s", help=f"comma list of {', '.join(CANDIDATES)}")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=STEPS, help="transformer steps per candidate, at most")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=8e-4, help="the transformer's peak learning rate")
    parser.add_argument("--warmup", type=int, default=200, help="the transformer's warm-up steps")
    parser.add_argument("--time-budget", type=float, help="seconds for the whole run; every stage stops on time")
    parser.add_argument("--vae-share", type=float, default=0.2, help="of the budget left once the data is ready")
    parser.add_argument("--pictures", type=int, help="at most this many pictures of each kind (quick tries)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that render pictures")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: bf16 autocast, compiled blocks")
    parser.add_argument("--no-compile", action="store_true", help="run the transformer blocks eagerly")
    parser.add_argument("--init", help="a checkpoint folder this trainer wrote: go on training its transformer")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(Path(args.out) / "train.log")],
    )
    logging.getLogger("torch").setLevel(logging.WARNING)
    train(
        args.out,
        args.seed,
        tuple(args.candidates.split(",")),
        args.vae_steps,
        args.vae_batch,
        args.steps,
        args.batch,
        args.overwrite,
        args.device,
        compile_blocks=not args.no_compile,
        time_budget=args.time_budget,
        vae_share=args.vae_share,
        pictures=args.pictures,
        workers=args.workers,
        lr=args.lr,
        warmup=args.warmup,
        init=args.init,
    )


if __name__ == "__main__":
    main()
