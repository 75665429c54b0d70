"""The upscaler: random-weight networks of real architectures, saved in their released files' layout and loaded back
through spandrel's own detection; tiling, refusals, the recipe in the PNG and the CLI."""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from zstudio.bench.upscale import main as bench_main
from zstudio.bench.upscale import realesrgan_state_dict
from zstudio.cli import main
from zstudio.engine import Generator
from zstudio.outputs import encode_image, read_metadata
from zstudio.params import ParamError
from zstudio.upscale import (
    TORCHVISION_NAMES,
    UpscaleLimits,
    find_upscalers,
    import_spandrel,
    load_upscaler,
    open_source,
)

# A receptive field the margin must cover: the tiny RRDBNet (1 block) has 1 + 15 + 1 convs of 3x3 at the input's
# resolution and four more after upsampling (1.25 input pixels): 18.25 px, so 20 crops every seam away.
TINY_MARGIN = 20


def write_realesrgan(folder: Path, scale: int, suffix: str, name: str | None = None) -> Path:
    """Real-ESRGAN x{scale}plus's layout: a .pth holds {"params_ema": ...}; a .safetensors the flat dict."""
    state = realesrgan_state_dict(blocks=1, features=8, scale=scale, seed=scale)
    path = folder / f"{name or f'RealESRGAN_x{scale}plus'}{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state["params_ema"].items()}, str(path))
    return path


def write_swinir(folder: Path, suffix: str) -> Path:
    """A small classical-SR SwinIR x2 (pixelshuffle upsampler); released files hold {"params": ...}."""
    import_spandrel()
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    net = SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0,
                 upscale=2, img_range=1.0, upsampler="pixelshuffle", resi_connection="1conv")  # fmt: skip
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = folder / f"001_classicalSR_SwinIR_tiny_x2{suffix}"
    if suffix == ".pth":
        torch.save({"params": state}, path)
    else:
        save_file(state, str(path))
    return path


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    write_realesrgan(folder, 4, ".pth")
    write_realesrgan(folder, 2, ".safetensors")
    return folder


@pytest.fixture
def draft(tmp_path) -> Path:
    """A 24x16 PNG with a zstudio record inside, as `zstudio generate` writes them."""
    meta = {
        "software": "zstudio test",
        "model": {"name": "demo", "path": "/nowhere"},
        "scheduler": {"shift": 3.0},
        "params": {
            "prompt": "a red circle",
            "negative_prompt": "",
            "width": 24,
            "height": 16,
            "seed": 7,
            "num_inference_steps": 4,
            "cfg_scale": 0.0,
            "output_format": "png",
        },  # fmt: skip
    }
    path = tmp_path / "draft.png"
    path.write_bytes(encode_image(noise(24, 16), meta, "png"))
    return path


# ------------------------------------------------------------------------------------------------ loading, scale
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("scale", [2, 4])
def test_realesrgan_files_load_through_spandrel_and_give_their_scale(tmp_path, scale, suffix):
    upscaler = load_upscaler(write_realesrgan(tmp_path, scale, suffix))
    assert (upscaler.architecture, upscaler.scale) == ("ESRGAN", scale)
    out = upscaler.upscale(noise(12, 8), scale, tile=0)
    assert out.size == (12 * scale, 8 * scale)
    assert np.asarray(out).std() > 1  # a network ran: not a constant (clamped) picture


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_swinir_files_load_through_spandrel_and_upscale_2x(tmp_path, suffix):
    upscaler = load_upscaler(write_swinir(tmp_path, suffix))
    assert (upscaler.architecture, upscaler.scale) == ("SwinIR", 2)
    assert upscaler.upscale(noise(20, 12), 2.0, tile=0).size == (40, 24)  # not a multiple of the window: padded


@pytest.mark.parametrize(
    ("name", "size"), [("RealESRGAN_x4plus.pth", (64, 10)), ("RealESRGAN_x2plus.safetensors", (12, 64))]
)
def test_tiled_equals_untiled_within_one_level_once_the_margin_covers_the_receptive_field(models, name, size):
    """64 px cut in tiles of 16 with 20 px margins: the inner tiles see only part of the picture."""
    upscaler = load_upscaler(models / name)
    image = noise(*size)
    whole = np.asarray(upscaler.upscale(image, upscaler.scale, tile=0)).astype(int)
    tiled = np.asarray(upscaler.upscale(image, upscaler.scale, tile=16, margin=TINY_MARGIN)).astype(int)
    assert np.abs(whole - tiled).max() <= 1
    seams = np.asarray(upscaler.upscale(image, upscaler.scale, tile=16, margin=0)).astype(int)
    assert np.abs(whole - seams).max() > 1  # without the margin the tiles show: the test above does tile


def test_a_4x_model_asked_for_2x_runs_at_4x_then_lanczos_down(models):
    upscaler = load_upscaler(models / "RealESRGAN_x4plus.pth")
    image = noise(12, 10)
    native = upscaler.upscale(image, 4.0, tile=0)
    expected = np.asarray(native.resize((24, 20), Image.Resampling.LANCZOS))
    assert np.array_equal(np.asarray(upscaler.upscale(image, 2.0, tile=0)), expected)


