"""ControlNet: where the weights come from, which control types and preprocessors exist, and the one check of a
request's control image (`validate`), which the engine runs before any weights load and a server at submit time.

The ControlNet is diffusers' `ZImageControlNetModel` (the alibaba-pai "Z-Image-Turbo-Fun-Controlnet-Union" releases,
or our tiny one). Its config encodes no control types: a Union model reads the kind of control from the control
image itself. The types a ControlNet accepts are therefore documentation, kept here: a `zstudio.json` beside its
weights may list them (`{"control_types": [...]}`), otherwise the Union model card's list applies (Canny, HED, Depth,
Pose and MLSD). `control_type` picks the preprocessor and goes into the metadata; "none" means "a control image of
unstated kind, used as given".

Size rule: the control image (or the picture it is made from) is fitted to the output size exactly as an edit's
source is (`zstudio.edit.fit`): scaled, aspect kept, to cover the size, then centre-cropped; never stretched.
Preprocessing runs after the fit, so edges are found at the resolution the model sees. The preprocessors with
model weights (depth, HED, M-LSD, lineart, pose) are `zstudio.preprocessors`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from . import preprocessors
from .edit import fit, read_image
from .params import MAX_INPUT_BYTES, MAX_INPUT_PIXELS, GenerationParams, ParamError
from .settings import Settings, load_settings

if TYPE_CHECKING:
    import torch

FIELD = "controlnet"
UNION_TYPES = ("canny", "hed", "depth", "pose", "mlsd")  # the Union model card's "Canny, HED, Depth, Pose and MLSD"
CANNY_THRESHOLDS = (100, 200)  # cv2.Canny's low and high hysteresis thresholds, as A1111's ControlNet defaults


@dataclass(frozen=True)
class Preprocessor:
    """Makes a control image of one type from a picture (`run`, at the picture's size); `missing` says what it
    lacks here, None when it can run (checked on disk, before anything loads)."""

    name: str
    run: Callable[[Image.Image, Settings], Image.Image] | None
    missing: Callable[[Settings], str | None]


# The Canny ControlNet trained on the demo model (`python -m zstudio.demo.control`; docs/CONTROLNET.md).
DEMO = Path(__file__).parent / "data" / "controlnet-demo"


def canny(image: Image.Image) -> Image.Image:
    """OpenCV's Canny edges of the picture's grey levels, white on black, as three channels."""
    import cv2

    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, *CANNY_THRESHOLDS)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _with_weights(name: str) -> Preprocessor:
    """A preprocessor of zstudio.preprocessors: model weights from a folder or the Hugging Face cache."""
    return Preprocessor(name, partial(preprocessors.run, name), partial(preprocessors.missing, name))


def _never(needs: str) -> Callable[[Settings], str]:
    return lambda settings: needs


PREPROCESSORS: dict[str, Preprocessor] = {
    "canny": Preprocessor("canny", lambda image, settings: canny(image), lambda settings: None),
    **{name: _with_weights(name) for name in preprocessors.NAMES},  # depth, hed, mlsd, lineart, pose
    # The Union model card names no scribble or tile condition, so no simple image op stands in for them.
    "scribble": Preprocessor("scribble", None, _never("a model trained on scribbles; the Union model card lists none")),
    "tile": Preprocessor("tile", None, _never("a model trained on tiles; the Union model card lists none")),
}


def preprocessor_choices(settings: Settings | None = None) -> list[str]:
    """The control types a UI offers: the preprocessors that can run here now (their package imports and their
    weights are on disk; no net is loaded), then "none" (a ready control image)."""
    settings = settings or load_settings()
    return [name for name, pre in PREPROCESSORS.items() if pre.run is not None and pre.missing(settings) is None] + [
        "none"
    ]


def check_preprocessor(name: str, settings: Settings) -> None:
    """One `ParamError` line when preprocessor `name` cannot run here: what it needs and where to put it."""
    needs = PREPROCESSORS[name].missing(settings)
    if needs is not None:
        raise preprocessors.refusal(name, needs)


# ------------------------------------------------------------------------------------------ weights
@dataclass(frozen=True)
class ControlNetSource:
    """A resolved ControlNet: a diffusers folder (config.json) or a single .safetensors file."""

    spec: str
    path: Path  # the folder, or the file
    config: Path | None  # a folder holding config.json for a single file; None: diffusers infers it (from the hub)
    types: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.spec


def resolve(spec: str, allow_download: bool = True) -> ControlNetSource:
    """A folder, a .safetensors file, or a hub id `owner/repo` (optionally `owner/repo/FILE.safetensors` where the
    repo holds several), from the Hugging Face cache, else downloaded into it; or `demo`, the Canny ControlNet trained
    on the demo model and shipped with it. Missing: one `ParamError` line."""
    spec = spec.strip()
    if spec == "demo":
        return _local(spec, DEMO)
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") < 1:
        return _local(spec, path)
    return _local(spec, _from_hub(spec, allow_download))


def _local(spec: str, path: Path) -> ControlNetSource:
    if path.is_dir():
        if not (path / "config.json").is_file():
            files = sorted(path.glob("*.safetensors"))
            if len(files) != 1:
                names = ", ".join(f.name for f in files[:5]) or "none"
                raise ParamError(FIELD, f"{path} has no config.json and {len(files)} .safetensors files ({names}); "
                                        "name the file")  # fmt: skip
            path = files[0]
        else:
            return ControlNetSource(spec, path, None, _types(path))
    if not path.is_file():
        raise ParamError(FIELD, f"{spec!r} is neither a folder, a .safetensors file nor a Hugging Face repo id")
    if path.suffix != ".safetensors":
        raise ParamError(FIELD, f"{path.name} is not a .safetensors file")
    config = path.parent if (path.parent / "config.json").is_file() else None
    return ControlNetSource(spec, path, config, _types(path.parent))


def _from_hub(spec: str, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download

    owner, repo, *rest = spec.split("/")
    repo_id = f"{owner}/{repo}"
    patterns = ["/".join(rest)] if rest else ["config.json", "*.safetensors", "zstudio.json"]
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:  # not cached (LocalEntryNotFoundError): ask the hub, if allowed
        if not allow_download:
            raise ParamError(FIELD, f"{spec} is not in the Hugging Face cache") from None
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as err:  # the hub client raises many kinds (network, auth, missing repo)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
            raise ParamError(FIELD, f"ControlNet {spec!r} is not in the Hugging Face cache and could not be "
                                    f"downloaded ({reason[:160]})") from None  # fmt: skip
    return folder / "/".join(rest) if rest else folder


def _types(folder: Path) -> tuple[str, ...]:
    info = folder / "zstudio.json"
    if info.is_file():
        return tuple(json.loads(info.read_text()).get("control_types", UNION_TYPES))
    return UNION_TYPES


def load(source: ControlNetSource, dtype: torch.dtype) -> Any:
    """The ControlNet's own weights in CPU memory; `Generator.install_controlnet` shares the transformer's embedders
    and refiners with it (`ZImageControlNetModel.from_transformer`) and places it for the memory mode."""
    from diffusers import ZImageControlNetModel

    from .models import quiet_loading

    with quiet_loading():
        if source.path.is_dir():
            controlnet = ZImageControlNetModel.from_pretrained(source.path, torch_dtype=dtype)
        else:
            config = str(source.config) if source.config else None
            controlnet = ZImageControlNetModel.from_single_file(str(source.path), config=config, torch_dtype=dtype)
    return controlnet.eval()


# What `ZImageControlNetModel.from_transformer` takes from the transformer instead of owning.
SHARED_MODULES = ("t_embedder", "all_x_embedder", "cap_embedder", "noise_refiner", "context_refiner")
SHARED_PARAMETERS = ("x_pad_token", "cap_pad_token")


def attach(controlnet: Any, transformer: Any, own_copies: bool = False) -> Any:
    """Give the ControlNet the transformer's embedders and refiners: shared (diffusers' `from_transformer`, no extra
    memory), or with `own_copies` its own copies (1.4 GB for Z-Image, in host memory), which the streamed memory
    modes need: there the transformer's parts move between devices on the transformer's own schedule (group
    offloading hooks keyed to its forward), so the ControlNet, which runs them first, streams copies on its own.
    Copies are taken before the transformer is streamed; a ControlNet that has them keeps them."""
    import copy

    import torch
    from diffusers import ZImageControlNetModel

    if getattr(controlnet, "_zstudio_own_copies", False):
        return controlnet
    controlnet = ZImageControlNetModel.from_transformer(controlnet, transformer)
    if own_copies:
        for name in SHARED_MODULES:
            setattr(controlnet, name, copy.deepcopy(getattr(transformer, name)))
        for name in SHARED_PARAMETERS:
            original = getattr(transformer, name)
            setattr(controlnet, name, torch.nn.Parameter(original.detach().clone(), requires_grad=False))
        controlnet._zstudio_own_copies = True
    return controlnet


INPAINT_IN_DIM = 33  # Union 2.x: 16 control-image latents, the mask, 16 masked-picture latents


def control_in_dim(source: ControlNetSource) -> int | None:
    """The ControlNet's input channels, read from its files without loading it: its config.json, else the shape of
    its control patch embedder in the safetensors header (in_features = channels x 2 x 2 patches); None if neither
    says."""
    folder = source.path if source.path.is_dir() else source.config
    if folder is not None and (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()).get("control_in_dim")
    if source.path.is_file():
        from safetensors import safe_open

        with safe_open(str(source.path), framework="pt") as weights:
            if "control_all_x_embedder.2-1.weight" in weights.keys():
                return weights.get_slice("control_all_x_embedder.2-1.weight").get_shape()[1] // 4
    return None


def check_inpaint_channels(name: str, in_dim: int | None) -> None:
    """One `mask` line when a ControlNet of `in_dim` input channels does not take an inpaint's channels (None:
    unknown until it loads, checked again then)."""
    if in_dim is not None and in_dim != INPAINT_IN_DIM:
        raise ParamError("mask", f"with control needs a ControlNet with inpainting channels (Union 2.x: "
                                 f"control_in_dim {INPAINT_IN_DIM}); {name} has {in_dim}")  # fmt: skip


def size_gib(source: ControlNetSource) -> float:
    """GiB of the ControlNet's own weights as stored (what it adds to a memory mode's estimate)."""
    files = [source.path] if source.path.is_file() else list(source.path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**30


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ControlInput:
    """A request's control image at the output size, and the recipe recorded with each result."""

    image: Image.Image  # RGB, width x height
    recipe: dict[str, Any]


