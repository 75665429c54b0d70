"""ControlNet preprocessors that need model weights: depth through transformers' depth-estimation models (Depth
Anything V2, DPT), HED, M-LSD, lineart and pose through controlnet_aux (the package diffusers' ControlNet docs use).

zstudio never downloads their weights: they come from a folder or the Hugging Face cache (`ZSTUDIO_DEPTH_MODEL`,
`ZSTUDIO_ANNOTATORS`), so a server does not reach the network on a request. What is missing is said before anything
runs (`missing`), cheaply (files on disk; no net loaded, no network): how a UI lists the ones that can run.

They run on the CPU by default: the nets are small (Depth Anything V2 Small 25M parameters, the annotators 1.5M to
52M) and run once per request, so they take no GPU memory from the transformer and the ControlNet, which the memory
modes budget; the price is up to seconds per picture at 1024x1024 (docs/CONTROLNET.md; `python -m
zstudio.bench.preprocessors`). `ZSTUDIO_ANNOTATOR_DEVICE=cuda` runs them on the GPU instead (tens of milliseconds on
an H100, beside the model's memory). A loaded net is kept for the process (`_LOADED`).

Size rule: the picture arrives fitted to the output size (`zstudio.control`); the map returned has exactly that size.
Depth: the model's image processor resizes for the net (518 px short side for Depth Anything), and the prediction
is interpolated back to the output size (transformers' `post_process_depth_estimation`). controlnet_aux: detection at
the output's short side (`detect_resolution` = `image_resolution` = min(width, height); the library rounds sides to
multiples of 64), then resized to the exact output size.
"""

from __future__ import annotations

import importlib.util
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .params import ParamError
from .settings import Settings, load_settings

FIELD = "control_preprocess"
EXTRA = "pip install 'zstudio[annotators]'"

# controlnet_aux's detector class per preprocessor, and the files its `from_pretrained` reads (lllyasviel/Annotators'
# names). OpenposeDetector loads its hand and face nets too, though zstudio draws the body only (its default).
ANNOTATORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hed": ("HEDdetector", ("ControlNetHED.pth",)),
    "mlsd": ("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
    "lineart": ("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "pose": ("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
}
NAMES = ("depth", *ANNOTATORS)
# A transformers depth model: its config, its image processor's config and its weights (either format).
DEPTH_FILES = ("config.json", "preprocessor_config.json")
DEPTH_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_LOADED: dict[tuple[str, str], Any] = {}  # (preprocessor, source) -> the loaded net, for the process
_LOCK = threading.Lock()  # a server validates requests on several threads; load each net once


def is_local(spec: str) -> bool:
    """A folder path rather than a hub id, which is exactly `owner/repo` here (else as `zstudio.control.resolve`)."""
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def _found(spec: str, file: str) -> bool:
    if is_local(spec):
        return (Path(spec).expanduser() / file).is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, file), str)  # the cache only: no network


def source(name: str, settings: Settings) -> str:
    """Where preprocessor `name` takes its weights from: a folder or a hub id."""
    return settings.depth_model if name == "depth" else settings.annotators


def missing(name: str, settings: Settings | None = None) -> str | None:
    """What preprocessor `name` lacks to run here, as the end of a sentence "... needs X"; None when it can run.
    Reads the disk (and imports controlnet_aux once per process), loads no net."""
    settings = settings or load_settings()
    spec = source(name, settings)
    variable = "ZSTUDIO_DEPTH_MODEL" if name == "depth" else "ZSTUDIO_ANNOTATORS"
    if is_local(spec):
        where = f"in {spec}, the folder {variable} names"
    else:
        where = f"of {spec} in the Hugging Face cache ({variable}; or name a folder holding them)"
    if name == "depth":
        files = [f for f in DEPTH_FILES if not _found(spec, f)]
        if not any(_found(spec, f) for f in DEPTH_WEIGHTS):
            files.append(" or ".join(DEPTH_WEIGHTS))
        if not files:
            return None
        return f"a transformers depth-estimation model (Depth Anything V2 or DPT): {', '.join(files)} {where}"
    if importlib.util.find_spec("controlnet_aux") is None:
        return f"the controlnet_aux package ({EXTRA})"
    files = [f for f in ANNOTATORS[name][1] if not _found(spec, f)]
    if files:
        origin = " (lllyasviel/Annotators' files)" if is_local(spec) else ""
        return f"{', '.join(files)}{origin} {where}"
    error = _annotators_import_error()
    return f"controlnet_aux, which does not import ({error}; {EXTRA})" if error else None


