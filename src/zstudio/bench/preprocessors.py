"""Preprocessor benchmark: each ControlNet preprocessor with model weights (zstudio.preprocessors) at full size with
random weights, written in its real layout (Depth Anything V2 Small's config; controlnet_aux's own net classes under
lllyasviel/Annotators' file names), run as a request runs it (CPU, at the output size): seconds to load, seconds
per picture. Random weights change no arithmetic, except where the result steers the work (OpenPose with no body
found skips its limb search; M-LSD with no line draws none), so those two are lower bounds.

    python -m zstudio.bench.preprocessors --json OUT                  # 1024x1024, every preprocessor that imports
    python -m zstudio.bench.preprocessors --only depth --size 256 --repeats 1   # a quick try
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import __version__, preprocessors
from ..settings import load_settings
from .run import emit, timed

# depth-anything/Depth-Anything-V2-Small-hf's config.json and preprocessor_config.json (24.8M parameters).
DEPTH_ANYTHING_V2_SMALL = {
    "backbone": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
                 "image_size": 518, "patch_size": 14, "out_indices": [3, 6, 9, 12], "reshape_hidden_states": False},
    "head": {"reassemble_hidden_size": 384, "neck_hidden_sizes": [48, 96, 192, 384],
             "reassemble_factors": [4, 2, 1, 0.5], "fusion_hidden_size": 64, "head_hidden_size": 32, "patch_size": 14,
             "depth_estimation_type": "relative"},
    "processor": {"size": {"height": 518, "width": 518}, "keep_aspect_ratio": True, "ensure_multiple_of": 14,
                  "do_pad": False, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
}  # fmt: skip


def write_depth_model(folder: Path, seed: int = 0) -> int:
    """A random Depth Anything V2 Small in the hub's layout; returns its parameter count."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(seed)
    spec = DEPTH_ANYTHING_V2_SMALL
    config = DepthAnythingConfig(backbone_config=Dinov2Config(**spec["backbone"]), **spec["head"])
    model = DepthAnythingForDepthEstimation(config).eval()
    model.save_pretrained(folder)
    DPTImageProcessor(resample=Image.Resampling.BICUBIC, **spec["processor"]).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_annotators(folder: Path, seed: int = 0) -> dict[str, int]:
    """Random controlnet_aux nets under lllyasviel/Annotators' file names; returns each file's parameter count."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator as LineartNet
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    nets = {"ControlNetHED.pth": ControlNetHED_Apache2(), "mlsd_large_512_fp32.pth": MobileV2_MLSD_Large(),
            "sk_model.pth": LineartNet(3, 1, 3), "sk_model2.pth": LineartNet(3, 1, 3),
            "body_pose_model.pth": bodypose_model(), "hand_pose_model.pth": handpose_model(),
            "facenet.pth": FaceNet()}  # fmt: skip
    for file, net in nets.items():
        state = net.state_dict()
        if file in ("body_pose_model.pth", "hand_pose_model.pth"):  # OpenPose's loader drops the first name part
            state = {key.split(".", 1)[1]: value for key, value in state.items()}
        torch.save(state, folder / file)
    return {file: sum(p.numel() for p in net.parameters()) for file, net in nets.items()}


def scene(width: int, height: int) -> Image.Image:
    """A picture with edges, lines and a gradient (what the detectors work on; random weights do not care)."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    image = Image.fromarray(np.stack([ramp, 255 - ramp, ramp // 2], axis=-1))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 8, height // 8, width // 2, height // 2), fill=(240, 230, 220))
    draw.rectangle((width * 5 // 8, height // 4, width * 7 // 8, height * 7 // 8), fill=(60, 60, 60))
    return image


def measure(name: str, image: Image.Image, repeats: int, device: str) -> dict[str, Any]:
    """Load seconds and seconds per picture on `device`. On the CPU through `preprocessors.run`, as a request runs
    it (check, cached load, map); elsewhere the same load and map functions with the net on `device`."""
    settings = load_settings()
    spec = preprocessors.source(name, settings)
    if device == "cpu":
        preprocessors._LOADED.pop((name, spec), None)

        def call() -> Image.Image:
            return preprocessors.run(name, image, settings)
    else:
        net = None

        def call() -> Image.Image:
            nonlocal net
            if net is None:
                load = preprocessors.load_depth if name == "depth" else preprocessors.load_annotator
                net = load(spec, device) if name == "depth" else load(name, spec, device)
            return preprocessors.depth(net, image) if name == "depth" else preprocessors.annotate(name, net, image)

    first_s, first = timed(call)  # loads the net, then runs it
    times = []
    for _ in range(repeats):
        seconds, made = timed(call)
        times.append(seconds)
    assert made.size == image.size and first.size == image.size
    preprocessors._LOADED.pop((name, spec), None)  # its weights are about to be deleted
    return {"first_call_s": round(first_s, 3), "seconds": round(statistics.median(times), 3),
            "min_s": round(min(times), 3), "n": repeats}  # fmt: skip


SOURCES = ("ZSTUDIO_DEPTH_MODEL", "ZSTUDIO_ANNOTATORS")


def run_all(names: list[str], devices: list[str], image: Image.Image, repeats: int, depth_dir: Path,
            annotator_dir: Path, report: dict[str, Any]) -> None:  # fmt: skip
    """Write each preprocessor's random weights, then time each on each device, into `report`."""
    if "depth" in names:
        report["parameters"] = {"depth": write_depth_model(depth_dir)}
    if set(names) - {"depth"}:
        try:
            report.setdefault("parameters", {}).update(write_annotators(annotator_dir))
        except ImportError as err:
            for name in [n for n in names if n != "depth"]:
                report["skipped"][name] = f"controlnet_aux does not import ({err})"
    for name in names:
        if name in report["skipped"]:
            continue
        lack = preprocessors.missing(name)
        if lack is not None:
            report["skipped"][name] = lack
            continue
        report["results"][name] = {device: measure(name, image, repeats, device) for device in devices}
        print(name, report["results"][name], flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m zstudio.bench.preprocessors", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1024x1024", help="output size WIDTHxHEIGHT (default 1024x1024)")
    parser.add_argument("--only", nargs="*", choices=preprocessors.NAMES, help="default: all that import")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="where to time them (default: cpu, "
                        "where requests run them, and cuda when there is one, for comparison)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.lower().split("x"))
    devices = [d for d in args.devices if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    names = args.only or list(preprocessors.NAMES)
    report: dict[str, Any] = {
        "bench": "preprocessors", "zstudio": __version__, "torch": torch.__version__, "devices": devices,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "size": f"{width}x{height}",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "weights": "random, full size", "results": {}, "skipped": {},
    }  # fmt: skip
    image = scene(width, height)
    saved = {name: os.environ.get(name) for name in SOURCES}
    with tempfile.TemporaryDirectory() as tmp:
        depth_dir, annotator_dir = Path(tmp) / "depth", Path(tmp) / "annotators"
        os.environ.update(zip(SOURCES, (str(depth_dir), str(annotator_dir)), strict=True))
        try:
            run_all(names, devices, image, args.repeats, depth_dir, annotator_dir, report)
        finally:  # a caller's settings (a test process) are left as they were
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return emit(report, args.json)


if __name__ == "__main__":
    main()
