"""Train a small ControlNet on the demo model: given the Canny edges of a shape, it draws the shape where they are.

`python -m zstudio.demo.control --out FOLDER` writes a diffusers `ZImageControlNetModel` folder (config.json and
safetensors in bf16, plus a `zstudio.json` record of the run) that the engine loads with `--controlnet FOLDER`.
The prompts name no position or size, so without control the demo model draws the shape large and centred
(`Scene.default_placement`); the ControlNet must move it to the edges' place. The pieces:
- the Union 2.x layout the engine expects (`zstudio.tiny.build_controlnet`: a control noise refiner and a 33-channel
  control input), sized from the demo transformer's config, with control blocks on `CONTROL_LAYERS`; each control
  block starts as a copy of the transformer block it sits beside and its hint projection (`after_proj`) starts at
  zero, so the untrained ControlNet adds exactly nothing;
- the demo model's own training pieces (`zstudio.demo.train`): rendered scenes, the VAE's scaled latents, captions
  through the pipeline's prompt encoder, flow matching through `batched_forward`, with the transformer frozen;
- the control image is `zstudio.control.canny` of the rendered picture, VAE-encoded as `Generator.encode_control`
  does it (the distribution's mode, shift and scale, zeros up to `control_in_dim`), so training sees what inference
  will; one-shape scenes whose colours are too close in grey for Canny to find an edge are left out.
Held out: one scene for each of the 20 (shape, off-centre position) pairs (`held_out_scenes`), and another 20 for
choosing a recipe (`validation_scenes`); training never shows a scene with the same shape, colours and position as
either. `python -m zstudio.demo.control --evaluate FOLDER --split validation` judges pictures made through the
engine with `zstudio.demo.evaluator`, with the ControlNet and without it (the baseline), and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..control import canny
from ..params import DEFAULT_CONTROL_SCALE
from .dataset import POSITIONS, SHAPES, Scene, render, split_scenes
from .flow import model_time, noisy_latents, velocity_target
from .train import (
    Batches,
    Progress,
    autocast,
    batched_forward,
    caption_states,
    encode_captions,
    images_tensor,
    padded,
    publish,
    sample_sigmas,
    scaled_latents,
    tokens,
)

log = logging.getLogger(__name__)

CONTROL_LAYERS = (0, 2, 4)  # transformer layers that receive hints; 0 must be one (diffusers asserts it)
CONTROL_IN_DIM = 33  # Union 2.x: control latents (16), inpainting mask (1), masked-image latents (16)
MIN_EDGES = 20  # Canny pixels a scene's map needs: red on purple is 3 grey levels apart, and shows none
CAPTION_DROPOUT = 0.1
HELD_OUT = 20  # = len(SHAPES) x the four off-centre positions
SPLITS = ("validation", "held-out")


# ------------------------------------------------------------------------------------------- scenes
def control_image(scene: Scene):
    """The control image for a scene: the engine's Canny preprocessor on the rendered picture."""
    return canny(render(scene))


def default_captions(scene: Scene) -> list[str]:
    """Captions that name no position or size: the demo model draws them large and centred."""
    plain = Scene(scene.shape, scene.color, scene.background, "centre", "large")
    return plain.captions_en()[:2] + plain.captions_zh()[:2]


@functools.cache
def visible(color: str, background: str) -> bool:
    """Whether Canny finds a shape of `color` on `background` (tried on a large square: it is the grey-level contrast
    of the two colours that decides, not the shape)."""
    edges = np.asarray(control_image(Scene("square", color, background, "left", "large")))[..., 0]
    return int((edges > 0).sum()) >= MIN_EDGES


@functools.cache
def eligible_scenes(seed: int = 0) -> tuple[Scene, ...]:
    """The demo model's training scenes (none of its held-out triples) whose Canny map shows the shape."""
    return tuple(s for s in split_scenes(seed)[0] if visible(s.color, s.background))


def _key(scene: Scene) -> tuple[str, str, str, str]:
    return scene.shape, scene.color, scene.background, scene.position


def _one_per_pair(scenes: tuple[Scene, ...], rng: random.Random, taken: set) -> list[Scene]:
    """One scene for each (shape, off-centre position) pair, its colours, background and size drawn by `rng`."""
    chosen = []
    for shape in SHAPES:
        for position in POSITIONS:
            if position == "centre":
                continue
            pool = [s for s in scenes if s.shape == shape and s.position == position and _key(s) not in taken]
            chosen.append(rng.choice(pool))
            taken.add(_key(chosen[-1]))
    return chosen


