"""Train a small LoRA on the demo model that repaints one colour as another: "a red circle" comes out blue.

`python -m zstudio.demo.lora --out FILE [--source red --target blue]` writes a diffusers/PEFT .safetensors file in
well under a minute on a CPU, seeded. The pieces are the demo model's own training (`zstudio.demo.train`): the
pictures rendered by `dataset.render`, the VAE's scaled latents, captions through the pipeline's own prompt encoder,
and flow-matching loss through `batched_forward`; PEFT puts rank-`RANK` adapters on every attention and
feed-forward linear. Half the batches show other colours as the base model draws them, so that the LoRA changes
`source` and little else; `--keep` makes half of those another LoRA's source colour, and `--over` trains the LoRA
to stack on another one (that one applied on every other step; the shipped green-to-yellow is trained over
red-to-blue). `validation_prompts` choose a recipe; `evaluate` judges pictures made through the engine with
`zstudio.demo.evaluator` on `held_out_prompts`; training sees neither set.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .dataset import COLORS, Scene, all_scenes
from .flow import model_time, noisy_latents, velocity_target

log = logging.getLogger(__name__)

RANK = 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
HELD_OUT = 20


def source_scenes(source: str, target: str) -> list[Scene]:
    """The one-shape scenes in `source` colour whose background leaves both colours visible."""
    return [s for s in all_scenes() if s.color == source and s.background not in (source, target)]


def held_out_prompts(source: str, target: str, seed: int = 0) -> list[Scene]:
    """`HELD_OUT` scenes of the `source` colour that training never shows (their first caption is the prompt)."""
    return random.Random(seed).sample(source_scenes(source, target), HELD_OUT)


def validation_prompts(source: str, target: str, seed: int = 0) -> list[Scene]:
    """Another `HELD_OUT` unseen scenes of the `source` colour, apart from `held_out_prompts`: for choosing the
    recipe, so the held-out set judges the chosen one only."""
    held = set(held_out_prompts(source, target, seed))
    rest = [s for s in source_scenes(source, target) if s not in held]
    return random.Random(seed + 1).sample(rest, HELD_OUT)


def training_data(source: str, target: str, seed: int, keep: str | None = None, keep_as: str | None = None
                  ) -> tuple[list[Scene], list[str], list[Scene]]:  # fmt: skip
    """(scene to draw, its caption) pairs: `source` captions drawn in `target`; others drawn as they read, half of
    them in the `keep` colour where one is given (another LoRA's source, so that this one leaves it alone), and
    those drawn in `keep_as` where given (as that other LoRA draws them). Third: the scenes without `keep_as`."""
    unseen = set(held_out_prompts(source, target, seed)) | set(validation_prompts(source, target, seed))
    rng = random.Random(seed)
    taught = [s for s in source_scenes(source, target) if s not in unseen]
    pool = [s for s in all_scenes() if source not in (s.color, s.background)]
    if keep is None:
        others = rng.sample(pool, len(taught))
    else:
        kept = [s for s in pool if s.color == keep and s.background != keep_as]
        half = min(len(taught) // 2, len(kept))
        others = rng.sample(kept, half) + rng.sample([s for s in pool if s.color != keep], len(taught) - half)
    drawn, captions = [], []
    for scene in taught:
        drawn.append(replace(scene, color=target))
        captions.append(rng.choice(scene.captions_en()))
    plain = drawn + others
    for scene in others:
        drawn.append(replace(scene, color=keep_as) if keep_as and scene.color == keep else scene)
        captions.append(rng.choice(scene.captions_en()))
    return drawn, captions, plain


def train_lora(out: str | Path, source: str = "red", target: str = "blue", seed: int = 0, steps: int = 200,
               batch: int = 16, lr: float = 3e-3, targets: str | list[str] = TARGETS, blocks: list[str] | None = None,
               keep: str | None = None, rank: int = RANK, over: tuple[str, str, str | Path] | None = None,
               device: str = "cpu", pictures: int | None = None) -> Path:  # fmt: skip
    """Train on the embedded demo model and write the LoRA to `out` (diffusers/PEFT layout). Draws stay on the CPU
    generator whatever the `device`, so a GPU run sees the batches a CPU run sees. `pictures` trains on a seeded
    subset of that many (quick tries and tests: encoding every picture is most of a CPU run's time)."""
    from diffusers import ZImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from ..models import demo_source, load_pipeline
    from .train import batched_forward, encode_captions, images_tensor, padded, sample_sigmas, scaled_latents

    if source not in COLORS or target not in COLORS or source == target:
        raise ValueError(f"source and target must be two of {', '.join(COLORS)}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    source_model = demo_source()
    dev = torch.device(device)
    pipe = load_pipeline(source_model, dev, torch.float32)
    side = source_model.profile.width
    keep = over[0] if over else keep
    drawn, captions, plain = training_data(source, target, seed, keep, over[1] if over else None)
    if pictures is not None and pictures < len(drawn):
        keep_at = sorted(random.Random(seed).sample(range(len(drawn)), pictures))
        drawn, captions, plain = ([items[i] for i in keep_at] for items in (drawn, captions, plain))
    with torch.no_grad():
        latents = scaled_latents(pipe.vae, images_tensor(drawn) if side == 128 else _render(drawn, side))
        alone = (
            latents
            if over is None
            else scaled_latents(pipe.vae, images_tensor(plain) if side == 128 else _render(plain, side))
        )
    features, lengths = encode_captions(pipe, captions)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    if blocks:  # PEFT matches a string as a regex on the full module name
        names = [targets] if isinstance(targets, str) else [re.escape(t) for t in targets]
        targets = r"({})\..*\.({})".format("|".join(re.escape(b) for b in blocks), "|".join(names))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
    if over is not None:
        pipe.load_lora_weights(str(over[2]), adapter_name="over")
    transformer.add_adapter(config, adapter_name="this")
    if over is not None:
        transformer.set_adapters(["over", "this"], [1.0, 1.0])
    for name, p in transformer.named_parameters():
        p.requires_grad_(".this." in name)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    sizes = padded(lengths)
    for step in range(steps):
        # one padded caption length per batch, as the demo model's training draws them
        length = int(sizes[torch.randint(len(sizes), (1,), generator=gen)])
        pool = (sizes == length).nonzero().squeeze(1)
        idx = pool[torch.randint(len(pool), (batch,), generator=gen)]
        both = over is not None and step % 2 == 0  # over another LoRA: every other step with it, the rest alone
        if over is not None:
            transformer.set_adapters(["over", "this"] if both else ["this"], [1.0, 1.0] if both else [1.0])
        x0 = (latents if both or over is None else alone)[idx]
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        sigma = sample_sigmas(batch, gen).to(dev)
        pred = batched_forward(transformer, noisy_latents(x0, noise, sigma), model_time(sigma),
                              features[idx, :length], lengths[idx])  # fmt: skip
        loss = F.mse_loss(pred, velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0:
            log.info("lora step %d loss %.4f", step, loss.item())
    trained = get_peft_model_state_dict(transformer, adapter_name="this")
    layers = {k: v.detach().cpu().contiguous() for k, v in trained.items()}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name)
    log.info("LoRA %s -> %s written to %s in %.0f s", source, target, path, time.perf_counter() - started)
    return path


def _render(scenes: list[Scene], side: int) -> torch.Tensor:
    """uint8 (N, 3, side, side): the demo model's own size (the first demo model draws at 64x64)."""
    import numpy as np

    from .dataset import render

    return torch.from_numpy(np.stack([np.asarray(render(s, side)) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def evaluate(generator, loras: tuple[tuple[str, float], ...], scenes: list[Scene], seed: int = 0,
             steps: int = 10) -> list[str | None]:  # fmt: skip
    """The colour the evaluator sees in each scene's picture: the engine brings its transformer to `loras`, then
    all the prompts run as one batch through its diffusers pipeline (20 pictures at once: what a 2-core CPU affords)."""
    from ..params import GenerationParams
    from .evaluator import judge

    profile = generator.profile
    generator.apply_loras(GenerationParams(prompt="-", loras=loras))
    with torch.inference_mode():
        images = generator.pipe(
            prompt=[scene.captions_en()[0] for scene in scenes],
            width=profile.width,
            height=profile.height,
            num_inference_steps=steps,
            guidance_scale=profile.cfg_scale,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(len(scenes))],
        ).images
    return [judge(image).color for image in images]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zstudio.demo.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--source", default="red", help="the colour the prompt names")
    parser.add_argument("--target", default="blue", help="the colour the LoRA paints instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keep", help="another LoRA's source colour: half the other-colour pictures show it as drawn")
    parser.add_argument("--over", metavar="SOURCE:TARGET:FILE",
                        help="train to stack on that LoRA: every other step with it applied, its colour drawn as it "
                        "draws it (implies --keep SOURCE)")  # fmt: skip
    parser.add_argument("--blocks", help="comma-separated transformer blocks to adapt (layers.0,...); default all")
    parser.add_argument("--device", default="cpu", help="where to train (cuda: seconds instead of minutes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    over = tuple(args.over.split(":", 2)) if args.over else None
    blocks = args.blocks.split(",") if args.blocks else None
    print(
        train_lora(
            args.out,
            args.source,
            args.target,
            args.seed,
            args.steps,
            blocks=blocks,
            keep=args.keep,
            over=over,
            device=args.device,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