# ------------------------------------------------------------------------------------------------------ refusals
def test_unidentified_and_corrupt_model_files_are_refused_naming_the_file(tmp_path):
    unknown = tmp_path / "mystery.pth"
    torch.save({"encoder.weight": torch.zeros(4, 4)}, unknown)
    with pytest.raises(ParamError, match=r"mystery\.pth: spandrel could not identify the architecture"):
        load_upscaler(unknown)
    for name in ("broken.pth", "broken.safetensors"):
        (tmp_path / name).write_bytes(b"not a model at all")
        with pytest.raises(ParamError, match=rf"{name.replace('.', '[.]')}: spandrel could not read"):
            load_upscaler(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ParamError, match=r"notes\.txt: \.txt is not a model file"):
        load_upscaler(tmp_path / "notes.txt")
    with pytest.raises(ParamError, match="'nope' is neither a file nor an upscaler name"):
        load_upscaler("nope")


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims `width`x`height`: what a decompression bomb looks like before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_bad_inputs_are_refused_with_one_line_before_decoding(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    noise(8, 8).save(tmp_path / "anim.gif")
    png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # 900 MP: past Pillow's own limit
    png_header_only(tmp_path / "big.png", 5_000, 5_000)  # 25 MP: under Pillow's, over ours
    noise(8, 8).save(tmp_path / "small.png")
    cases = [
        # One reader for every input (zstudio.input_image), so the edit's wording: the file by name, the formats
        # accepted, megapixels, "MiB is accepted".
        ("text.png", 2.0, UpscaleLimits(), "image: text.png is not a PNG, JPEG, WebP or BMP image"),
        ("anim.gif", 2.0, UpscaleLimits(), "image: anim.gif is not a PNG, JPEG, WebP or BMP image"),
        ("bomb.png", 2.0, UpscaleLimits(), "image: bomb.png claims more pixels than Pillow's decompression-bomb"),
        ("big.png", 2.0, UpscaleLimits(), "image: big.png is 5000x5000, 25.0 megapixels; at most 16.7772 are accepted"),
        ("small.png", 2.0, UpscaleLimits(max_input_bytes=10), r"image: small.png is 0.0 MiB; at most 9.5\d*e-06 MiB"),
        ("small.png", 4.0, UpscaleLimits(max_side=16), "8x8 at 4x would be 32x32"),
        ("missing.png", 2.0, UpscaleLimits(), "image: '.*missing.png' is not a file"),
    ]
    for name, scale, limits, message in cases:
        with pytest.raises(ParamError, match=message) as err:
            open_source(tmp_path / name, scale, limits)
        assert "\n" not in str(err.value)


def test_the_default_limit_refuses_results_over_8192_px_a_side(tmp_path):
    noise(2100, 4).save(tmp_path / "strip.png")
    with pytest.raises(ParamError, match="2100x4 at 4x would be 8400x16 .* 8192 px a side"):
        open_source(tmp_path / "strip.png", 4.0)


# ------------------------------------------------------------------------------------------ fallback, listing
def test_lanczos_fallback_is_a_plain_resize_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="zstudio")
    noise(16, 12).save(tmp_path / "in.png")
    generator = Generator(device="cpu", outputs=tmp_path / "out")
    result = generator.upscale(tmp_path / "in.png", scale=1.5)
    expected = noise(16, 12).resize((24, 18), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(Image.open(result.path)), np.asarray(expected))
    assert read_metadata(result.path)["upscale"]["upscaler"]["name"] == "lanczos"
    assert "Lanczos, the built-in fallback" in caplog.text


def test_find_upscalers_names_files_and_folder_contents(tmp_path, models):
    extra = write_realesrgan(tmp_path, 4, ".pth", name="4x_single")
    (tmp_path / "lanczos.pth").write_bytes(b"x")  # the built-in's name is reserved
    found = find_upscalers([models, extra, tmp_path / "lanczos.pth"])
    assert found == {
        "RealESRGAN_x2plus": models / "RealESRGAN_x2plus.safetensors",
        "RealESRGAN_x4plus": models / "RealESRGAN_x4plus.pth",
        "4x_single": extra,
    }


def test_generator_loads_an_upscaler_once_by_name(tmp_path, models, monkeypatch):
    monkeypatch.setenv("ZSTUDIO_UPSCALERS", str(models))
    noise(8, 8).save(tmp_path / "in.png")
    generator = Generator(device="cpu", outputs=tmp_path / "out")
    first = generator.upscale(tmp_path / "in.png", scale=4, model="RealESRGAN_x4plus", tile=0)
    second = generator.upscale(tmp_path / "in.png", scale=4, model=str(models / "RealESRGAN_x4plus.pth"), tile=0)
    assert list(generator.upscalers) == [str((models / "RealESRGAN_x4plus.pth").resolve())]
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert first.path != second.path and first.path.parent == tmp_path / "out"


