"""zstudio.speed.png: the parallel PNG encoder writes what Pillow's encoder writes (pixels and text), in any band
count, with either deflate library; a damaged band cannot pass; the `pillow` setting keeps Pillow's own file."""

import io
import json
import random
import shutil
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from zstudio.bench.png import main as bench_main
from zstudio.bench.png import noise_like, photo_like
from zstudio.outputs import PNG_COMPRESS_LEVEL, encode_image, read_metadata, save_image
from zstudio.params import ParamError
from zstudio.speed import png

LIBRARIES = [zlib]
try:
    from isal import isal_zlib

    LIBRARIES.append(isal_zlib)
except ImportError:  # the encoder then deflates with zlib; its own tests still run
    pass
TEXTS = [("parameters", "红色圆形 a red circle\nNegative prompt: \nSteps: 8, Seed: 1"), ("zstudio", '{"a": "é"}')]
META = {
    "params": {
        "prompt": "红色圆形",
        "negative_prompt": "",
        "num_inference_steps": 8,
        "cfg_scale": 0.0,
        "seed": 5,
        "width": 17,
        "height": 33,
        "output_format": "png",
    },  # fmt: skip
    "scheduler": {"shift": 3.0},
    "model": {"name": "tiny"},
    "software": "zstudio test",
}


