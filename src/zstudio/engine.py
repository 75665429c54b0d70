"""The resident generator: load once, then validate → encode prompt → prepare latents → denoise → decode → save.

The math of each step is diffusers' `ZImagePipeline`'s (tests hold us to its pixels); what we add is
residency, validation, per-image seeds, skipped work (no padding of prompts to 512 tokens, cached
prompt embeddings) and saving with metadata.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import __version__, control, edit, lora, models, quantized
from .devices import dtype_name, free_memory_bytes, pick_device, pick_dtype
from .memory import (
    EIGHT_BIT,
    NEXT_MODE,
    STREAMED,
    ModelWeights,
    OutOfMemory,
    apply_memory,
    choose_memory,
    choose_text,
    free_after_failure,
    keep_resident_again,
    needed_gb,
    release_resident,
)
from .outputs import EXTENSIONS, encode_image, write_file
from .params import ASPECT_RATIOS, MAX_SEED, PRESETS, GenerationParams, check_choice
from .settings import DEFAULT_MODEL, Settings, load_settings
from .speed import GRAPH_CHOICES, apply_speed, choose_speed
from .speed.control_forward import shared_refiners

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
PROMPT_CACHE_SIZE = 16


class GenerationCancelled(Exception):
    """Raise this from a progress callback to stop a generation at the next step."""


@dataclass
class PromptEmbedding:
    embeds: torch.Tensor  # (tokens, hidden) on the device, in the text encoder's dtype
    num_tokens: int
    truncated: bool


@dataclass
class ImageStart:
    """Where an edit's denoising starts, and what its inpainting blend keeps (diffusers' Img2Img/Inpaint latents)."""

    latents: torch.Tensor  # the source's latents noised to the first timestep
    noise: torch.Tensor  # per image, from its own seed
    image_latents: torch.Tensor  # the source's latents, one VAE sample per image
    mask: torch.Tensor | None  # (1, 1, h, w) at the latents' size, 1 = repaint; None for image-to-image


@dataclass
class ControlHint:
    """A request's control image as the ControlNet takes it (diffusers' ZImageControlNetPipeline), and its range."""

    context: torch.Tensor  # (1, control_in_dim, 1, h, w): the control image's latents, zero-padded
    scale: float
    start: float
    end: float


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    params: GenerationParams  # resolved: defaults filled, seed = the first image's seed
    metadata: list[dict[str, Any]]  # one record per image, as embedded in its file
    timings: dict[str, float] = field(default_factory=dict)


class Generator:
    """One resident Z-Image pipeline; a lock lets one generation use the device at a time."""

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        outputs: str | Path | None = None,
        speed: str | None = None,
        memory: str | None = None,
        settings: Settings | None = None,
        controlnet: str | None = None,
    ):
        self.settings = settings or load_settings()
        self._graphs = check_choice("ZSTUDIO_CUDA_GRAPHS", self.settings.cuda_graphs, GRAPH_CHOICES)
        self.model_spec = model or self.settings.model
        self.device = pick_device(device or self.settings.device)
        self.dtype = pick_dtype(dtype or self.settings.dtype, self.device)
        self.outputs = Path(outputs) if outputs is not None else self.settings.outputs
        requested_speed = speed or self.settings.speed
        self.speed, speed_note = choose_speed(requested_speed, self.device)
        if speed_note:
            log.log(logging.INFO if requested_speed == "auto" else logging.WARNING, speed_note)
        self.memory_requested = memory or self.settings.memory
        self.memory, memory_note = choose_memory(self.memory_requested, self.device, free_memory_bytes(self.device))
        if memory_note:
            log.log(logging.INFO if self.memory_requested == "auto" else logging.WARNING, memory_note)
        self._match_speed_to_memory()
        self.text_placement = "resident"  # where the text encoder lives (zstudio.text_placement), set at load
        self.source: models.ModelSource | None = None
        self.pipe = None
        self.token_encoder = None
        self.load_seconds: float | None = None
        self._lock = threading.RLock()
        self._prompt_cache: OrderedDict[tuple[str, int], PromptEmbedding] = OrderedDict()
        self.upscalers: dict[str, Any] = {}  # zstudio.upscale.Upscaler by file path, loaded on first use
        # Folders whose input files a picture's record names by file name alone (a server's uploads and outputs, which
        # its API accepts by name): the server's own paths never travel inside the pictures it serves.
        self.named_input_folders: set[Path] = set()
        self.loras = lora.LoadedLoras(lora.LoraFolder(self.settings.loras))
        self.controlnet_spec = controlnet or self.settings.controlnet
        self.controlnet_source: control.ControlNetSource | None = None
        self.controlnet = None  # diffusers' ZImageControlNetModel, loaded with the pipeline, beside its transformer

    # ----------------------------------------------------------------------------------------- loading
    def resolve_source(self, download: bool = True) -> models.ModelSource:
        """The model's folder; with no model chosen and the real weights unreachable, the embedded default.
        `download=False` looks only in the cache (what `zstudio info` reports without fetching 33 GB)."""
        if self.source is None:
            if self.model_spec:
                self.source = models.resolve(self.model_spec, self.settings.cache_dir, allow_download=download)
            else:
                try:
                    self.source = models.resolve(DEFAULT_MODEL, self.settings.cache_dir, allow_download=download)
                except models.ModelUnavailableError as err:
                    demo = models.demo_source()
                    log.warning("%s. Running on the embedded demo model instead: it draws simple shapes at "
                                "%s, not Z-Image pictures.", err, demo.profile.sizes_text())  # fmt: skip
                    self.source = demo
        return self.source

    def resolve_controlnet(self) -> control.ControlNetSource | None:
        """The ControlNet's weights on disk (from the HF cache, or downloaded), or None when none was asked for."""
        if self.controlnet_source is None and self.controlnet_spec:
            self.controlnet_source = control.resolve(self.controlnet_spec)
        return self.controlnet_source

    def validate_control(self, params: GenerationParams, source: edit.EditInput | None = None
                         ) -> control.ControlInput | None:  # fmt: skip
        """A request's control image, checked and fitted to its output size before any weights load (the server
        calls this at submit time too). `source`, the request's checked edit, tells an inpaint through the picture's
        transparency (no mask file) from an image-to-image."""
        if params.control is None:
            return None
        controlnet = self.resolve_controlnet()
        sized = self.profile.resolve(params)
        checked = control.validate(params, controlnet, sized.width, sized.height, settings=self.settings)
        control.check_range(params, self._steps_run(sized))
        if params.mask or params.outpaint or (source is not None and source.mask is not None):  # an inpaint: read
            control.check_inpaint_channels(controlnet.name, control.control_in_dim(controlnet))
        return checked

    @staticmethod
    def _steps_run(params: GenerationParams) -> list[int]:
        """How many steps a resolved request may run: an edit runs the schedule's tail (diffusers' get_timesteps);
        without a stated strength, a source without a mask may still be inpainted by its alpha: both counts."""
        steps = params.num_inference_steps
        if params.image is None:
            return [steps]
        if params.strength is not None:
            strengths = [params.strength]
        elif params.mask or params.outpaint:
            strengths = [edit.INPAINT_STRENGTH]
        else:
            strengths = [edit.IMAGE_TO_IMAGE_STRENGTH, edit.INPAINT_STRENGTH]
        return [steps - edit.start_step(steps, strength) for strength in strengths]

    @property
    def graphs(self) -> str:
        """What replays as CUDA graphs: only on CUDA, never with moving weights (graphs pin the memory they recorded
        with)."""
        return self._graphs if self.memory == "resident" and self.device.type == "cuda" else "off"

    @property
    def compile_cache(self) -> Path:
        """Where the compiled modes keep the compiler's caches, so a second start loads instead of compiling."""
        return self.settings.cache_dir / "inductor"

    @property
    def compiled(self) -> bool:
        return self.speed in ("fast", "fastest")

    def _choose_memory_for(self, source: models.ModelSource) -> None:
        """`auto` again, now that the model is known: its own weights and its own image size, not Z-Image's."""
        if self.memory_requested != "auto" or self.device.type != "cuda":
            return
        weights = self.model_weights(source)
        free = free_memory_bytes(self.device)
        p = source.profile
        self.memory, note = choose_memory("auto", self.device, free, p.width, p.height, weights)
        log.info(note)
        self._match_speed_to_memory()

    def model_weights(self, source: models.ModelSource) -> ModelWeights:
        """GiB per component as the memory estimate counts them: the model's files, and a configured ControlNet's."""
        weights = ModelWeights.from_folder(source.path)
        if self.resolve_controlnet() is not None:
            weights = replace(weights, controlnet=control.size_gib(self.controlnet_source))
        return weights

    def _match_speed_to_memory(self) -> None:
        """Compiled speeds run wherever the transformer stays on the GPU (offload-text, 8bit: torchao's 8-bit tensors
        compile, as `fastest` does); streamed blocks run eager (the offloading hooks break the compiled block's
        graph). In 8bit the weights already are 8-bit, so `fastest` is `fast` there."""
        if self.memory in STREAMED and self.compiled:
            log.warning("speed %s does not combine with streamed weights; using exact in memory mode %s",
                        self.speed, self.memory)  # fmt: skip
            self.speed = "exact"
        elif self.memory in EIGHT_BIT and self.speed == "fastest":
            log.info("memory mode %s already holds 8-bit weights: speed fast (compiled) on them", self.memory)
            self.speed = "fast"

    def _stream_budget(self, source: models.ModelSource) -> dict[str, Any]:
        """What memory mode stream keeps room for (its own estimate at the model's size) and the blocks it is told
        to keep resident (ZSTUDIO_RESIDENT_BLOCKS; None: as many as fit beside the estimate)."""
        if self.memory != "stream" or self.device.type != "cuda":
            return {}
        p = source.profile
        return {"reserve_gib": needed_gb("stream", p.width, p.height, self.model_weights(source)),
                "resident": self.settings.resident_blocks}  # fmt: skip

    def _choose_text_placement(self, source: models.ModelSource) -> None:
        """Where the text encoder goes in this memory mode, by the card's free memory and the host's RAM."""
        if self.device.type != "cuda" or self.memory == "resident":
            self.text_placement = "resident"
            return
        weights = self.model_weights(source)
        p = source.profile
        self.text_placement, note = choose_text(self.memory, self.device, free_memory_bytes(self.device), p.width,
                                                p.height, weights)  # fmt: skip
        log.info(note)

    def load(self) -> Generator:
        """Load the weights onto the device once; later calls return at once."""
        with self._lock:
            if self.pipe is None:
                source = self.resolve_source()
                self._choose_memory_for(source)
                self._choose_text_placement(source)
                start = time.perf_counter()
                home = self.device if self.memory == "resident" else torch.device("cpu")
                pipe = models.load_pipeline(source, home, self.dtype)
                controlnet = None
                if self.resolve_controlnet() is not None:
                    controlnet = control.load(self.controlnet_source, self.dtype)
                    # Streamed: the ControlNet's copies of the transformer's parts, taken before its streaming hooks.
                    controlnet = control.attach(controlnet, pipe.transformer, own_copies=self.memory in STREAMED)
                apply_memory(pipe, self.memory, self.device, text=self.text_placement, **self._stream_budget(source))
                self.token_encoder = apply_speed(pipe, self.speed, graphs=self.graphs, cache_dir=self.compile_cache)
                self.pipe = pipe
                if controlnet is not None:
                    self.install_controlnet(controlnet)
                self.load_seconds = time.perf_counter() - start
                log.info(
                    "loaded %s on %s (%s, speed %s, memory %s, text encoder %s) in %.1f s",
                    source.label,
                    self.device,
                    dtype_name(self.dtype),
                    self.speed,
                    self.memory,
                    self.text_placement,
                    self.load_seconds,
                )
        return self

    def install_controlnet(self, controlnet: Any, source: control.ControlNetSource | None = None) -> None:
        """Put a loaded `ZImageControlNetModel` beside the transformer: sharing its embedders and refiners (diffusers'
        `from_transformer`), placed for the memory mode and sped up as the transformer is (`speed_up_controlnet`).
        `source` names weights that did not come from `--controlnet` (the benchmark's random ones)."""
        from .speed import speed_up_controlnet

        if source is not None:
            self.controlnet_source, self.controlnet_spec = source, source.spec
        self.controlnet = control.attach(controlnet, self.pipe.transformer, own_copies=self.memory in STREAMED)
        self._place_controlnet()
        speed_up_controlnet(self.controlnet, self.speed)
        if self.compiled:  # every controlled request encodes its control image
            from .speed.compile import compile_vae_encoder

            compile_vae_encoder(self.pipe.vae)

    def _place_controlnet(self) -> None:
        """The ControlNet where its memory mode keeps it: resident in bf16 beside the transformer (resident,
        offload-text, and 8bit: its hints are added to the transformer's activations, so they stay as trained), or
        streamed block by block like the transformer (stream, lowest)."""
        if self.memory in STREAMED and self.device.type == "cuda":
            from .memory import stream_weights

            stream_weights(self.controlnet, self.device, leaf=self.memory == "lowest", low_ram=self.memory == "lowest")
        else:
            self.controlnet.to(self.device)

    def warmup(self, sizes: tuple[tuple[int, int], ...] | None = None) -> float:
        """Unsaved generations before the first request, so that no request pays for compiling or allocating.

        The compiled modes run one step at every size the studio offers (`sizes`, default: the presets and aspect
        ratios), batches of 1-4 and a guided request (an attention mask), and each text-encoder bucket: all the graph
        variants a request can meet. Other modes make one image at the model's size."""
        self.load()
        start = time.perf_counter()
        p = self.profile
        if not self.compiled:
            runs = [GenerationParams(prompt="warm-up", width=p.width, height=p.height, seed=0)]
        else:
            runs = warmup_runs(sizes or offered_sizes(p), (p.width, p.height))
            for length in getattr(self.token_encoder, "buckets", ()):
                for _ in range(2):  # the first call of a bucket captures its CUDA graph, the second replays it
                    with torch.inference_mode():  # as in a generation: grad mode is part of the compiled graph's key
                        self.token_encoder([self.pipe.tokenizer.pad_token_id or 0] * length, self.device)
                log.info("warm-up: text encoder at %d tokens (%.1f s so far)", length, time.perf_counter() - start)
        if self.controlnet is not None and self.compiled:
            self._warm_vae_encoder(sizes or offered_sizes(p), (p.width, p.height))
            runs += control_warmup_runs(runs, self._warmup_control_image(p.width, p.height))
        for i, params in enumerate(runs, 1):
            log.info("warm-up %d/%d: %dx%d, batch %d%s%s", i, len(runs), params.width, params.height,
                     params.num_images, ", guided" if params.cfg_scale else "",
                     ", controlled" if params.control else "")  # fmt: skip
            self.generate_images(params)
        seconds = time.perf_counter() - start
        log.info("warmed up (%d runs) in %.1f s", len(runs), seconds)
        return seconds

    def _warm_vae_encoder(self, sizes: list[tuple[int, int]], default: tuple[int, int]) -> None:
        """The compiled VAE encoder (with a ControlNet) at a non-square size first, then the default one: one
        graph with width and height as separate symbols then serves every size (compiled at a square size first,
        the first non-square one would compile again, as the decoder did)."""
        vae = self.pipe.vae
        for width, height in [next((s for s in sizes if s[0] != s[1]), default), default]:
            with torch.inference_mode():
                vae.encode(torch.zeros(1, 3, height, width, device=self.device, dtype=vae.dtype))
        log.info("warm-up: VAE encoder")

    def _warmup_control_image(self, width: int, height: int) -> str:
        """A plain grey control image for the warm-up's controlled runs (what it shows does not matter to the
        compiler: only shapes do)."""
        path = self.settings.cache_dir / "inputs" / f"warmup-control-{width}x{height}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (width, height), (128, 128, 128)).save(path)
        return str(path)

    @classmethod
    def from_pipeline(cls, pipe, source: models.ModelSource, speed: str = "eager", **kwargs: Any) -> Generator:
        """Wrap components already in memory (the benchmark's random full-size model, say) without loading."""
        generator = cls(
            model=str(source.path),
            device=str(pipe.transformer.device),
            dtype=dtype_name(pipe.transformer.dtype),
            speed=speed,
            **kwargs,
        )
        generator.source = source
        generator.token_encoder = apply_speed(
            pipe, generator.speed, graphs=generator.graphs, cache_dir=generator.compile_cache
        )
        generator.pipe = pipe
        return generator

    @property
    def profile(self) -> models.Profile:
        return self.resolve_source().profile

    def info(self) -> dict[str, Any]:
        source = self.source
        return {
            "model": source.label if source else self.model_spec or DEFAULT_MODEL,
            "model_path": str(source.path) if source else None,
            "embedded_default": bool(source and source.embedded),
            "profile": source.profile.name if source else None,
            "sizes": source.profile.sizes_text() if source else None,
            "loaded": self.pipe is not None,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "speed": self.speed,
            "memory_mode": self.memory,
            "text_encoder": self.text_placement,
            "controlnet": self.controlnet_spec,
            "outputs": str(self.outputs),
        }

    # -------------------------------------------------------------------------------------- public API
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        cfg_scale: float | None = None,
        num_images: int = 1,
        seed: int = -1,
        max_sequence_length: int = 512,
        output_format: str = "png",
        progress: ProgressCallback | None = None,
        output_dir: str | Path | None = None,
        **extra: Any,
    ) -> tuple[list[str], float, dict[str, Any]]:
        """Generate and save; returns (output_paths, gen_time_seconds, metadata) as the earlier WebUI did.

        Edits take `image=` and `mask=` as paths or PIL images (stored as PNG files under the cache folder, so the
        parameters stay JSON), `strength=`, `outpaint=` and `mask_blur=`: see `zstudio.edit`."""
        extra = edit.store_inputs(extra, self.settings.cache_dir / "inputs")
        params = GenerationParams.from_dict(
            dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                num_inference_steps=num_inference_steps,
                cfg_scale=cfg_scale,
                num_images=num_images,
                seed=seed,
                max_sequence_length=max_sequence_length,
                output_format=output_format,
                **extra,
            )
        )
        result = self.generate_images(params, progress=progress)
        start = time.perf_counter()
        paths = self.save(result, output_dir)
        result.timings["save"] = round(time.perf_counter() - start, 4)
        summary = {
            "seeds": result.seeds,
            "seed": result.seeds[0],
            "params": result.params.to_dict(),
            "timings": result.timings,
            "images": result.metadata,
        }
        return [str(p) for p in paths], result.timings["total"], summary

    def generate_images(self, params: GenerationParams, progress: ProgressCallback | None = None) -> GenerationResult:
        """Generate without saving: PIL images, the seeds used and each image's metadata.

        Out of GPU memory, the failed run's memory is freed; in memory mode stream with resident blocks it is retried
        once with every block streamed (the same pixels); then in auto memory mode the next lower mode is put in
        place and the generation retried once, otherwise `OutOfMemory` names the mode that would fit.
        """
        source = edit.validate(params, self.profile)  # an edit's files, checked before the weights load
        if source is not None:
            params = source.params
        control_input = self.validate_control(params, source)
        if control_input is not None:
            params = params.replace(control=str(Path(params.control).resolve()))  # remade from any folder
        self.load()
        params = lora.take_prompt_loras(params)  # `<lora:name:0.8>` tags leave the prompt for params.loras
        params = self.profile.resolve(params)  # the model's defaults; refuses sizes it cannot draw
        with self._lock:
            if (result := self._attempt(params, progress, source, control_input)) is not None:
                return result
            if self.memory == "stream" and (released := release_resident(self.pipe.transformer, self.device)):
                log.warning("out of GPU memory at %dx%d in memory mode stream; retrying once with every transformer "
                            "block streamed (%d were resident)", params.width, params.height, released)  # fmt: skip
                free_after_failure(self.device)
                if (result := self._attempt(params, progress, source, control_input)) is not None:
                    return result
            lower = NEXT_MODE[self.memory]
            where = f"{params.width}x{params.height} in memory mode {self.memory}"
            if lower is None:
                raise OutOfMemory(f"out of GPU memory at {where}, the lowest mode; try a smaller size")
            if self.memory_requested != "auto":
                raise OutOfMemory(f"out of GPU memory at {where}; memory mode {lower} needs less: use --memory {lower}")
            log.warning("out of GPU memory at %s; retrying once in memory mode %s", where, lower)
            try:
                self.switch_memory(lower)
            except torch.cuda.OutOfMemoryError:
                failed = True  # freed after the except block, where the traceback no longer pins tensors
            else:
                failed = False
            if failed:
                free_after_failure(self.device)
                raise OutOfMemory(f"out of GPU memory at {where}, and again while moving to memory mode {lower}; "
                                  f"restart with --memory {lower} or lower")  # fmt: skip
            if (result := self._attempt(params, progress, source, control_input)) is not None:
                return result
            raise OutOfMemory(f"out of GPU memory at {where} and again in memory mode {self.memory}; "
                              "try a smaller size")  # fmt: skip

    def _attempt(self, params: GenerationParams, progress: ProgressCallback | None,
                 source: edit.EditInput | None = None, control_input: control.ControlInput | None = None
                 ) -> GenerationResult | None:  # fmt: skip
        """One generation; None after running out of GPU memory, with what it held given back.

        The freeing happens after the `except` block: until then the error's traceback keeps the failed run's
        tensors alive."""
        try:
            return self._generate_images(params, progress, source, control_input)
        except torch.cuda.OutOfMemoryError:
            pass
        free_after_failure(self.device)
        return None

    def switch_memory(self, mode: str) -> None:
        """Move a loaded pipeline down to a lower memory mode (never up: that needs a restart)."""
        with self._lock:
            from .speed.compile import drop_graphs, uncompile

            uncompile(self.pipe.transformer)  # lower modes run uncompiled
            if self.controlnet is not None:
                uncompile(self.controlnet)
            if self.device.type == "cuda":
                drop_graphs()
            if self.compiled:  # compiling again inside a recovering request, on a card that just ran out: not now
                log.warning("after switching to memory mode %s the transformer runs uncompiled (speed exact) until "
                            "a restart", mode)  # fmt: skip
                self.speed = "exact"
            self.memory = mode
            self._match_speed_to_memory()
            if getattr(self.pipe.transformer, "_zstudio_8bit", None) and mode not in EIGHT_BIT:
                log.info("reloading the transformer's bf16 weights for memory mode %s", mode)
                self.pipe.transformer = None
                self.loras.forget()
                free_after_failure(self.device)
                self.pipe.transformer = models.load_transformer(self.resolve_source(), self.dtype)
                apply_speed(self.pipe, self.speed, graphs="off")
            if mode in EIGHT_BIT and not getattr(self.pipe.transformer, "_zstudio_8bit", None):
                self.loras.unload(self.pipe)  # quantize the base weights: no LoRA fused in, no PEFT wrappers
                # Quantize from host memory one layer at a time: quantizing in place on the GPU needs room for
                # the 8-bit copy of a layer beside all the bf16 weights, which a card that just ran out lacks.
                self.pipe.transformer.to("cpu")
                free_after_failure(self.device)
            if self.controlnet is not None:  # shared again with a reloaded transformer, or copied before streaming
                self.controlnet = control.attach(self.controlnet, self.pipe.transformer, own_copies=mode in STREAMED)
            text_before = self.text_placement
            self.text_placement = self._text_placement_after_switch(mode)
            apply_memory(self.pipe, mode, self.device, text=self.text_placement,
                         **self._stream_budget(self.resolve_source()))  # fmt: skip
            if self.controlnet is not None:
                self._place_controlnet()
            if self.token_encoder is not None and (self.token_encoder.graphs or self.text_placement != text_before):
                from .speed.text_encoder import TokenEncoder

                self.token_encoder = TokenEncoder(self.pipe.text_encoder)
            free_after_failure(self.device)

    def _text_placement_after_switch(self, mode: str) -> str:
        """The text encoder in a lower mode: an int8 one stays on the GPU down to 8bit; the streamed modes stream
        bf16 (reloaded from the model's files: diffusers' streaming is not tested here on torchao tensors)."""
        from .text_placement import default_placement, module_gib

        if self.device.type != "cuda":
            return "resident"
        eight_bit = getattr(self.pipe.text_encoder, "_zstudio_8bit", None)
        if eight_bit and mode not in STREAMED:
            return "resident-8bit"
        if eight_bit:
            log.info("reloading the text encoder's bf16 weights to stream them in memory mode %s", mode)
            self.pipe.text_encoder = None
            self._prompt_cache.clear()
            free_after_failure(self.device)
            self.pipe.text_encoder = models.load_text_encoder(self.resolve_source(), self.dtype)
        pinned_transformer = module_gib(self.pipe.transformer) if mode == "stream" else 0.0  # made after this
        return default_placement(mode, self.device, module_gib(self.pipe.text_encoder), pinned_transformer)

    def _generate_images(self, params: GenerationParams, progress: ProgressCallback | None,
                         source: edit.EditInput | None = None, control_input: control.ControlInput | None = None
                         ) -> GenerationResult:  # fmt: skip
        with torch.inference_mode():
            start = time.perf_counter()
            seeds = self.pick_seeds(params)
            params = params.replace(seed=seeds[0])
            guided = params.cfg_scale > 0

            loras = self.apply_loras(params)
            cond = self.encode_prompt(params.prompt, params.max_sequence_length)
            uncond = self.encode_prompt(params.negative_prompt, params.max_sequence_length) if guided else None
            t_encoded = time.perf_counter()

            latents = self.prepare_latents(seeds, params.height, params.width)
            strength = params.strength if source is not None else 1.0
            timesteps = self.prepare_timesteps(params.num_inference_steps, latents, strength)
            image_start = self.encode_image(source, seeds, timesteps) if source is not None else None
            control_inpaint = control_input is not None and source is not None and source.mask is not None
            if control_inpaint:
                image_start = self.control_inpaint_start(image_start, strength)
            if image_start is not None:
                latents = image_start.latents  # an edit starts from its noised source, not from pure noise
            hint = None
            if control_input is not None:
                hint = self.encode_control(control_input, params, source if control_inpaint else None)
            latents = self.denoise(latents, timesteps, cond, uncond, params, progress, image_start, hint)
            self._sync()
            t_denoised = time.perf_counter()

            images = self.decode(latents)
            if source is not None:
                images = [source.overlay(image) for image in images]
            self._sync()
            end = time.perf_counter()

        timings = {
            "encode": round(t_encoded - start, 4),
            "denoise": round(t_denoised - t_encoded, 4),
            "decode": round(end - t_denoised, 4),
            "total": round(end - start, 4),
        }
        metadata = [self.image_metadata(params, seeds, i, cond, timings) for i in range(len(images))]
        if source is not None:
            for meta in metadata:
                meta["transformer_evaluations"] = len(timesteps)  # a strength below 1 skips the first steps
                meta["edit"] = source.recipe
        if control_input is not None:
            for meta in metadata:
                meta["control"] = control_input.recipe
        for record in metadata:
            record["loras"] = [a.describe() for a in loras]
        return GenerationResult(images=images, seeds=seeds, params=params, metadata=metadata, timings=timings)

    def save(self, result: GenerationResult, output_dir: str | Path | None = None) -> list[Path]:
        """Write each image with its record inside; files are complete and named in batch order on return.

        A batch's images are encoded in parallel (Pillow's encoder releases the GIL), then written in order."""
        directory = Path(output_dir) if output_dir is not None else self.outputs
        fmt, png_encoder = result.params.output_format, self.settings.png_encoder
        pairs = list(zip(result.images, result.metadata))
        if len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=min(len(pairs), 4)) as pool:
                blobs = list(pool.map(lambda pair: encode_image(pair[0], pair[1], fmt, png_encoder), pairs))
        else:
            blobs = [encode_image(image, meta, fmt, png_encoder) for image, meta in pairs]
        return [write_file(blob, directory, EXTENSIONS[fmt]) for blob in blobs]

    def upscale(self, image: str | Path, scale: float = 2.0, model: str | None = None, tile: int | None = None,
                refine: float | None = None, output_dir: str | Path | None = None, search: tuple = ()
                ) -> Any:  # fmt: skip
        """Upscale an image file (a spandrel model by path or name, or Lanczos) and save it with its recipe; with
        `refine`, re-render it at the larger size by image-to-image. Returns a zstudio.upscale.UpscaleResult."""
        from .upscale import run_upscale

        with self._lock:  # one model on the device at a time; image-to-image takes the same (re-entrant) lock
            return run_upscale(self, image, scale, model, tile, refine, output_dir, (*search, *self.settings.upscalers))

    # ------------------------------------------------------------------------------ generation steps
    @staticmethod
    def pick_seeds(params: GenerationParams) -> list[int]:
        """Image i of a batch uses seed+i, so any one image can be re-made alone with its own seed."""
        first = params.seed if params.seed != -1 else secrets.randbelow(MAX_SEED + 2 - params.num_images)
        return [first + i for i in range(params.num_images)]

    def apply_loras(self, params: GenerationParams) -> list[lora.ActiveLora]:
        """Bring the transformer to the request's LoRA set (loaded once per file, then switched by strengths; fused
        into the weights in the compiled modes, so no graph changes, and wherever the weights are 8-bit: fused into
        each layer's bf16 weights and quantized again, `zstudio.quantized`)."""
        fused = self.compiled or quantized.layers_of(self.pipe.transformer) is not None
        if self.loras.fused != fused:
            self.loras.reset(self.pipe)
            self.loras.fused = fused
        active = self.loras.apply(self.pipe, params.loras)
        if self.memory == "stream":  # an adapter change made diffusers stream every block again
            keep_resident_again(self.pipe.transformer, self.device)
        return active

    def encode_prompt(self, text: str, max_sequence_length: int) -> PromptEmbedding:
        """Qwen3's second-to-last hidden states of the chat-wrapped prompt, without padding.

        diffusers pads every prompt to `max_sequence_length` and then drops the padding; under the causal
        mask right padding cannot change the kept states, so we skip it, or pad only to a bucket length in the
        CUDA-graph modes (tests prove both equalities). Repeated prompts come from a small cache.
        """
        key = (text, max_sequence_length)
        if key in self._prompt_cache:
            self._prompt_cache.move_to_end(key)
            return self._prompt_cache[key]
        tokenizer = self.pipe.tokenizer
        wrapped = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        full_ids = tokenizer(wrapped, truncation=False).input_ids
        ids = full_ids[:max_sequence_length]
        hidden = self.token_encoder(ids, self.device)
        embedding = PromptEmbedding(hidden, num_tokens=len(ids), truncated=len(full_ids) > max_sequence_length)
        self._prompt_cache[key] = embedding
        if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return embedding

    def prepare_latents(self, seeds: list[int], height: int, width: int) -> torch.Tensor:
        """Float32 noise drawn on the CPU from each image's own seed: the same on every device."""
        scale = self.pipe.vae_scale_factor * 2
        shape = (1, self.pipe.transformer.config.in_channels, 2 * (height // scale), 2 * (width // scale))
        noise = [
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds
        ]
        return torch.cat(noise).to(self.device)

    def prepare_timesteps(self, num_inference_steps: int, latents: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The pipeline's sigma schedule: linear from 1 to 1/N, shifted by the scheduler (shift 3 for Turbo). An edit
        at `strength` < 1 runs only its last steps, as diffusers' img2img `get_timesteps` cuts them."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

        scheduler = self.pipe.scheduler
        config = scheduler.config
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        first = edit.start_step(num_inference_steps, strength)
        scheduler.set_begin_index(first)
        return scheduler.timesteps[first:]

    def encode_image(self, source: edit.EditInput, seeds: list[int], timesteps: torch.Tensor) -> ImageStart:
        """An edit's start, as diffusers' ZImageImg2ImgPipeline/ZImageInpaintPipeline make it: the VAE encodes the
        canvas once; each image draws, from its own seed on the CPU, first its latent sample, then its noise; the
        scheduler's `scale_noise` mixes them at the first timestep."""
        vae = self.pipe.vae
        distribution = vae.encode(source.pixels(self.device).to(vae.dtype)).latent_dist
        image_latents, noise = [], []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            sample = distribution.sample(generator).float()
            image_latents.append((sample - vae.config.shift_factor) * vae.config.scaling_factor)
            noise.append(torch.randn(sample.shape, generator=generator, dtype=torch.float32))
        image_latents = torch.cat(image_latents)
        noise = torch.cat(noise).to(self.device)
        latents = self.pipe.scheduler.scale_noise(image_latents, timesteps[:1].repeat(len(seeds)), noise)
        mask = source.latent_mask(noise.shape[-2:]).to(self.device) if source.mask is not None else None
        return ImageStart(latents=latents, noise=noise, image_latents=image_latents, mask=mask)

    def encode_control(self, control_input: control.ControlInput, params: GenerationParams,
                       inpaint: edit.EditInput | None = None) -> ControlHint:  # fmt: skip
        """The control image through the VAE once, as diffusers' ZImageControlNetPipeline does: its image processor,
        the latent distribution's mode, shift and scale, then zeros up to the ControlNet's `control_in_dim` (the
        inpainting channels of Union 2.x). With `inpaint` (an edit with a mask) those channels carry what
        ZImageControlNetInpaintPipeline puts there: the kept area (1 - mask, at the latents' size) and the latents of
        the picture with the repainted area blacked out."""
        from diffusers.image_processor import VaeImageProcessor

        pixels = edit.image_pixels(control_input.image, self.device)  # its image processor's arithmetic, on the GPU
        latents = self.control_latents(pixels)
        missing = self.controlnet.config.control_in_dim - latents.shape[1]
        if inpaint is not None and missing == 1 + latents.shape[1]:
            keep = 1 - inpaint.latent_mask(latents.shape[-2:]).to(self.device, latents.dtype)
            binarise = VaeImageProcessor(vae_scale_factor=edit.LATENT_SCALE // 2, do_normalize=False,
                                         do_binarize=True, do_convert_grayscale=True)  # fmt: skip
            mask = binarise.preprocess(inpaint.mask, height=pixels.shape[-2], width=pixels.shape[-1])
            masked = self.control_latents(inpaint.pixels(self.device) * (mask.to(self.device) < 0.5))
            latents = torch.cat([latents, keep.unsqueeze(2), masked], dim=1)
        elif inpaint is not None:
            control.check_inpaint_channels(self.controlnet_spec, self.controlnet.config.control_in_dim)
        elif missing > 0:
            latents = torch.cat([latents, latents.new_zeros(latents.shape[0], missing, *latents.shape[2:])], dim=1)
        return ControlHint(latents, params.control_scale, params.control_start, params.control_end)

    def control_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] to the ControlNet's latents: the VAE's mode, shifted and scaled, with a frame axis."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).unsqueeze(2)

    @staticmethod
    def control_inpaint_start(image_start: ImageStart, strength: float) -> ImageStart | None:
        """Inpainting with control follows diffusers' ZImageControlNetInpaintPipeline: the ControlNet gets the mask
        and the kept picture (`encode_control`), and the latents are not blended with the source between steps. At
        strength 1 (the inpainting default) denoising starts from pure noise, as that pipeline does; below 1 from the
        noised source (image-to-image). The kept area is pasted back after decoding (`EditInput.overlay`)."""
        if strength >= 1.0:
            return None
        image_start.mask = None
        return image_start

    def denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: PromptEmbedding,
        uncond: PromptEmbedding | None,
        params: GenerationParams,
        progress: ProgressCallback | None = None,
        start: ImageStart | None = None,
        hint: ControlHint | None = None,
    ) -> torch.Tensor:
        """Euler flow-matching steps. With cfg > 0 the negative prompt runs as a second batch rather than in the same
        one: prompts of different lengths in one batch need an attention mask, another graph for the compiler.
        Inpainting (`start` with a mask) puts the source back outside the mask after every step, noised to the next
        step's level with the same noise, as ZImageInpaintPipeline does. With a control `hint`, every transformer
        evaluation inside [start, end) of the schedule adds the ControlNet's hints (diffusers' ControlNet rule);
        outside it, or at scale 0, the ControlNet is skipped: hints times 0 would add exactly nothing."""
        batch = latents.shape[0]
        t_norms = ((1000 - timesteps.float()) / 1000).tolist()
        for i, t in enumerate(timesteps):
            guidance = params.cfg_scale if t_norms[i] <= params.cfg_truncation else 0.0
            model_latents = list(latents.to(self.pipe.transformer.dtype).unsqueeze(2).unbind(0))
            timestep = (1000 - t.expand(batch)) / 1000
            scale = hint.scale if hint is not None and control.active(params, i, len(timesteps)) else 0.0
            step_hint = hint if scale > 0 else None
            velocity = self.velocity(model_latents, timestep, cond, step_hint)
            if uncond is not None and guidance > 0:
                negative = self.velocity(model_latents, timestep, uncond, step_hint)
                velocity = self.apply_guidance(velocity, negative, guidance, params.cfg_normalization)
            latents = self.pipe.scheduler.step(-velocity, t, latents, return_dict=False)[0]
            if start is not None and start.mask is not None:
                kept = start.image_latents
                if i < len(timesteps) - 1:
                    kept = self.pipe.scheduler.scale_noise(kept, timesteps[i + 1 : i + 2], start.noise)
                latents = (1 - start.mask) * kept + start.mask * latents
            if progress is not None:
                progress(i + 1, len(timesteps))
        return latents

    def velocity(self, latents: list[torch.Tensor], timestep: torch.Tensor, prompt: PromptEmbedding,
                 hint: ControlHint | None = None) -> torch.Tensor:  # fmt: skip
        """One transformer evaluation for a batch sharing one prompt, with the ControlNet's hints when `hint` is
        given; float32, and a copy (graph replays reuse the output buffer)."""
        prompts = [prompt.embeds] * len(latents)
        samples = None
        if hint is not None:
            context = hint.context.to(self.controlnet.dtype).expand(len(latents), *hint.context.shape[1:])
            samples = self.controlnet(latents, timestep, prompts, context, conditioning_scale=hint.scale)
        transformer = self.pipe.transformer
        with shared_refiners(transformer, self.controlnet):  # what the ControlNet's forward refined already
            out = transformer(latents, timestep, prompts, controlnet_block_samples=samples, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    @staticmethod
    def apply_guidance(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float) -> torch.Tensor:
        """Z-Image's CFG: pos + scale·(pos − neg), optionally capping each image's norm at `normalization`·|pos|."""
        pred = pos + scale * (pos - neg)
        if normalization > 0:
            pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)
            pred_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
            limit = pos_norm * normalization
            factor = torch.where(pred_norm > limit, limit / pred_norm, torch.ones_like(pred_norm))
            pred = pred * factor.view(-1, *([1] * (pred.dim() - 1)))
        return pred

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """The VAE decode, then diffusers' postprocessing (denormalise in the VAE's dtype, x255, round) done on the
        device, so a quarter of the bytes (uint8, not float32) cross to the host."""
        vae = self.pipe.vae
        # Contiguous: the inpainting blend can leave other strides, and strides are part of the compiled decoder's key.
        latents = (latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor).contiguous()
        # One image at a time: the same pixels, one compiled decoder graph for every batch size, a lower peak.
        pixels = torch.cat([vae.decode(one, return_dict=False)[0] for one in latents.split(1)])
        pixels = (pixels * 0.5 + 0.5).clamp(0, 1).float().mul(255).round().to(torch.uint8)
        return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]

    # ---------------------------------------------------------------------------------------- helpers
    def image_metadata(
        self, params: GenerationParams, seeds: list[int], index: int, cond: PromptEmbedding, timings: dict
    ) -> dict[str, Any]:
        """Everything needed to re-make image `index` alone: its own seed with num_images = 1."""
        source = self.resolve_source()
        scheduler = self.pipe.scheduler
        return {
            "software": f"zstudio {__version__}",
            "model": {
                "name": source.label,
                "spec": source.spec,
                "path": str(source.path),
                "revision": source.revision,
                "profile": source.profile.name,
            },
            "params": self._public_inputs(params.replace(seed=seeds[index], num_images=1).to_dict()),
            # Steps count transformer evaluations (diffusers >= 0.42); with CFG each also carries the negative prompt.
            "transformer_evaluations": params.num_inference_steps,
            "batch": {"index": index, "size": len(seeds), "seeds": seeds},
            "scheduler": {
                "name": type(scheduler).__name__,
                "shift": float(scheduler.config.get("shift", 1.0)),
            },
            "prompt_tokens": cond.num_tokens,
            "prompt_truncated": cond.truncated,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "speed": self.speed,
            "memory_mode": self.memory,
            "text_encoder": self.text_placement,  # resident-8bit: int8 embeddings, near but not equal to bf16
            "seconds": timings["total"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _public_inputs(self, record: dict[str, Any]) -> dict[str, Any]:
        for name in ("image", "mask", "control"):
            if record.get(name) and Path(record[name]).parent in self.named_input_folders:
                record[name] = Path(record[name]).name
        return record

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def offered_sizes(profile: models.Profile) -> list[tuple[int, int]]:
    """The sizes the studio offers for a model: its own, then the presets and aspect ratios (Z-Image's range)."""
    sizes = [(profile.width, profile.height)]
    if profile.width >= 512:
        sizes += [s for s in (*PRESETS.values(), *ASPECT_RATIOS.values()) if s not in sizes]
    return sizes


def warmup_runs(sizes: list[tuple[int, int]], default: tuple[int, int]) -> list[GenerationParams]:
    """One step at each size, then batches 2-4 and a guided request with a longer negative prompt."""
    one_step = {"prompt": "warm-up", "num_inference_steps": 1, "seed": 0}
    # A non-square size first: compiled at a square size, width and height share one symbol, and the first
    # non-square size compiles everything again (65 s of the first start on the H100, docs/BENCHMARKS.md).
    sizes = sorted(sizes, key=lambda size: size[0] == size[1])
    runs = [GenerationParams(**one_step, width=w, height=h) for w, h in sizes]
    width, height = default
    runs += [GenerationParams(**one_step, width=width, height=height, num_images=n) for n in (2, 3, 4)]
    guided = {**one_step, "cfg_scale": 2.0, "negative_prompt": "a longer negative prompt " * 4}
    runs += [GenerationParams(**guided, width=width, height=height, num_images=n) for n in (1, 2)]
    return runs


def control_warmup_runs(runs: list[GenerationParams], image: str) -> list[GenerationParams]:
    """The warm-up's runs at the default size again with a control image: batch 1 to 4, and guided (the ControlNet's
    block variants; its shapes are symbolic, so one size covers the others)."""
    first = runs[0] if len(runs) == 1 else next(r for r in runs if r.num_images > 1)
    size = {"width": first.width, "height": first.height}
    same = [r for r in runs if (r.width, r.height) == (size["width"], size["height"])]
    return [r.replace(control=image) for r in same]


_generator: Generator | None = None
_generator_lock = threading.Lock()


def get_generator(
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    outputs: str | Path | None = None,
    speed: str | None = None,
) -> Generator:
    """The process-wide generator, created on first use; asking for another model or device replaces it."""
    global _generator
    with _generator_lock:
        wanted = (model, device, dtype, outputs, speed)
        if _generator is None or (any(w is not None for w in wanted) and not _matches(_generator, *wanted)):
            _generator = Generator(model=model, device=device, dtype=dtype, outputs=outputs, speed=speed)
        return _generator


def _matches(gen: Generator, model, device, dtype, outputs, speed) -> bool:
    return (
        (model is None or model == gen.model_spec)
        and (device is None or pick_device(device) == gen.device)
        and (dtype is None or pick_dtype(dtype, gen.device) == gen.dtype)
        and (outputs is None or Path(outputs) == gen.outputs)
        and (speed is None or choose_speed(speed, gen.device)[0] == gen.speed)
    )