def held_out_scenes(seed: int = 0) -> list[Scene]:
    """The test: `HELD_OUT` scenes, one per (shape, off-centre position); training never shows their key."""
    return _one_per_pair(eligible_scenes(seed), random.Random(seed), set())


def validation_scenes(seed: int = 0) -> list[Scene]:
    """Another `HELD_OUT`, apart from the test, for choosing a recipe (so the test judges the chosen one only)."""
    taken = {_key(s) for s in held_out_scenes(seed)}
    return _one_per_pair(eligible_scenes(seed), random.Random(seed + 1), taken)


def training_scenes(seed: int = 0) -> list[Scene]:
    """Eligible scenes at every position and size, less any with a held-out or validation scene's shape, colours
    and position (either size)."""
    unseen = {_key(s) for s in held_out_scenes(seed) + validation_scenes(seed)}
    return [s for s in eligible_scenes(seed) if _key(s) not in unseen]


def split_of(name: str, seed: int = 0) -> list[Scene]:
    if name not in SPLITS:
        raise ValueError(f"split {name!r} is not one of {', '.join(SPLITS)}")
    return validation_scenes(seed) if name == "validation" else held_out_scenes(seed)


# ---------------------------------------------------------------------------------------- the model
def build_controlnet(transformer):
    """A Union 2.x-layout `ZImageControlNetModel` for `transformer`, that starts as a no-op.

    Control blocks start as copies of the transformer blocks they sit beside (the control noise refiner of its noise
    refiner), the control patch embedder as its image patch embedder on the 16 control-latent channels; `after_proj`
    stays zero (diffusers' init) so the hints are zero, and `before_proj` gets a normal Linear init so that training
    moves from its first step (zero as well, no gradient would reach it until `after_proj` moved)."""
    from diffusers import ZImageControlNetModel

    cfg = transformer.config
    controlnet = ZImageControlNetModel(
        control_layers_places=list(CONTROL_LAYERS),
        control_refiner_layers_places=list(range(cfg.n_refiner_layers)),
        control_in_dim=CONTROL_IN_DIM,
        add_control_noise_refiner="control_noise_refiner",
        all_patch_size=tuple(cfg.all_patch_size),
        all_f_patch_size=tuple(cfg.all_f_patch_size),
        dim=cfg.dim,
        n_refiner_layers=cfg.n_refiner_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        norm_eps=cfg.norm_eps,
        qk_norm=cfg.qk_norm,
    )
    with torch.no_grad():
        for block, place in zip(controlnet.control_layers, CONTROL_LAYERS):
            block.load_state_dict(transformer.layers[place].state_dict(), strict=False)
        for block, source in zip(controlnet.control_noise_refiner, transformer.noise_refiner):
            block.load_state_dict(source.state_dict(), strict=False)
        for block in (*controlnet.control_layers, *controlnet.control_noise_refiner):
            if hasattr(block, "before_proj"):
                block.before_proj.reset_parameters()
        for key, embedder in controlnet.control_all_x_embedder.items():
            image = transformer.all_x_embedder[key]
            channels = transformer.config.in_channels
            weight = embedder.weight.view(embedder.out_features, -1, CONTROL_IN_DIM)
            weight.zero_()
            weight[:, :, :channels] = image.weight.view(image.out_features, -1, channels)
            embedder.bias.copy_(image.bias)
    return controlnet


def trainable(controlnet) -> dict[str, torch.nn.Parameter]:
    """The ControlNet's own weights: after `from_transformer` it also holds the transformer's shared modules."""
    return {k: p for k, p in controlnet.named_parameters() if k.startswith("control_")}