def random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Noise with flat runs and gradients, so every filter and match length occurs."""
    rng = np.random.default_rng(seed)
    bands = len(mode)
    pixels = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    pixels[: height // 3] = 200  # flat
    pixels[height // 3 : 2 * height // 3] = (np.arange(width)[None, :, None] * 7 % 256).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def pillow_png(image: Image.Image, texts: list[tuple[str, str]]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in texts:
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decoded(data: bytes) -> tuple[Image.Image, dict[str, str]]:
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, dict(image.text)


def assert_same_as_pillow(image: Image.Image, data: bytes) -> None:
    ours, ours_text = decoded(data)
    theirs, theirs_text = decoded(pillow_png(image, TEXTS))
    assert ours.mode == theirs.mode == image.mode and ours.size == theirs.size == image.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert np.array_equal(np.asarray(ours), np.asarray(image))
    assert ours_text == theirs_text == dict(TEXTS)


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("size", [(17, 33), (1, 1), (5, 7), (64, 61)], ids=str)
@pytest.mark.parametrize("bands", range(1, 9))
def test_odd_sizes_decode_to_pillows_pixels_and_text(library, size, bands):
    image = random_image(*size, seed=bands)
    assert_same_as_pillow(image, png.encode_png(image, TEXTS, bands=bands, threads=4, library=library))


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("bands", [1, 3, 8])
def test_1024_rgb_decodes_to_pillows_pixels_and_text(library, bands):
    image = noise_like(1024)
    assert_same_as_pillow(image, png.encode_png(image, TEXTS, bands=bands, threads=bands, library=library))


@pytest.mark.skipif(shutil.which("pngcheck") is None, reason="pngcheck is not installed (scripts/test.sh installs it)")
@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
def test_pngcheck_finds_no_error(library, tmp_path):
    """An independent decoder's checks: chunk CRCs, the zlib stream and its check value, each row's filter type."""
    for i, (size, bands) in enumerate([((17, 33), 5), ((1, 1), 1), ((300, 257), 8)]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png.encode_png(random_image(*size), TEXTS, bands=bands, threads=4, library=library))
        check = subprocess.run(["pngcheck", "-vv", str(path)], capture_output=True, text=True)
        assert check.returncode == 0 and "No errors detected" in check.stdout, check.stdout + check.stderr


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grey_and_alpha_pictures_too(mode):
    image = random_image(31, 20, mode)
    assert_same_as_pillow(image, png.encode_png(image, TEXTS, bands=3, threads=2))


def test_files_are_no_larger_than_pillows_level_1_give_or_take_ten_percent():
    for image in (noise_like(1024), photo_like(1024)):
        ours, theirs = len(png.encode_png(image, TEXTS)), len(pillow_png(image, TEXTS))
        assert ours <= 1.10 * theirs, (ours, theirs)


def test_adler32_combine_matches_zlib():
    rng = random.Random(0)
    data = rng.randbytes(200_000)
    for _ in range(50):
        cut = rng.randrange(len(data) + 1)
        combined = png.adler32_combine(zlib.adler32(data[:cut]), zlib.adler32(data[cut:]), len(data) - cut)
        assert combined == zlib.adler32(data)


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda m: m.__name__)
def test_a_short_or_missing_band_fails_loudly(library):
    image = random_image(40, 64)
    pixels = np.asarray(image).reshape(64, -1)
    length = 64 * (40 * 3 + 1)
    parts = png.deflate_bands(pixels, 3, 4, png.LEVEL, 4, library)
    ihdr = png.chunk(b"IHDR", bytes.fromhex("00000028 00000040 08 02 000000".replace(" ", "")))

    def file_with(bands: list[tuple[bytes, int, int]]) -> bytes:
        idat = png.chunk(b"IDAT", png.zlib_stream(bands, png.LEVEL, length))  # valid CRCs: only the data is wrong
        return png.SIGNATURE + ihdr + idat + png.chunk(b"IEND", b"")

    assert np.array_equal(np.asarray(decoded(file_with(parts))[0]), np.asarray(image))
    short = [parts[0], (parts[1][0][:-20], *parts[1][1:]), *parts[2:]]  # a band's data cut off
    with pytest.raises(OSError, match="data stream"):
        Image.open(io.BytesIO(file_with(short))).load()
    # A band left out entirely would be a valid stream of fewer rows (Pillow loads it silently): refused.
    with pytest.raises(ValueError, match=f"the bands hold {length - parts[1][2]} filtered bytes, the picture {length}"):
        file_with([parts[0], *parts[2:]])


def test_the_pillow_setting_writes_pillows_own_file(monkeypatch):
    image = random_image(17, 33)
    meta = {"model": {"name": "x"}}  # no params: only the JSON chunk, as for a plain upscale
    expected = pillow_png(image, [("zstudio", json.dumps(meta, ensure_ascii=False, sort_keys=True))])
    monkeypatch.setenv("ZSTUDIO_PNG_ENCODER", "pillow")
    assert encode_image(image, meta, "png") == expected
    monkeypatch.setenv("ZSTUDIO_PNG_ENCODER", "parallel")
    parallel = encode_image(image, meta, "png")
    assert parallel != expected and np.array_equal(np.asarray(decoded(parallel)[0]), np.asarray(image))
    assert encode_image(image, meta, "png", png_encoder="pillow") == expected


def test_an_unknown_encoder_name_is_refused(monkeypatch):
    monkeypatch.setenv("ZSTUDIO_PNG_ENCODER", "fastest")
    with pytest.raises(ParamError, match="ZSTUDIO_PNG_ENCODER.*auto, parallel, pillow"):
        encode_image(random_image(4, 4), {"model": {}}, "png")


def test_pictures_the_encoder_does_not_take_go_to_pillow():
    palette = random_image(9, 9).convert("P")
    with_profile = random_image(9, 9)
    with_profile.info["icc_profile"] = b"not a real profile, but Pillow writes it as it is"
    for image in (palette, with_profile):
        assert not png.supports(image)
        with pytest.raises(ValueError, match="parallel PNG encoder takes"):
            png.encode_png(image, TEXTS)
        back, _ = decoded(encode_image(image, {"model": {}}, "png", png_encoder="parallel"))
        assert np.array_equal(np.asarray(back), np.asarray(image))
    assert (
        decoded(encode_image(with_profile, {"model": {}}, "png"))[0].info["icc_profile"]
        == with_profile.info["icc_profile"]
    )


def test_save_image_round_trips_through_read_metadata(tmp_path, monkeypatch):
    monkeypatch.delenv("ZSTUDIO_PNG_ENCODER", raising=False)
    image = random_image(17, 33)
    path = save_image(image, META, tmp_path)
    assert read_metadata(path) == META
    back, text = decoded(path.read_bytes())
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert text["parameters"].startswith("红色圆形\nNegative prompt: \nSteps: 8")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_host_threads_is_capped():
    assert 1 <= png.host_threads() <= png.MAX_THREADS


def test_bench_smoke(tmp_path):
    own = tmp_path / "own.png"
    random_image(20, 10).save(own)
    args = ["--size", "32", "--repeats", "1", "--max-threads", "2", "--dir", str(tmp_path / "out"), "--image", str(own)]
    report = bench_main([*args, "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["size"] == "32x32 RGB"
    assert set(report["results"]) == {"noise-like", "photo-like", "own.png"}
    assert list((tmp_path / "out").iterdir()) == []  # its files and temporary folder are gone
    for rows in report["results"].values():
        assert rows["pillow level 1"]["bytes"] > 0
        assert rows["parallel level 1 zlib, 2 threads"]["seconds"] > 0
        assert rows["write_file (write + fsync + link)"]["seconds"] > 0
