"""Where a model comes from (hub id, local folder, the embedded default), its profile, and loading it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .params import MAX_PIXELS, MAX_SIDE, MIN_SIDE, PRESETS, GenerationParams, ParamError

log = logging.getLogger(__name__)

TURBO_REPO = "Tongyi-MAI/Z-Image-Turbo"
BASE_REPO = "Tongyi-MAI/Z-Image"
TINY = "tiny"
DEMO = "demo"
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
# What a download needs: weights and configs in the diffusers layout, not the repo's assets or extra formats.
DOWNLOAD_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.jinja", "*/*.model"]


@dataclass(frozen=True)
class Profile:
    """What belongs to a model, not to the user's request: its defaults, the sizes it was trained for, its limits."""

    name: str
    num_inference_steps: int
    cfg_scale: float
    label: str
    width: int = 1024
    height: int = 1024
    sizes: tuple[tuple[int, int], ...] = tuple(PRESETS.values())  # trained for: the UI's quick presets
    side_range: tuple[int, int] = (512, MAX_SIDE)  # the sides it draws well: the UI's sliders span this
    max_side: int = MAX_SIDE  # past this side or `max_pixels` it draws no picture: refused
    max_pixels: int = MAX_PIXELS

    def sizes_text(self) -> str:
        return ", ".join(f"{w}x{h}" for w, h in self.sizes)

    def resolve(self, params: GenerationParams) -> GenerationParams:
        """The request with this model's defaults filled in; `ParamError` in one line when it asks for a size the
        model cannot draw. The engine calls this for every generation, and the server before queueing one."""
        params = params.with_defaults(self.num_inference_steps, self.cfg_scale, self.width, self.height)
        w, h = params.width, params.height
        if max(w, h) > self.max_side or w * h > self.max_pixels:
            raise ParamError(
                "size",
                f"{w}x{h} is far larger than the {self.label} can draw: it was trained at {self.sizes_text()} "
                f"(sides up to {self.max_side}); ask for {self.width}x{self.height}, or load Z-Image for larger "
                "pictures (`zstudio download`)",
            )
        return params


# Turbo is distilled for 8 transformer evaluations. Steps here count evaluations, as in diffusers >= 0.42 (sigmas
# linspace(1, 1/n, n), shifted): the model card's `num_inference_steps=9` ran 8 evaluations in the diffusers of its
# day, and is `num_inference_steps=8` now.
TURBO = Profile("turbo", num_inference_steps=8, cfg_scale=0.0, label="Z-Image-Turbo")
BASE = Profile("base", num_inference_steps=50, cfg_scale=4.0, label="Z-Image")
# The trained demo model (zstudio.demo): simple shapes on plain backgrounds. Its zstudio.json says at which size and
# with which defaults (`demo_profile`); these are the first model's (64x64, version 1).
DEMO_PROFILE = Profile("demo", num_inference_steps=20, cfg_scale=3.0, label="zstudio demo model", width=64, height=64,
                       sizes=((64, 64),), side_range=(MIN_SIDE, 128), max_side=128)  # fmt: skip
PROFILES = {p.name: p for p in (TURBO, BASE, DEMO_PROFILE)}


def demo_profile(info: dict[str, Any]) -> Profile:
    """The demo profile for a trained demo checkpoint's zstudio.json: its sizes (up to twice their side may be asked
    for) and its default steps and CFG."""
    sizes = tuple(tuple(s) for s in info.get("sizes", [])) or ((info.get("side", 64),) * 2,)
    side = max(max(s) for s in sizes)
    defaults = info.get("defaults", {})
    return replace(
        DEMO_PROFILE,
        width=sizes[0][0],
        height=sizes[0][1],
        sizes=sizes,
        side_range=(MIN_SIDE, 2 * side),
        max_side=2 * side,
        num_inference_steps=defaults.get("steps", DEMO_PROFILE.num_inference_steps),
        cfg_scale=defaults.get("cfg", DEMO_PROFILE.cfg_scale),
    )


class ModelUnavailableError(RuntimeError):
    """The weights are neither on disk nor downloadable; the message says how to get them."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the folder to load from and what to record about it."""

    spec: str  # what the user asked for: hub id, folder or "tiny"
    path: Path
    profile: Profile
    revision: str | None = None  # hub commit, when it came from the hub
    embedded: bool = False  # shipped with zstudio (the demo model) or made by it (tiny), not real Z-Image weights

    @property
    def label(self) -> str:
        if self.spec == DEMO:
            return "zstudio demo model (draws simple shapes)"
        return "zstudio tiny checkpoint (random weights)" if self.embedded else self.spec


def is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not Path(spec).exists() and not spec.startswith((".", "/", "~"))