@cache
def _annotators_import_error() -> str | None:
    try:
        import controlnet_aux  # noqa: F401  (imports timm, torchvision, scikit-image, scipy)
    except Exception as err:  # ImportError, or a dependency that breaks at import
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"[:160]
    return None


def refusal(name: str, needs: str) -> ParamError:
    """The one line that refuses preprocessor `name`: what it needs, and what to give instead."""
    return ParamError(FIELD, f"preprocessor {name} needs {needs}; give a ready {name} image as control instead")


def check(name: str, settings: Settings | None = None) -> None:
    """One `ParamError` line when preprocessor `name` cannot run here."""
    lack = missing(name, settings)
    if lack is not None:
        raise refusal(name, lack)


def run(name: str, image: Image.Image, settings: Settings | None = None) -> Image.Image:
    """Preprocessor `name`'s control image of an RGB picture, at the picture's size, RGB."""
    settings = settings or load_settings()
    check(name, settings)
    net = _load(name, source(name, settings), annotator_device(settings))
    return depth(net, image) if name == "depth" else annotate(name, net, image)


def annotator_device(settings: Settings) -> str:
    """Where the nets run: `ZSTUDIO_ANNOTATOR_DEVICE`, cpu (the default) or cuda[:N] (one line if neither)."""
    device = settings.annotator_device.strip().lower()
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ParamError("ZSTUDIO_ANNOTATOR_DEVICE", f"must be cpu, cuda or cuda:N, got {settings.annotator_device!r}")
    return device


def _load(name: str, spec: str, device: str = "cpu") -> Any:
    key = (name, spec) if device == "cpu" else (name, spec, device)
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_depth(spec, device) if name == "depth" else load_annotator(name, spec, device)
        return _LOADED[key]


def load_depth(spec: str, device: str = "cpu") -> Any:
    """transformers' depth-estimation pipeline over the model at `spec`, with the PIL image processor (no
    torchvision), on `device` (`annotator_device`)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

    from .models import quiet_loading

    where = str(Path(spec).expanduser()) if is_local(spec) else spec
    with quiet_loading():
        model = AutoModelForDepthEstimation.from_pretrained(where, local_files_only=True).eval()
        processor = AutoImageProcessor.from_pretrained(where, local_files_only=True, backend="pil")
    return pipeline("depth-estimation", model=model, image_processor=processor, device=device)


def depth(estimator: Any, image: Image.Image) -> Image.Image:
    """The depth map normalised to 0-255, near = white (ControlNet's convention), grey in three channels.
    Relative models (Depth Anything, DPT) predict inverse depth, already near = high; metric ones predict
    distance, so theirs is flipped."""
    predicted = estimator(image)["predicted_depth"].detach().float().cpu().numpy()
    low, high = float(predicted.min()), float(predicted.max())
    scaled = (predicted - low) / (high - low) if high > low else np.zeros_like(predicted)
    if getattr(estimator.model.config, "depth_estimation_type", "relative") == "metric":
        scaled = 1 - scaled
    grey = (scaled * 255).astype(np.uint8)  # as transformers' pipeline makes its "depth" picture
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


def load_annotator(name: str, spec: str, device: str = "cpu") -> Any:
    """controlnet_aux's detector for `name` from a folder or the Hugging Face cache (never downloaded); requests
    run it on `device` (`annotator_device`)."""
    import controlnet_aux

    detector = getattr(controlnet_aux, ANNOTATORS[name][0])
    if is_local(spec):
        return detector.from_pretrained(str(Path(spec).expanduser())).to(device)
    return detector.from_pretrained(spec, local_files_only=True).to(device)


def annotate(name: str, detector: Any, image: Image.Image) -> Image.Image:
    """The detector's map of the picture at the picture's exact size: detected at its short side (controlnet_aux
    rounds sides to multiples of 64), then resized as the library resizes (bilinear)."""
    import cv2

    width, height = image.size
    side = min(width, height)
    made = detector(np.asarray(image.convert("RGB")), detect_resolution=side, image_resolution=side, output_type="np")
    if made.shape[:2] != (height, width):
        made = cv2.resize(made, (width, height), interpolation=cv2.INTER_LINEAR)
    return Image.fromarray(made).convert("RGB")