def batched_hints(controlnet, transformer, latents: torch.Tensor, t: torch.Tensor, captions: torch.Tensor,
                  lengths: torch.Tensor, context: torch.Tensor, scale: float) -> dict[int, torch.Tensor]:  # fmt: skip
    """`ZImageControlNetModel.forward` for a batch whose captions pad to one length, as `train.batched_forward`
    is the transformer's: `context` (B, control_in_dim, H, W). `tests/test_demo_control.py` holds the two equal."""
    layout = tokens(transformer, latents, t, captions.shape[1])
    image_freqs, adaln = layout.image_freqs, layout.adaln
    control = controlnet.control_all_x_embedder["2-1"](layout.patchify(context))
    x = transformer.all_x_embedder["2-1"](layout.patchify(latents))
    for layer in controlnet.control_noise_refiner:
        control = layer(control, x, None, image_freqs, adaln)
    *refiner_hints, control = torch.unbind(control)
    for index, layer in enumerate(transformer.noise_refiner):
        x = layer(x, None, image_freqs, adaln)
        if index in controlnet.control_refiner_layers_places:
            x = x + refiner_hints[controlnet.control_refiner_layers_places.index(index)] * scale
    cap = caption_states(transformer, captions, lengths, layout)
    unified = torch.cat([x, cap], 1)
    control = torch.cat([control, cap], 1)
    freqs = torch.cat([image_freqs, layout.caption_freqs], 1)
    for layer in controlnet.control_layers:
        control = layer(control, unified, None, freqs, adaln)
    hints = torch.unbind(control)[:-1]
    return {place: hints[i] * scale for i, place in enumerate(controlnet.control_layers_places)}


def control_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Control images (uint8, N x 3 x H x W) as `Generator.encode_control` gives them to the ControlNet: the
    latent distribution's mode (its mean), shifted and scaled, zero-padded to `CONTROL_IN_DIM` channels."""
    latents = scaled_latents(vae, images)
    return torch.cat([latents, latents.new_zeros(len(latents), CONTROL_IN_DIM - latents.shape[1], *latents.shape[2:])],
                     1)  # fmt: skip


# ------------------------------------------------------------------------------------------ training
def _uint8(images: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).contiguous()


