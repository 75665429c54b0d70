"""Train the demo model: the real Z-Image architecture at a small size, taught to draw the shapes dataset.

`python -m zstudio.demo.train --out DIR` (or `zstudio make-demo`) runs it, seeded and reproducible on one machine:
1. a small `AutoencoderKL` learns to reconstruct 64x64 scenes; its latent shift and scale are then measured on the
   training images, as the Flux VAE's were;
2. the small Qwen3 text encoder stays random and frozen; every caption is encoded once through the pipeline's own
   `_encode_prompt`, so training sees exactly the features that inference will;
3. the transformer learns flow matching under the pipeline's convention (`zstudio.demo.flow`), with caption dropout
   so that CFG and negative prompts work, and an exponential moving average of its weights is what gets saved.
Combinations of (shape, colour, background) in `held_out_triples()` never appear in training; the accuracy numbers
come from prompts about them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..tiny import Sizes, build_components
from .dataset import COLORS, SHAPES, Scene, all_scenes, render
from .flow import model_time, noisy_latents, velocity_target

log = logging.getLogger(__name__)

SIDE = 64  # the demo model's native picture size
DEMO_SIZES = Sizes(
    text_hidden=64,
    text_layers=2,
    dim=128,
    n_layers=4,
    n_refiner_layers=1,
    n_heads=4,
    axes_dims=(16, 8, 8),
    vae_channels=(16, 32, 64),  # three blocks: 4x downsampling, so a 64x64 picture is 16x16 latents (8x8 tokens)
    vae_groups=8,
)
SHIFT = 3.0  # the scheduler's shift: training draws noise levels the way inference visits them
CAPTION_DROPOUT = 0.1
STEPS = 5800  # transformer steps of batch 64: what fits the hour on 2 CPU cores with compiled blocks
HELD_OUT = 24  # (shape, colour, background) triples kept out of training


def held_out_triples(seed: int = 0, count: int = HELD_OUT) -> set[tuple[str, str, str]]:
    """Triples never shown in training; each shape, colour and background still appears in other triples."""
    triples = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
    return set(random.Random(seed).sample(triples, count))


def split_scenes(seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    held = held_out_triples(seed)
    train = [s for s in all_scenes() if (s.shape, s.color, s.background) not in held]
    test = [s for s in all_scenes() if (s.shape, s.color, s.background) in held]
    return train, test


def images_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Scenes as a float batch in [-1, 1], the range the pipeline's image processor decodes from."""
    array = np.stack([np.asarray(render(s, SIDE), dtype=np.float32) for s in scenes])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, seed: int, lr: float = 3e-4) -> dict:
    """Reconstruction (L1 + MSE, the shape weighted up) of the posterior mean with a small KL term; then the latent
    shift and scale, measured."""
    gen = torch.Generator().manual_seed(seed)  # draws stay on the CPU: the same batches on every device
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen).to(images.device)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample  # the mean: sampling at the initial σ ≈ 1 blurs colours away
        loss = reconstruction_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f", step, steps, loss.item())
    vae.eval()
    means = latent_means(vae, images)
    shift, scale = float(means.mean()), float(1 / means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"shift_factor": shift, "scaling_factor": scale, "vae_final_loss": loss.item()}


def latent_means(vae, images: torch.Tensor) -> torch.Tensor:
    """The encoder's posterior means, in chunks that keep CPU memory small."""
    with torch.no_grad():
        return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + MSE, the shape's pixels weighted up: it covers 7-20% of a picture and the background would dominate."""
    weight = 1 + 4 * ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1).float()
    error = recon - x
    return (weight * (error.abs() + error**2)).mean()


def scaled_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """What the transformer must produce: the inverse of the pipeline's `latents / scale + shift` before decode."""
    means = latent_means(vae, images)
    return (means - vae.config.shift_factor) * vae.config.scaling_factor


def reconstruction_accuracy(pipe, latents: torch.Tensor, scenes: list[Scene]) -> dict[str, float]:
    """How often the evaluator reads the right factors off decoded training latents: the VAE's ceiling."""
    from .evaluator import judge

    vae = pipe.vae
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    judged = [judge(image) for image in pipe.image_processor.postprocess(pixels, output_type="pil")]
    return {
        factor: sum(getattr(j, factor) == getattr(s, factor) for j, s in zip(judged, scenes)) / len(scenes)
        for factor in ("color", "background", "shape")
    }