def profile_for(spec: str, folder: Path | None = None) -> Profile:
    """Known hub ids have their profile; a folder may name one in zstudio.json; anything else is Turbo."""
    if folder is not None and (folder / "zstudio.json").is_file():
        info = json.loads((folder / "zstudio.json").read_text())
        name = info.get("profile", "turbo")
        if name == DEMO_PROFILE.name:
            return demo_profile(info)
        if name in PROFILES:
            return PROFILES[name]
    repo = spec.rstrip("/").split("/")[-1].lower()
    if repo == BASE_REPO.split("/")[-1].lower():
        return BASE
    return TURBO


def check_folder(folder: Path) -> None:
    """Reject a folder that is not a complete diffusers checkpoint, naming what is missing."""
    if not folder.is_dir():
        raise ParamError("model", f"folder {folder} does not exist")
    if not (folder / "model_index.json").is_file():
        raise ParamError("model", f"{folder} has no model_index.json; it is not a diffusers checkpoint folder")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir() or not any((folder / c).iterdir())]
    if missing:
        raise ParamError("model", f"{folder} is missing the component(s) {', '.join(missing)}")


def tiny_source(cache_dir: Path, seed: int = 0) -> ModelSource:
    """The embedded default: the tiny checkpoint, made once into the cache folder."""
    from .tiny import make_tiny

    folder = cache_dir / f"tiny-seed{seed}"
    if not (folder / "model_index.json").is_file():
        log.info("making the tiny checkpoint in %s", folder)
        make_tiny(folder, seed=seed, overwrite=True)
    return ModelSource(spec=TINY, path=folder, profile=TURBO, embedded=True)


def demo_source() -> ModelSource:
    """The embedded default: the small trained demo model shipped inside the package."""
    from importlib import resources

    folder = Path(str(resources.files("zstudio").joinpath("data/demo")))
    check_folder(folder)
    return ModelSource(spec=DEMO, path=folder, profile=profile_for(DEMO, folder), embedded=True)


def download(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a hub model into the standard Hugging Face cache, with a progress bar."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as err:  # the hub client raises many kinds (network, auth, missing repo)
        raise ModelUnavailableError(
            f"could not download {repo_id} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); check the network or HF_TOKEN, "
            "or pass --model /path/to/a/diffusers/folder"
        ) from err


def resolve(spec: str, cache_dir: Path, allow_download: bool = True) -> ModelSource:
    """Turn what the user typed into a folder on disk, downloading a hub model when missing."""
    spec = spec.strip()
    if spec == TINY:
        return tiny_source(cache_dir)
    if spec == DEMO:
        return demo_source()
    if not is_hub_id(spec):
        folder = Path(spec).expanduser()
        check_folder(folder)
        return ModelSource(spec=str(folder), path=folder, profile=profile_for(spec, folder))

    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, local_files_only=True, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception:  # not cached (LocalEntryNotFoundError) or a partial cache
        if not allow_download:
            raise ModelUnavailableError(
                f"{spec} is not in the Hugging Face cache; run `zstudio download {spec}` "
                "or pass --model /path/to/a/diffusers/folder"
            ) from None
        log.info("downloading %s into the Hugging Face cache", spec)
        try:
            folder = download(spec)
        except ModelUnavailableError as err:
            raise ModelUnavailableError(
                f"{spec} is not in the Hugging Face cache and the hub cannot be reached; run "
                f"`zstudio download {spec}` on a connected machine (or copy its HF cache here), "
                "or pass --model /path/to/a/diffusers/folder"
            ) from err
    check_folder(folder)
    return ModelSource(spec=spec, path=folder, profile=profile_for(spec, folder), revision=folder.name)


@contextlib.contextmanager
def quiet_loading(quiet: bool = True):
    """Hide diffusers' and transformers' progress bars where loading takes no time worth showing."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if not quiet:
        yield
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def load_pipeline(source: ModelSource, device: torch.device, dtype: torch.dtype):
    """Load all components through diffusers' own loader and move them to the device, once."""
    from diffusers import ZImagePipeline

    with quiet_loading(source.embedded):
        pipe = ZImagePipeline.from_pretrained(source.path, dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_transformer(source: ModelSource, dtype: torch.dtype):
    """The transformer alone, from the model's folder (after 8-bit weights must give way to bf16 ones)."""
    from diffusers import ZImageTransformer2DModel

    with quiet_loading(source.embedded):
        return ZImageTransformer2DModel.from_pretrained(source.path, subfolder="transformer", dtype=dtype)


def load_text_encoder(source: ModelSource, dtype: torch.dtype):
    """The text encoder alone, in bf16 from the model's folder (after int8 weights must give way to streamed ones);
    its class is the one the folder's model_index.json names (transformers' Qwen3Model for Z-Image)."""
    import transformers

    _library, name = json.loads((source.path / "model_index.json").read_text())["text_encoder"]
    with quiet_loading(source.embedded):
        return getattr(transformers, name).from_pretrained(source.path, subfolder="text_encoder", dtype=dtype)


_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """A weights file's SHA-256 (hex; LoRAs and upscalers are named by it), cached by path, size and
    modification time."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]