def train_controlnet(
    out: str | os.PathLike,
    seed: int = 0,
    steps: int = 2000,
    batch: int = 32,
    lr: float = 3e-4,
    device: str = "cpu",
    time_budget: float | None = None,
    pictures: int | None = None,
    warmup: int = 50,
    overwrite: bool = False,
    check: int = HELD_OUT,
) -> Path:
    """Train on the embedded demo model (frozen) and write the ControlNet folder `out`. `time_budget` (seconds, for
    the whole run) stops training on time, keeping back time to save; `pictures` caps the training scenes (a seeded
    sample: for quick tries and CPU runs); `check` validation scenes measure the final flow loss with control and
    without."""
    from ..models import demo_source, load_pipeline

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite or pick another folder")
    started = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(seed)
    source = demo_source()
    pipe = load_pipeline(source, dev, torch.float32)
    scenes = training_scenes(seed)
    if pictures is not None:
        scenes = random.Random(seed).sample(scenes, min(pictures, len(scenes)))
    with torch.no_grad():
        images = images_tensor(scenes)
        latents = scaled_latents(pipe.vae, images.to(dev))
        maps = [np.asarray(canny(Image.fromarray(a))) for a in images.permute(0, 2, 3, 1).numpy()]  # = control_image
        # Canny maps are white outlines whatever the colours: many scenes share one; each distinct map is encoded once
        distinct: dict[bytes, int] = {}
        which = torch.tensor([distinct.setdefault(m.tobytes(), len(distinct)) for m in maps])
        firsts = [maps[int((which == i).nonzero()[0])] for i in range(len(distinct))]
        contexts = control_latents(pipe.vae, _uint8(firsts).to(dev))[which.to(dev)]
    texts = [default_captions(s) for s in scenes]
    flat = [t for group in texts for t in group]
    owner = torch.tensor([i for i, group in enumerate(texts) for _ in group])
    features, lengths = encode_captions(pipe, [*flat, ""])
    empty_features, empty_length = features[-1], int(lengths[-1])
    features, lengths = features[:-1], lengths[:-1]
    batches = Batches(owner, lengths, torch.zeros(len(scenes), dtype=torch.bool), seed)
    log.info("%d scenes (%d distinct Canny maps), %d captions ready in %.0f s", len(scenes), len(distinct), len(flat),
             time.perf_counter() - started)  # fmt: skip

    from diffusers import ZImageControlNetModel

    transformer = pipe.transformer.requires_grad_(False).eval()
    controlnet = ZImageControlNetModel.from_transformer(build_controlnet(transformer), transformer).to(dev)
    weights = trainable(controlnet)
    for name, parameter in controlnet.named_parameters():
        parameter.requires_grad_(name in weights)
    params = list(weights.values())
    averages = [p.detach().clone() for p in params]
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **fused)
    seconds = None
    if time_budget is not None:  # what is left, less time to save
        seconds = time_budget - (time.perf_counter() - started) - min(10.0, time_budget / 10)
    if seconds is not None and seconds < 1:
        raise RuntimeError("no time left to train; raise --time-budget")
    progress = Progress(max(steps, 1), seconds, warmup=warmup)
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(dev).manual_seed(seed)
    step, losses, window, loss = 0, [], [], torch.zeros(())
    every = max(1, min(100, steps // 10))
    controlnet.train()
    while step < steps and progress.fraction(step) < 1:
        for group in opt.param_groups:
            group["lr"] = lr * progress.lr_factor(step)
        length, idx = batches.draw(batch)
        pictures_idx = owner[idx].to(dev)
        x0, context = latents[pictures_idx], contexts[pictures_idx]
        cap, cap_lengths = features[idx.to(dev), :length], lengths[idx]
        if length == int(padded(torch.tensor(empty_length))):
            drop = torch.rand(batch, generator=gen) < CAPTION_DROPOUT
            cap = torch.where(drop.to(dev)[:, None, None], empty_features[:length], cap)
            cap_lengths = torch.where(drop, empty_length, cap_lengths)
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        sigma = sample_sigmas(batch, gen).to(dev)
        noisy, t = noisy_latents(x0, noise, sigma), model_time(sigma)
        with autocast(dev):
            hints = batched_hints(controlnet, transformer, noisy, t, cap, cap_lengths, context, DEFAULT_CONTROL_SCALE)
            pred = batched_forward(transformer, noisy, t, cap, cap_lengths, hints)
        loss = F.mse_loss(pred.float(), velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(averages, params, 1 - min(0.995, (1 + step) / (10 + step)))
        window.append(loss.detach())
        if (step + 1) % every == 0:  # the mean of the last `every` batches: one batch's loss is mostly noise level
            losses.append([step + 1, round(torch.stack(window).mean().item(), 4)])
            window = []
            log.info("step %d mean loss %.4f (%.0f s)", step + 1, losses[-1][1], time.perf_counter() - started)
        step += 1
    trained = time.perf_counter() - progress.start
    log.info("stopped after %d steps in %.0f s, loss %.4f", step, trained, loss.item())
    controlnet.eval()
    with torch.no_grad():
        torch._foreach_copy_(params, averages)
    held_loss = validation_loss(pipe, controlnet, validation_scenes(seed)[:check], seed)
    log.info("validation flow loss: %s", held_loss)
    state = {name: average for name, average in zip(weights, averages)}
    base = json.loads((source.path / "zstudio.json").read_text())
    info = {
        "name": "zstudio-demo-controlnet",
        "control_types": ["canny"],
        "base_model": {"name": base.get("name"), "version": base.get("version")},
        "seed": seed,
        "control_scale": DEFAULT_CONTROL_SCALE,
        "held_out": [_key(s) for s in held_out_scenes(seed)],
        "validation": [_key(s) for s in validation_scenes(seed)],
        "training": {
            "scenes": len(scenes),
            "distinct_canny_maps": len(distinct),
            "steps": steps,
            "steps_run": step,
            "batch": batch,
            "lr": lr,
            "warmup": warmup,
            "time_budget": time_budget,
            "seconds_training": round(trained, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(loss.item(), 4),
            "mean_losses": losses,
            "validation_loss": held_loss,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    return save(controlnet.config, state, target, info)


def validation_loss(pipe, controlnet, scenes: list[Scene], seed: int, sigmas=(0.25, 0.5, 0.75, 0.9)) -> dict:
    """The flow-matching loss on `scenes` (their first placement-free caption; the same noise for both) with the
    ControlNet's hints and without: how much of the picture the edges explain."""
    transformer, dev = pipe.transformer, pipe.transformer.device
    with torch.no_grad():
        x0 = scaled_latents(pipe.vae, images_tensor(scenes).to(dev))
        context = control_latents(pipe.vae, _uint8([control_image(s) for s in scenes]).to(dev))
        features, lengths = encode_captions(pipe, [default_captions(s)[0] for s in scenes])
        gen = torch.Generator().manual_seed(seed + 7)
        totals = {"control": 0.0, "none": 0.0}
        for level in sigmas:
            noise = torch.randn(x0.shape, generator=gen).to(dev)
            sigma = torch.full((len(scenes),), level, device=dev)
            noisy, t = noisy_latents(x0, noise, sigma), model_time(sigma)
            with autocast(dev):
                hints = batched_hints(controlnet, transformer, noisy, t, features, lengths, context,
                                      DEFAULT_CONTROL_SCALE)  # fmt: skip
                for name, given in (("control", hints), ("none", None)):
                    pred = batched_forward(transformer, noisy, t, features, lengths, given)
                    totals[name] += F.mse_loss(pred.float(), velocity_target(x0, noise)).item() / len(sigmas)
    return {k: round(v, 4) for k, v in totals.items()}


def save(config, state: dict[str, torch.Tensor], folder: Path, info: dict) -> Path:
    """The ControlNet's own weights only (bf16: a few MB) in diffusers' layout, and `zstudio.json`, atomically."""
    from diffusers import ZImageControlNetModel

    from ..models import quiet_loading

    controlnet = ZImageControlNetModel.from_config(config)
    controlnet.load_state_dict({k: v.detach().cpu() for k, v in state.items()})

    def write(staging: Path) -> None:
        with quiet_loading():
            controlnet.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)

    return publish(folder, write, info)


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(folder: str | os.PathLike, split: str = "validation", seed: int = 0, device: str = "cpu",
             steps: int | None = None, limit: int | None = None) -> dict:  # fmt: skip
    """Each scene of `split` drawn through the engine from its placement-free prompt, with the ControlNet (control =
    the rendered scene, Canny-preprocessed by the engine) and without it, judged by the evaluator: the share of
    pictures right on position, shape, colour and background, and each scene's row."""
    from ..engine import Generator
    from ..params import GenerationParams
    from .evaluator import judge_scene

    scenes = split_of(split, seed)[:limit]
    rows = []
    with tempfile.TemporaryDirectory(prefix="zstudio-control-eval-") as tmp:
        generator = Generator(model="demo", device=device, controlnet=str(folder), outputs=Path(tmp) / "outputs",
                              speed="eager", memory="resident").load()  # fmt: skip
        for i, scene in enumerate(scenes):
            picture = Path(tmp) / f"scene-{i}.png"
            render(scene).save(picture)
            prompt = default_captions(scene)[0]
            common = {"prompt": prompt, "seed": seed + i, **({"num_inference_steps": steps} if steps else {})}
            controlled = generator.generate_images(
                GenerationParams(**common, control=str(picture), control_type="canny", control_preprocess=True)
            ).images[0]
            plain = generator.generate_images(GenerationParams(**common)).images[0]
            rows.append({"scene": list(_key(scene)) + [scene.size], "prompt": prompt,
                         "control": judge_scene(controlled, scene), "baseline": judge_scene(plain, scene)})  # fmt: skip
    report = {"split": split, "controlnet": str(folder), "seed": seed, "count": len(rows), "device": device}
    for mode in ("control", "baseline"):
        report[mode] = {k: sum(r[mode][k] for r in rows) / max(1, len(rows)) for k in rows[0][mode]} if rows else {}
    report["rows"] = rows
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zstudio.demo.control", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="train, and write the ControlNet folder here")
    what.add_argument("--evaluate", metavar="FOLDER", help="judge this ControlNet folder on --split")
    parser.add_argument("--split", default="validation", choices=SPLITS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast while training)")
    parser.add_argument("--steps", type=int, help="training steps at most (default 2000); with --evaluate: sampling "
                        "steps (default: the demo model's)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--time-budget", type=float, help="seconds for the whole training run")
    parser.add_argument("--pictures", type=int, help="train on at most this many scenes (a seeded sample)")
    parser.add_argument("--limit", type=int, help="evaluate the first N scenes of the split only")
    parser.add_argument("--check", type=int, default=HELD_OUT, help="validation scenes whose flow loss, with control "
                        "and without, ends a training run")  # fmt: skip
    parser.add_argument("--json", help="with --evaluate: write the report here (default FOLDER/eval-SPLIT.json)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.out:
        folder = train_controlnet(args.out, args.seed, args.steps or 2000, args.batch, args.lr, args.device,
                                  args.time_budget, args.pictures, overwrite=args.overwrite,
                                  check=args.check)  # fmt: skip
        print(folder)
        return
    report = evaluate(args.evaluate, args.split, args.seed, args.device, args.steps, args.limit)
    # The shipped one (`demo`) lives in the installed package: its report goes to the working folder instead.
    home = Path(".") if args.evaluate == "demo" else Path(args.evaluate)
    path = Path(args.json) if args.json else home / f"eval-{args.split}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for mode in ("control", "baseline"):
        rates = ", ".join(f"{k} {v:.0%}" for k, v in report[mode].items())
        print(f"{args.split} {mode:8s} ({report['count']} scenes): {rates}")
    print(path)


if __name__ == "__main__":
    main()