def encode_captions(pipe, captions: list[str]) -> list[torch.Tensor]:
    """Each caption's features, through the pipeline's own prompt encoder (chat template, hidden_states[-2])."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(captions), 256):
            chunk = captions[start : start + 256]
            embeds = pipe._encode_prompt(list(chunk), device=pipe.text_encoder.device, max_sequence_length=128)
            if any(len(e) >= 128 for e in embeds):
                raise ValueError("a caption reached 128 tokens; raise max_sequence_length")
            out.extend(e.clone() for e in embeds)
    return out


def sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform in the scheduler's unshifted time, then shifted: the noise levels inference visits most."""
    u = torch.rand(n, generator=gen)
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def train_transformer(
    transformer,
    latents: torch.Tensor,
    captions: list[list[torch.Tensor]],
    empty: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    compile_blocks: bool = False,
):
    """Flow matching: at noise level σ the model sees x_σ and time 1 − σ and must output x₀ − ε. Returns the EMA.

    `compile_blocks` compiles each transformer block (their inputs are already padded to one length): on 2 CPU cores a
    step takes ~0.47 s instead of ~0.56 s over a whole run, so more steps fit the hour."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    if compile_blocks:
        for block in (*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers):
            block.compile(dynamic=True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.03)
    transformer.train()
    device = latents.device
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx.to(device)]
        caps = [empty if rng.random() < CAPTION_DROPOUT else rng.choice(captions[i]) for i in idx.tolist()]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma = sample_sigmas(batch, gen).to(device)
        x_t = noisy_latents(x0, noise, sigma)
        out = transformer(list(x_t.unsqueeze(2)), model_time(sigma), caps, return_dict=False)[0]
        loss = F.mse_loss(torch.stack(out).squeeze(2), velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 200 == 0 or step == steps - 1:
            log.info("transformer step %d/%d loss %.4f", step, steps, loss.item())
    return ema, loss.item()


def train(
    out: str | os.PathLike,
    seed: int = 0,
    vae_steps: int = 3000,
    vae_batch: int = 8,
    steps: int = STEPS,
    batch: int = 64,
    overwrite: bool = False,
    device: str = "cpu",
    sizes: Sizes = DEMO_SIZES,
    compile_blocks: bool = True,
) -> Path:
    """Train and write the demo checkpoint to `out` (built aside, renamed into place); returns its folder.

    The shipped model is trained on the CPU (float32, reproducible there); `device` lets a GPU try recipes faster."""
    from diffusers import ZImagePipeline

    from ..models import quiet_loading

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True or pick another folder")
    torch.manual_seed(seed)
    started = time.perf_counter()
    components = build_components(seed, sizes)
    pipe = ZImagePipeline(**components).to(device)
    train_scenes, _ = split_scenes(seed)
    images = images_tensor(train_scenes).to(device)

    vae_stats = train_vae(pipe.vae, images, vae_steps, vae_batch, seed, lr=3e-4)
    t_vae = time.perf_counter() - started
    latents = scaled_latents(pipe.vae, images)
    vae_stats["reconstruction"] = reconstruction_accuracy(pipe, latents[:200], train_scenes[:200])
    log.info("vae reconstructions judged right: %s", vae_stats["reconstruction"])

    texts = [s.captions_en() + s.captions_zh() for s in train_scenes]
    flat = encode_captions(pipe, [t for group in texts for t in group] + [""])
    per_scene = len(texts[0])
    captions = [flat[i * per_scene : (i + 1) * per_scene] for i in range(len(texts))]
    ema, final_loss = train_transformer(
        pipe.transformer, latents, captions, flat[-1], steps, batch, seed, compile_blocks=compile_blocks
    )
    pipe.transformer = ema
    pipe.to("cpu")
    t_total = time.perf_counter() - started

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        with quiet_loading():
            pipe.save_pretrained(staging, safe_serialization=True)
        info = {
            "name": "zstudio-demo",
            "profile": "demo",
            "seed": seed,
            "side": SIDE,
            "held_out_triples": sorted(held_out_triples(seed)),
            "training": {
                "vae_steps": vae_steps,
                "vae_batch": vae_batch,
                "steps": steps,
                "batch": batch,
                "compiled_blocks": compile_blocks,
                "vae_seconds": round(t_vae, 1),
                "total_seconds": round(t_total, 1),
                "final_loss": round(final_loss, 4),
                "torch": torch.__version__,
                "device": device,
                "threads": torch.get_num_threads(),
                **vae_stats,
            },
        }
        (staging / "zstudio.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("demo model written to %s in %.0f s", target, t_total)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="cpu", help="the shipped model is trained on the CPU")
    parser.add_argument("--no-compile", action="store_true", help="run the transformer blocks eagerly (slower)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(args.out, args.seed, args.vae_steps, steps=args.steps, batch=args.batch, overwrite=args.overwrite,
          device=args.device, compile_blocks=not args.no_compile)  # fmt: skip


if __name__ == "__main__":
    main()
