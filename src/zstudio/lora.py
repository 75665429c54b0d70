"""LoRA adapters for the Z-Image transformer: where files come from, reading every published key layout, and bringing
the loaded transformer to the set a request asks for.

Formats (docs/LORA.md has the table): diffusers/PEFT (`transformer.…lora_A/lora_B`), kohya/ComfyUI
(`lora_unet_layers_0_attention_to_q.lora_down.weight` + `.alpha`), ComfyUI/ai-toolkit (`diffusion_model.` prefix),
DiffSynth-Studio (flat `layers.0.…lora_A.weight`, optionally `.default.`), and fused QKV (one `qkv` LoRA whose
lora_B stacks the q, k and v rows). diffusers' `ZImagePipeline.lora_state_dict` does the renaming and alpha folding;
what it does not cover (flat keys, fused QKV outside its dot form, PEFT metadata alphas) is normalised here first.
Every converted layer must name a linear layer of the transformer with matching shapes, or the file is refused.

Two ways to apply a set (`LoadedLoras`):
- adapters (uncompiled modes): each file is loaded once as a PEFT adapter (`load_lora_weights`), a request picks
  its set with `set_adapters(names, strengths)`; no set = `disable_lora()`, the base layers alone;
- fused (compiled modes, and 8-bit weights in any mode): the set's deltas are added into the base weights in place, so
  the compiled graphs see the same modules and no recompile happens; the original weights are kept (CPU copies of
  the touched layers) and copied back when the set changes, so removing a set restores the base weights bit for bit.
  An 8-bit layer (memory `8bit`, speed `fastest`) is fused into its bf16 weight and quantized again with the mode's
  own config (`zstudio.quantized`); removing the set re-quantizes the bf16 weight alone: the load-time tensor again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .models import file_sha256
from .params import GenerationParams, ParamError
from .quantized import QuantizedLayers, host_copy, is_quantized, layers_of, requantize_, summed

log = logging.getLogger(__name__)

FIELD = "loras"
SUFFIX = ".safetensors"
MAX_LOADED = 16  # adapters kept in memory; the least recently used beyond this are deleted
HASH_CHARS = 10  # as A1111 and civitai ("AutoV2") write a LoRA's hash
PROMPT_TAG = re.compile(r"<lora:([^:<>]+?)(?::([^:<>]*))?>", re.IGNORECASE)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+\.safetensors)?$")
LORA_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")


# ------------------------------------------------------------------------------------------- prompt tags
def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A1111's `<lora:name:0.8>` tags (strength 1 when left out) taken out of the prompt: (prompt without them, the
    LoRAs in order). The text encoder never sees the tags."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        name, strength = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            value = float(strength) if strength else 1.0
        except ValueError:
            raise ParamError("prompt", f"{match.group(0)!r}: strength {strength!r} is not a number") from None
        found.append((name, value))
        return ""

    text = PROMPT_TAG.sub(take, prompt)
    return re.sub(r"\s{2,}", " ", text).strip(" ,"), found


def take_prompt_loras(params: GenerationParams) -> GenerationParams:
    """The validate step every door goes through: prompt tags join `params.loras` (after the explicit ones; a name
    given twice keeps its last strength)."""
    if "<lora:" not in params.prompt.lower():
        return params
    prompt, tagged = parse_prompt(params.prompt)
    merged = dict(params.loras)
    merged.update(tagged)
    return params.replace(prompt=prompt or " ", loras=tuple(merged.items()))


# ----------------------------------------------------------------------------------------------- files
@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    size: int

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "size_mb": round(self.size / 1e6, 2)}


class LoraFolder:
    """The LoRA folder (`./loras`, ZSTUDIO_LORAS): `*.safetensors` under it, named by their path without the suffix
    (`style/ink` for `loras/style/ink.safetensors`). Scanned on first use and again when a name is not found."""

    def __init__(self, folder: str | os.PathLike, folder_only: bool = False):
        self.folder = Path(folder)
        self.folder_only = folder_only  # a server's clients name LoRAs of its folder, never files or hub repos
        self._files: dict[str, LoraFile] | None = None

    def scan(self) -> dict[str, LoraFile]:
        files = {}
        if self.folder.is_dir():
            for path in sorted(self.folder.rglob(f"*{SUFFIX}")):
                name = path.relative_to(self.folder).with_suffix("").as_posix()
                files[name] = LoraFile(name, path, path.stat().st_size)
        self._files = files
        return files

    def available(self) -> list[LoraFile]:
        """Every LoRA in the folder, rescanned now (the listing doors call this)."""
        return list(self.scan().values())

    def find(self, name: str) -> LoraFile:
        """A folder name, a `.safetensors` path, or a Hugging Face repo id (`owner/repo` or `owner/repo/file.st`)
        looked up in the HF cache (downloaded where the hub is reachable)."""
        files = self._files if self._files is not None else self.scan()
        if name not in files:
            files = self.scan()
        if name in files:
            return files[name]
        if self.folder_only:
            known = ", ".join(list(files)[:10]) or "none"
            raise ParamError(FIELD, f"no LoRA {name!r} in this server's LoRA folder (there: {known}); "
                                    "GET /api/v1/loras lists them")  # fmt: skip
        path = Path(name).expanduser()
        if path.suffix == SUFFIX and path.is_file():
            return LoraFile(path.stem, path, path.stat().st_size)
        if HUB_ID.match(name) and not path.exists():
            return from_hub(name)
        known = ", ".join(list(files)[:10]) or "none"
        raise ParamError(FIELD, f"no LoRA {name!r} in {self.folder} (there: {known}); give a name from "
                                "`zstudio loras`, a .safetensors file or a Hugging Face repo id")  # fmt: skip


def from_hub(spec: str) -> LoraFile:
    """`owner/repo` (its one .safetensors file) or `owner/repo/path/file.safetensors`, from the HF cache, else
    downloaded into it."""
    from huggingface_hub import snapshot_download

    owner, repo, *rest = spec.split("/")
    repo_id, pattern = f"{owner}/{repo}", "/".join(rest) or f"*{SUFFIX}"
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=[pattern]))
    except Exception:  # not cached (LocalEntryNotFoundError): ask the hub
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=[pattern]))
        except Exception as err:  # the hub client raises many kinds (network, auth, missing repo)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}"
            raise ParamError(FIELD, f"LoRA {spec!r} is not in the LoRA folder, and could not be had from the "
                                    f"Hugging Face hub or its cache ({reason[:160]})") from None  # fmt: skip
    files = sorted(folder.glob(pattern if rest else f"**/*{SUFFIX}"))
    if len(files) != 1:
        names = ", ".join(f.relative_to(folder).as_posix() for f in files[:5]) or "none"
        raise ParamError(FIELD, f"{repo_id} holds {len(files)} .safetensors files ({names}); name one as "
                                f"{repo_id}/FILE.safetensors")  # fmt: skip
    return LoraFile(spec, files[0], files[0].stat().st_size)


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the header metadata of a .safetensors file; a damaged file is one `ParamError` line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ParamError(FIELD, f"{path.name} is not a readable .safetensors file ({reason[:160]})") from None
    if not tensors:
        raise ParamError(FIELD, f"{path.name} holds no tensors")
    return tensors, metadata


# ---------------------------------------------------------------------------------------------- formats
FUSED_QKV = re.compile(r"^(.*[._])qkv(\.(?:lora_down|lora_up|lora_A|lora_B)\.weight|\.alpha)$")
TOP_MODULES = ("layers.", "noise_refiner.", "context_refiner.", "all_x_embedder.", "all_final_layer.", "cap_embedder.",
               "t_embedder.")  # fmt: skip


def detect_format(state_dict: dict[str, torch.Tensor]) -> str:
    """The key layout's name, for messages and docs: which trainer wrote the file."""
    keys = list(state_dict)
    if any(FUSED_QKV.match(k) for k in keys):
        return "fused-qkv"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui/ai-toolkit"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith(TOP_MODULES) for k in keys):
        return "diffsynth"
    return "unknown"