# ---------------------------------------------------------------------------------------------------------- CLI
def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_upscale_writes_a_png_with_the_recipe_and_show_prints_it(tmp_path, models, draft):
    out = tmp_path / "out"
    model = models / "RealESRGAN_x2plus.safetensors"
    result = invoke("upscale", draft, "--model", model, "--scale", "2", "--tile", "16", "--output-dir", out)
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.split("\t")[0])
    assert list(out.iterdir()) == [path] and Image.open(path).size == (48, 32)
    meta = read_metadata(path)
    up, source = meta["upscale"], meta["source"]
    assert (up["scale"], up["tile"], up["refine"]) == (2.0, 16, None)
    assert (up["upscaler"]["architecture"], up["upscaler"]["native_scale"]) == ("ESRGAN", 2)
    assert up["upscaler"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert source["sha256"] == hashlib.sha256(draft.read_bytes()).hexdigest()
    assert (source["width"], source["height"]) == (24, 16)
    assert source["metadata"] == read_metadata(draft)  # the draft's own text-to-image record rides along

    shown = invoke("show", path)
    assert shown.exit_code == 0, shown.output
    assert "24x16 -> 48x32 (2x)" in shown.stdout and "RealESRGAN_x2plus (ESRGAN, native scale 2)" in shown.stdout
    assert source["sha256"] in shown.stdout and '"a red circle" seed 7' in shown.stdout
    assert f"upscaler file    RealESRGAN_x2plus.safetensors sha256 {up['upscaler']['sha256']} (cpu, float32)" in (
        shown.stdout
    )
    assert f"source           {draft.name} sha256 {source['sha256']} (PNG)" in shown.stdout


def test_cli_lists_upscalers_with_the_lanczos_fallback(models, monkeypatch):
    monkeypatch.setenv("ZSTUDIO_UPSCALERS", str(models))
    result = invoke("upscale", "--list")
    assert result.exit_code == 0, result.output
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert names == ["lanczos", "RealESRGAN_x2plus", "RealESRGAN_x4plus"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--scale", "5"], "scale: 5.0 is not one of 1.5, 2, 3, 4"),
        (["--tile", "-1"], "tile: -1 is not 0 (no tiling)"),
        (["--refine", "1.5"], "refine: 1.5 is outside 0-1"),
        (["--model", "{bad}"], "bad.pth: spandrel could not identify the architecture"),
        (["--model", "nope"], "model: 'nope' is neither a file nor an upscaler name"),
    ],
)
def test_cli_refusals_exit_2_with_one_line_and_write_nothing(tmp_path, draft, args, fragment):
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    out = tmp_path / "out"
    result = invoke("upscale", draft, *[a.replace("{bad}", str(bad)) for a in args], "--output-dir", out)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() or not list(out.iterdir())


# ---------------------------------------------------------------------------------------------------- hires fix
def test_hires_fix_rerenders_the_upscaled_draft_with_its_own_recipe(generator, tmp_path):
    from conftest import SMALL

    extras = {"negative_prompt": "dull", "cfg_scale": 1.5, "max_sequence_length": 64, "cfg_normalization": 1.1,
              "cfg_truncation": 0.8}  # fmt: skip
    draft_path = generator.generate(prompt="a blue square", seed=11, num_inference_steps=2, **SMALL, **extras,
                                    output_format="webp", output_dir=tmp_path)[0][0]  # fmt: skip
    result = generator.upscale(draft_path, scale=1.5, refine=0.3, output_dir=tmp_path / "out")
    meta = read_metadata(result.path)
    assert Image.open(result.path).size == (384, 384)
    p = meta["params"]
    assert (p["prompt"], p["seed"], p["num_inference_steps"], p["strength"]) == ("a blue square", 11, 2, 0.3)
    assert {k: p[k] for k in extras} == extras  # the whole recipe, not only prompt, seed and steps
    assert p["output_format"] == "png" and Image.open(result.path).format == "PNG"  # what an upscale writes
    assert (p["width"], p["height"]) == (384, 384)
    assert meta["upscale"]["refine"] == 0.3 and meta["source"]["metadata"]["params"]["width"] == 256


# ---------------------------------------------------------------------------------------------- spandrel import
def test_spandrel_imports_only_the_torchvision_names_the_stand_in_provides():
    """The stand-in (used where torchvision cannot load beside this torch) must cover every torchvision import."""
    spandrel = import_spandrel()
    imported = set()
    for source in Path(spandrel.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchvision"):
                assert node.module == "torchvision.transforms.functional", (source, node.module)
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("torchvision") for a in node.names), source
    assert imported == TORCHVISION_NAMES
    stand_in = sys.modules.get("torchvision")
    assert stand_in is None or getattr(stand_in, "__file__", None)  # never left behind: a real torchvision or none


# ---------------------------------------------------------------------------------------------------- benchmark
def test_upscale_benchmark_runs_on_cpu_with_a_tiny_network(tmp_path):
    report = bench_main(["--tiny", "--device", "cpu", "--size", "32", "--tile", "32", "--repeats", "1",
                         "--json", str(tmp_path / "bench.json")])  # fmt: skip
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert (report["architecture"], report["output"]) == ("ESRGAN", "128x128")
    assert report["median_seconds"] > 0
