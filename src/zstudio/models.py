"""Where a model comes from (hub id, local folder, the embedded default), its profile, and loading it."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .params import ParamError

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
    """Defaults that belong to a model, not to the user's request."""

    name: str
    num_inference_steps: int
    cfg_scale: float
    label: str
    width: int = 1024
    height: int = 1024


# Turbo is distilled for 8 transformer evaluations. Steps here count evaluations, as in diffusers >= 0.42 (sigmas
# linspace(1, 1/n, n), shifted): the model card's `num_inference_steps=9` ran 8 evaluations in the diffusers of its
# day, and is `num_inference_steps=8` now.
TURBO = Profile("turbo", num_inference_steps=8, cfg_scale=0.0, label="Z-Image-Turbo")
BASE = Profile("base", num_inference_steps=50, cfg_scale=4.0, label="Z-Image")
# The trained demo model (zstudio.demo): 64x64 pictures of one shape; guidance sharpens its colours.
DEMO_PROFILE = Profile("demo", num_inference_steps=20, cfg_scale=3.0, label="zstudio demo model", width=64, height=64)
PROFILES = {p.name: p for p in (TURBO, BASE, DEMO_PROFILE)}


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
        name = json.loads((folder / "zstudio.json").read_text()).get("profile", "turbo")
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
    return ModelSource(spec=DEMO, path=folder, profile=DEMO_PROFILE, embedded=True)


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