def preprocessor_of(params: GenerationParams) -> str | None:
    """The preprocessor a request asks for: `control_preprocess` names one, or True means its `control_type`'s."""
    if isinstance(params.control_preprocess, str):
        return params.control_preprocess
    return params.control_type if params.control_preprocess else None


def validate(
    params: GenerationParams,
    controlnet: ControlNetSource | None,
    width: int,
    height: int,
    max_input_pixels: int = MAX_INPUT_PIXELS,
    max_input_bytes: int = MAX_INPUT_BYTES,
    settings: Settings | None = None,
) -> ControlInput | None:
    """Read and check a request's control image for an output of width x height; None without `control`.

    One `ParamError` line each for: no ControlNet loaded, a control type the ControlNet was not trained on, a
    preprocessor that cannot run (what it needs: `settings` say where its weights are), a file that is not a
    PNG/JPEG/WebP image."""
    if params.control is None:
        return None
    if controlnet is None:
        raise ParamError("control", "needs a ControlNet: start with --controlnet SPEC (or ZSTUDIO_CONTROLNET), "
                                    "e.g. alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.0")  # fmt: skip
    kind = params.control_type or "none"
    if kind != "none" and kind not in controlnet.types:
        known = ", ".join(controlnet.types)
        raise ParamError("control_type", f"{kind!r} is not a type ControlNet {controlnet.name} was trained on "
                                         f"({known}; 'none' passes the image as given)")  # fmt: skip
    name = preprocessor_of(params)
    if name is not None:
        settings = settings or load_settings()
        check_preprocessor(name, settings)
    picture, info = read_image("control", params.control, max_input_pixels, max_input_bytes)
    image = fit(picture.convert("RGB"), width, height, Image.Resampling.LANCZOS)
    recipe: dict[str, Any] = {
        "type": kind,
        "controlnet": controlnet.name,
        "scale": params.control_scale,
        "start": params.control_start,
        "end": params.control_end,
    }
    if name is not None:
        image = PREPROCESSORS[name].run(image, settings)
        recipe["preprocessor"] = name
        recipe["source_sha256"] = info["sha256"]
        recipe["sha256"] = sha256_pixels(image)  # the pixels of the control image the model saw
    else:
        recipe["sha256"] = info["sha256"]
    return ControlInput(image=image, recipe=recipe)


def sha256_pixels(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels, row by row (`hashlib.sha256(image.convert("RGB").tobytes())`): the same
    for every PNG encoder, and a fraction of the time a PNG encoding took on the request's path."""
    import hashlib

    return hashlib.sha256((image if image.mode == "RGB" else image.convert("RGB")).tobytes()).hexdigest()


def check_range(params: GenerationParams, step_counts: list[int]) -> None:
    """One `control_start` line when control_start..control_end covers none of the steps a request runs (the rule of
    `active`; `step_counts`: the counts it may run), instead of a generation without control that says nothing."""
    if not any(active(params, i, n) for n in step_counts for i in range(n)):
        raise ParamError("control_start", f"{params.control_start:g}-{params.control_end:g} covers none of the "
                                          f"{max(step_counts)} steps this request runs: widen the range (0-1 is "
                                          "every step)")  # fmt: skip


def active(params: GenerationParams, step: int, steps: int) -> bool:
    """Whether control applies at `step` of `steps`: diffusers' ControlNet rule (`control_guidance_start/end` of
    StableDiffusionControlNetPipeline), keep = not (i/N < start or (i+1)/N > end)."""
    return not (step / steps < params.control_start or (step + 1) / steps > params.control_end)