def split_fused_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One `qkv` LoRA (lora_B of 3x rows) as to_q/to_k/to_v LoRAs sharing lora_A, in the file's own naming style.
    Where split keys sit next to it (some trainers write both), the fused copy is redundant and dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = FUSED_QKV.match(key)
        if not match:
            out[key] = value
            continue
        head, tail = match.groups()
        if any(f"{head}to_{p}{tail}" in state_dict for p in "qkv"):
            continue
        up = tail.startswith((".lora_up", ".lora_B"))
        if up and value.shape[0] % 3:
            raise ParamError(FIELD, f"{key}: a fused qkv lora_B needs a multiple of 3 rows, has {value.shape[0]}")
        parts = value.chunk(3, dim=0) if up else (value,) * 3
        for proj, part in zip("qkv", parts):
            out[f"{head}to_{proj}{tail}"] = part.contiguous()
    return out


def peft_alphas(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """A PEFT/diffusers file's `lora_alpha` (kept in its header, not its tensors) as per-layer `.alpha` keys, which
    diffusers' converter then folds into the weights; rsLoRA's alpha/sqrt(r) likewise."""
    text = metadata.get("lora_adapter_metadata")
    if not text or any(k.endswith(".alpha") for k in state_dict):
        return state_dict
    config = json.loads(text)
    if config.get("use_dora"):
        raise ParamError(FIELD, "DoRA adapters are not supported; use a plain LoRA")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ParamError(FIELD, "per-layer alpha_pattern/rank_pattern LoRAs are not supported")
    alpha, rank = config.get("lora_alpha"), config.get("r")
    if alpha is None or (alpha == rank and not config.get("use_rslora")):
        return state_dict
    out = dict(state_dict)
    for key, value in state_dict.items():
        if key.endswith(".lora_A.weight"):
            r = value.shape[0]
            a = alpha * math.sqrt(r) if config.get("use_rslora") else alpha
            out[key.removesuffix(".lora_A.weight") + ".alpha"] = torch.tensor(float(a))
    return out


def to_diffusers(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Any supported layout as diffusers/PEFT keys (`transformer.<module>.lora_A/B.weight`), alphas folded in."""
    from diffusers import ZImagePipeline

    sd = {k: v for k, v in state_dict.items() if not k.endswith(".dora_scale")} if state_dict else {}
    if len(sd) != len(state_dict):
        raise ParamError(FIELD, "DoRA adapters (dora_scale keys) are not supported; use a plain LoRA")
    sd = peft_alphas(sd, metadata or {})
    sd = split_fused_qkv(sd)
    sd = {re.sub(r"\.attention\.out\.(lora_[AB])", r".attention.to_out.0.\1", k): v for k, v in sd.items()}
    # diffusers' and flat (DiffSynth) module paths go under ComfyUI's prefix, so that one converter (alphas, PEFT's
    # `.default.`) reads every layout; without it, flat keys would load nothing and say little.
    if detect_format(sd) in ("diffusers", "diffsynth"):
        sd = {f"diffusion_model.{k.removeprefix('transformer.')}": v for k, v in sd.items()}
    try:
        converted = ZImagePipeline.lora_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ParamError(FIELD, f"unrecognised LoRA keys ({str(err).splitlines()[0][:200]})") from None
    return dict(converted)


@dataclass(frozen=True)
class LoraLayers:
    """A LoRA as the transformer's layers: module path → (lora_A, lora_B), alpha folded into lora_B's side."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    file_format: str
    total: int  # LoRA layers in the file, matched or not


def match_layers(converted: dict[str, torch.Tensor], transformer: torch.nn.Module, name: str, fmt: str) -> LoraLayers:
    """Pair lora_A/lora_B per module and check each names a linear layer of `transformer` with the right shapes;
    any key that does not is refused, naming some of them: never half a LoRA."""
    linears = {}
    for module_name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" not in module_name:  # PEFT's own layers are not targets
            linears[module_name.removesuffix(".base_layer")] = module
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in converted.items():
        found = LORA_KEY.match(key)
        if found:
            pairs.setdefault(found.group(1), {})[found.group(2)] = value
        else:
            stray.append(key)
    weights, unmatched = {}, list(stray)
    for module_name, pair in pairs.items():
        linear = linears.get(module_name)
        a, b = pair.get("A"), pair.get("B")
        ok = (
            linear is not None
            and a is not None
            and b is not None
            and a.ndim == 2
            and b.ndim == 2
            and a.shape == (b.shape[1], linear.in_features)
            and b.shape[0] == linear.out_features
        )
        if ok:
            weights[module_name] = (a, b)
        else:
            unmatched.append(module_name)
    total = len(pairs) + len(stray)
    if unmatched or not weights:
        shown = ", ".join(sorted(unmatched)[:3]) or "none"
        raise ParamError(FIELD, f"{name}: {len(unmatched)} of {total} LoRA layers do not match this Z-Image "
                                f"transformer (layout {fmt}; e.g. {shown}): a LoRA for another model?")  # fmt: skip
    return LoraLayers(weights, fmt, total)


def read_lora(path: Path, transformer: torch.nn.Module, name: str | None = None) -> LoraLayers:
    """Read, convert and check one file against `transformer`."""
    tensors, metadata = read_file(path)
    fmt = detect_format(tensors)
    return match_layers(to_diffusers(tensors, metadata), transformer, name or path.name, fmt)


def peft_state_dict(layers: LoraLayers) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys, what `load_lora_weights` takes (and what `save_peft` writes)."""
    out = {}
    for module_name, (a, b) in layers.weights.items():
        out[f"transformer.{module_name}.lora_A.weight"] = a
        out[f"transformer.{module_name}.lora_B.weight"] = b
    return out


# ------------------------------------------------------------------------------------------ the live set
@dataclass(frozen=True)
class ActiveLora:
    """One LoRA of a request as recorded in metadata."""

    name: str
    strength: float
    sha256: str
    layers: int

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "strength": self.strength, "sha256": self.sha256, "layers": self.layers}


@dataclass
class _Loaded:
    adapter: str
    layers: LoraLayers


@dataclass
class LoadedLoras:
    """The LoRAs loaded into one pipeline's transformer, and the set now applied.

    `fused` picks the way (module docstring): False = PEFT adapters and `set_adapters`; True = deltas added into the
    base weights, originals restored exactly on change (what the compiled modes and 8-bit weights need: no module
    changes)."""

    folder: LoraFolder
    fused: bool = False
    _loaded: OrderedDict[str, _Loaded] = field(default_factory=OrderedDict)  # by file SHA-256
    _applied: tuple[tuple[str, float], ...] = ()  # (sha, strength) now in effect
    _originals: dict[str, torch.Tensor] = field(default_factory=dict)  # fused: module → base weight (CPU copy)
    _requantized: set[str] = field(default_factory=set)  # fused: 8-bit layers now holding a LoRA
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def apply(self, pipe, requested: Iterable[tuple[str, float]]) -> list[ActiveLora]:
        """Bring `pipe`'s transformer to exactly `requested` (name, strength) pairs; returns what is in effect."""
        requested = list(requested)
        # Adapters and weight updates are model state: made outside the generation's inference mode.
        with self._lock, torch.inference_mode(False), torch.no_grad():
            active, wanted = [], {}
            for name, strength in requested:
                file = self.folder.find(name)
                sha = file_sha256(file.path)
                loaded = self._load(pipe, file, sha)
                active.append(ActiveLora(name, float(strength), sha, len(loaded.layers.weights)))
                wanted[sha] = wanted.get(sha, 0.0) + float(strength)  # the same file twice adds up
            target = tuple((sha, s) for sha, s in wanted.items() if s != 0)
            if target != self._applied:
                (self._fuse if self.fused else self._set_adapters)(pipe, target)
                self._applied = target
            return active

    def reset(self, pipe) -> None:
        """Take every LoRA out (base weights back exactly) and unload them: before switching between the ways."""
        with self._lock:
            if self._applied:
                (self._fuse if self.fused else self._set_adapters)(pipe, ())
            if not self.fused and self._loaded:
                pipe.delete_adapters([loaded.adapter for loaded in self._loaded.values()])
            self.forget()

    def unload(self, pipe) -> None:
        """`reset`, and PEFT's wrapper layers taken out of the transformer too: before its layers are quantized."""
        with self._lock:
            self.reset(pipe)
            if any(name.endswith(".base_layer") for name, _ in pipe.transformer.named_modules()):
                pipe.unload_lora_weights()

    def forget(self) -> None:
        """The transformer was replaced (a memory-mode switch reloads it): nothing is loaded into the new one."""
        with self._lock:
            self._loaded.clear()
            self._originals.clear()
            self._requantized.clear()
            self._applied = ()

    # -------------------------------------------------------------------------------- loading
    def _load(self, pipe, file: LoraFile, sha: str) -> _Loaded:
        if sha in self._loaded:
            self._loaded.move_to_end(sha)
            return self._loaded[sha]
        layers = read_lora(file.path, pipe.transformer, file.name)
        adapter = f"lora_{sha[:16]}"
        if not self.fused:
            pipe.load_lora_weights(peft_state_dict(layers), adapter_name=adapter)
        else:  # the factors live beside the weights (rank x width: small), so a switch copies only the originals
            device = next(pipe.transformer.parameters()).device
            layers.weights.update({k: (a.to(device), b.to(device)) for k, (a, b) in layers.weights.items()})
        self._loaded[sha] = _Loaded(adapter, layers)
        log.info("LoRA %s loaded: %d layers (%s layout)", file.name, len(layers.weights), layers.file_format)
        while len(self._loaded) > MAX_LOADED:
            old_sha = next(s for s in self._loaded if s not in dict(self._applied))
            old = self._loaded.pop(old_sha)
            if not self.fused:
                pipe.delete_adapters(old.adapter)
        return self._loaded[sha]

    def _set_adapters(self, pipe, target: tuple[tuple[str, float], ...]) -> None:
        if not target:
            if self._loaded:
                pipe.disable_lora()
            return
        pipe.enable_lora()
        pipe.set_adapters([self._loaded[sha].adapter for sha, _ in target], [s for _, s in target])

    def _fuse(self, pipe, target: tuple[tuple[str, float], ...]) -> None:
        """W = W₀ + Σ strength·B·A for the touched layers, one layer at a time on the weights' device (float32 sums);
        W₀ copied back where no LoRA applies. The originals are kept in pinned host memory on a GPU, so that copying
        them back runs at the bus's full speed. 8-bit layers: the same sum from their bf16 W₀, quantized again."""
        modules = dict(pipe.transformer.named_modules())
        quantized = layers_of(pipe.transformer)
        wanted: dict[str, list[tuple[float, torch.Tensor, torch.Tensor]]] = {}
        for sha, strength in target:
            for module_name, (a, b) in self._loaded[sha].layers.weights.items():
                wanted.setdefault(module_name, []).append((strength, a, b))
        for name in wanted:  # refused before any weight changes
            if is_quantized(modules[name].weight) and (quantized is None or not quantized.has_base(name)):
                raise ParamError(FIELD, f"layer {name} holds 8-bit weights whose bf16 originals cannot be had (no "
                                        "checkpoint file names it); use --memory resident or offload-text")  # fmt: skip
        with torch.no_grad():
            for module_name in list(self._originals):
                if module_name not in wanted:
                    modules[module_name].weight.copy_(self._originals.pop(module_name), non_blocking=True)
            for module_name in list(self._requantized):
                if module_name not in wanted:
                    self._requantize(quantized, modules[module_name], module_name, [])
            for module_name, parts in wanted.items():
                weight = modules[module_name].weight
                if is_quantized(weight):
                    self._requantize(quantized, modules[module_name], module_name, parts)
                    continue
                if module_name not in self._originals:
                    self._originals[module_name] = host_copy(weight)
                weight.copy_(summed(self._originals[module_name], weight.device, parts))

    def _requantize(self, quantized: QuantizedLayers, module: torch.nn.Module, module_name: str,
                    parts: list[tuple[float, torch.Tensor, torch.Tensor]]) -> None:  # fmt: skip
        """An 8-bit layer from its bf16 W₀ (+ the LoRAs' deltas), quantized with the mode's config, written in place."""
        weight = module.weight
        requantize_(weight, summed(quantized.base(module_name), weight.device, parts), quantized.quantize)
        (self._requantized.add if parts else self._requantized.discard)(module_name)


def save_peft(layers: LoraLayers, path: str | os.PathLike) -> Path:
    """Write `layers` as a diffusers/PEFT file (the layout `load_lora_weights` reads without conversion)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in peft_state_dict(layers).items()}, str(path))
    return path
