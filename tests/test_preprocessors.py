"""ControlNet preprocessors with model weights (zstudio.preprocessors): depth through transformers, HED, M-LSD,
lineart and pose through controlnet_aux. Weights are random, written in the test in the real layouts and file names;
each map is compared with the library's own public API on the same fitted picture, so what is checked is zstudio's
wiring (fit, sizes, normalisation, near = white, channels, refusals)."""

import importlib.util
import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from zstudio import GenerationParams, Generator, control, preprocessors
from zstudio.edit import fit
from zstudio.params import ParamError
from zstudio.settings import load_settings
from zstudio.tiny import CONTROLNET_FOLDER

WIDTH, HEIGHT = 160, 96  # not square, and a short side that controlnet_aux rounds to another multiple of 64
# A ControlNet trained on every type here (validate reads only its name and types; lineart is not a Union type).
UNION = control.ControlNetSource("any", None, None, ("canny", *preprocessors.NAMES))


def has_controlnet_aux() -> bool:
    try:
        import controlnet_aux  # noqa: F401
    except Exception:  # its __init__ imports timm, torchvision, scikit-image and scipy
        return False
    return True


needs_aux = pytest.mark.skipif(not has_controlnet_aux(), reason="controlnet_aux (zstudio[annotators]) and its "
                               "dependencies timm, torchvision, scikit-image, scipy do not import here")  # fmt: skip


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    """A scene larger than the output and of another aspect: a bright disc before a grey bar, on a gradient."""
    ramp = np.tile(np.linspace(20, 200, 240, dtype=np.uint8), (180, 1))
    image = Image.fromarray(np.stack([ramp, ramp // 2, 255 - ramp], axis=-1))
    draw = ImageDraw.Draw(image)
    draw.rectangle((150, 20, 190, 170), fill=(120, 120, 120))
    draw.ellipse((40, 40, 140, 140), fill=(250, 240, 230))
    path = tmp_path_factory.mktemp("pre") / "scene.png"
    image.save(path)
    return path


def fitted(path) -> Image.Image:
    return fit(Image.open(path).convert("RGB"), WIDTH, HEIGHT, Image.Resampling.LANCZOS)


def make_depth_model(folder, kind: str = "relative"):
    """A tiny random Depth Anything (a 2-layer Dinov2 backbone) with its image processor config, as the hub's."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(0)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2"],
                            reshape_hidden_states=False, apply_layernorm=True)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32],
                                 reassemble_factors=[2, 1], fusion_hidden_size=16, head_hidden_size=8,
                                 depth_estimation_type=kind, max_depth=20)  # fmt: skip
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # random weights predict within ~2e-5 of 10 (metric), where float32 has ~20 levels: the
        model.head.conv3.weight.mul_(1e5)  # map would be noise, stretched; spread the prediction out to ~1
    model.save_pretrained(folder)
    processor = DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                  do_rescale=True, do_normalize=True, resample=Image.Resampling.BICUBIC)  # fmt: skip
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    return make_depth_model(tmp_path_factory.mktemp("depth-anything"))


def settings_with(monkeypatch, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache (huggingface_hub and transformers read this constant at each call)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache, repo_id: str, folder) -> None:
    """The files of `folder` as the hub client leaves a download in the cache: blobs, a snapshot, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def library_depth(folder, image) -> np.ndarray:
    """transformers' depth-estimation pipeline on the picture: its "depth" picture (0-255, min to max)."""
    from transformers import AutoImageProcessor, pipeline

    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return np.asarray(pipeline("depth-estimation", model=str(folder), image_processor=processor)(image)["depth"])


def same_map(ours: np.ndarray, theirs: np.ndarray, rounding: int = 0) -> bool:
    """Our map against the library's own, computed separately in the same process: equal up to float noise. A tiny
    random depth model's output spans a narrow range, which min-max normalisation stretches to 0-255, so where
    many threads sum in another order (16 cores on the GPU host) a few pixels move by more than one level; a wrong
    size, crop, orientation or normalisation moves them all."""
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    return ours.shape == theirs.shape and diff.mean() <= 0.5 + rounding and np.percentile(diff, 99) <= 1 + rounding


def request(path, kind):
    return GenerationParams(prompt="x", control=str(path), control_type=kind, control_preprocess=True)


def test_depth_map_is_transformers_depth_at_the_output_size_in_three_equal_channels(monkeypatch, picture, depth_folder):
    settings = settings_with(monkeypatch, ZSTUDIO_DEPTH_MODEL=depth_folder)
    got = control.validate(request(picture, "depth"), UNION, WIDTH, HEIGHT, settings=settings)
    ours = np.asarray(got.image)
    assert got.image.size == (WIDTH, HEIGHT) and got.image.mode == "RGB"
    assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 0] == ours[..., 2]).all()
    expected = library_depth(depth_folder, fitted(picture))
    assert same_map(ours[..., 0], expected)
    assert ours.min() == 0 and ours.max() == 255  # stretched to the full range
    assert got.recipe["preprocessor"] == "depth" and got.recipe["sha256"] == control.sha256_pixels(got.image)


def test_metric_depth_is_flipped_so_near_is_white(monkeypatch, picture, tmp_path):
    folder = make_depth_model(tmp_path / "metric", kind="metric")  # predicts distance: far = high
    settings = settings_with(monkeypatch, ZSTUDIO_DEPTH_MODEL=folder)
    ours = np.asarray(preprocessors.run("depth", fitted(picture), settings))[..., 0].astype(int)
    far_is_white = library_depth(folder, fitted(picture)).astype(int)
    assert same_map(ours, 255 - far_is_white, rounding=1)  # floor(255 (1 - s)) against 255 - floor(255 s)


def test_a_loaded_net_serves_the_next_request_without_reloading(monkeypatch, picture, depth_folder):
    settings = settings_with(monkeypatch, ZSTUDIO_DEPTH_MODEL=depth_folder)
    first = preprocessors.run("depth", fitted(picture), settings)

    def no_reload(spec):
        raise AssertionError(f"reloaded {spec}")

    monkeypatch.setattr(preprocessors, "load_depth", no_reload)
    assert np.array_equal(np.asarray(preprocessors.run("depth", fitted(picture), settings)), np.asarray(first))
    assert ("depth", str(depth_folder)) in preprocessors._LOADED


def test_missing_depth_weights_are_refused_in_one_line_before_anything_loads(monkeypatch, tiny_dir, picture, tmp_path):
    empty = tmp_path / "no-model"
    empty.mkdir()
    monkeypatch.setenv("ZSTUDIO_DEPTH_MODEL", str(empty))
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER))
    with pytest.raises(ParamError) as err:
        generator.generate_images(request(picture, "depth"))
    text = str(err.value)
    assert err.value.field == "control_preprocess" and "\n" not in text
    assert "config.json" in text and "model.safetensors" in text and "ZSTUDIO_DEPTH_MODEL" in text
    assert "give a ready depth image as control instead" in text
    assert generator.pipe is None and ("depth", str(empty)) not in preprocessors._LOADED


def test_default_depth_model_missing_from_the_cache_is_refused(hub_cache, picture):
    with pytest.raises(ParamError, match="Depth-Anything-V2-Small-hf"):
        control.validate(request(picture, "depth"), UNION, WIDTH, HEIGHT, settings=load_settings())


def test_depth_model_is_read_from_the_hugging_face_cache(monkeypatch, hub_cache, picture, depth_folder):
    put_in_cache(hub_cache, "someone/depth-model", depth_folder)
    settings = settings_with(monkeypatch, ZSTUDIO_DEPTH_MODEL="someone/depth-model")
    assert control.preprocessor_choices(settings) == ["canny", "depth", "none"]
    ours = np.asarray(preprocessors.run("depth", fitted(picture), settings))
    assert same_map(ours[..., 0], library_depth(depth_folder, fitted(picture)))


def test_choices_list_depth_only_when_its_weights_are_there(monkeypatch, hub_cache, tmp_path, depth_folder):
    monkeypatch.setenv("ZSTUDIO_ANNOTATORS", str(tmp_path / "no-annotators"))
    monkeypatch.setenv("ZSTUDIO_DEPTH_MODEL", str(tmp_path / "no-depth"))
    assert control.preprocessor_choices() == ["canny", "none"]
    monkeypatch.setenv("ZSTUDIO_DEPTH_MODEL", str(depth_folder))
    assert control.preprocessor_choices() == ["canny", "depth", "none"]


def test_generate_records_the_depth_preprocessor_and_the_control_hash(monkeypatch, tiny_dir, picture, depth_folder):
    monkeypatch.setenv("ZSTUDIO_DEPTH_MODEL", str(depth_folder))
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER))
    params = GenerationParams(prompt="a red circle", seed=1, num_inference_steps=2, control=str(picture),
                              control_type="depth", control_preprocess=True)  # fmt: skip
    expected = generator.validate_control(params)
    result = generator.generate_images(params)
    recipe = result.metadata[0]["control"]
    assert recipe["preprocessor"] == "depth" and recipe["type"] == "depth"
    assert recipe["sha256"] == expected.recipe["sha256"] == control.sha256_pixels(expected.image)
    assert result.images[0].size == expected.image.size


# ------------------------------------------------------------------------------------------- controlnet_aux
def write_annotators(folder) -> None:
    """Random weights for controlnet_aux's nets, under lllyasviel/Annotators' file names, as its loaders read them."""
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator as LineartNet
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    torch.save(mlsd_that_finds_lines(MobileV2_MLSD_Large()), folder / "mlsd_large_512_fp32.pth")
    torch.save(LineartNet(3, 1, 3).state_dict(), folder / "sk_model.pth")
    torch.save(LineartNet(3, 1, 3).state_dict(), folder / "sk_model2.pth")
    for net, file in ((bodypose_model(), "body_pose_model.pth"), (handpose_model(), "hand_pose_model.pth")):
        # OpenPose's loader (open_pose.util.transfer) drops the first part of each name: model0.conv1_1 -> conv1_1
        torch.save({k.split(".", 1)[1]: v for k, v in net.state_dict().items()}, folder / file)
    torch.save(FaceNet().state_dict(), folder / "facenet.pth")


def mlsd_that_finds_lines(net) -> dict:
    """M-LSD's random net finds no line (and controlnet_aux then draws none): its last layer is biased so that
    every centre scores sigmoid(2) and reaches 4 px either side horizontally, with the input still adding some."""
    state = net.state_dict()
    state["block23.conv3.weight"] *= 0.05
    state["block23.conv3.bias"][7:12] = torch.tensor([2.0, 4.0, 0.0, -4.0, 0.0])  # channel 7: centre; 8-11: ends
    return state


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators")
    write_annotators(folder)
    return folder


def library_map(name: str, folder, image: Image.Image) -> np.ndarray:
    """controlnet_aux's detector on the picture, detected at its short side, resized to its size as the library
    resizes."""
    import controlnet_aux

    detector = getattr(controlnet_aux, preprocessors.ANNOTATORS[name][0]).from_pretrained(str(folder))
    side = min(image.size)
    made = detector(image, detect_resolution=side, image_resolution=side, output_type="np")
    return cv2.resize(made, image.size, interpolation=cv2.INTER_LINEAR)


@needs_aux
@pytest.mark.parametrize("name", ["hed", "mlsd", "lineart", "pose"])
def test_annotator_map_is_controlnet_aux_at_the_output_size(monkeypatch, picture, annotators, name):
    settings = settings_with(monkeypatch, ZSTUDIO_ANNOTATORS=annotators)
    got = control.validate(request(picture, name), UNION, WIDTH, HEIGHT, settings=settings)
    ours = np.asarray(got.image)
    assert got.image.size == (WIDTH, HEIGHT) and got.image.mode == "RGB"
    assert np.array_equal(ours, library_map(name, annotators, fitted(picture)))
    if name != "pose":  # pose draws coloured limbs; the others are grey maps, which random weights leave non-empty
        assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 0] == ours[..., 2]).all() and ours.max() > 0
    assert got.recipe["preprocessor"] == name


@needs_aux
def test_choices_list_an_annotator_when_its_files_are_there(monkeypatch, hub_cache, tmp_path, annotators):
    partial = tmp_path / "only-hed"
    partial.mkdir()
    (partial / "ControlNetHED.pth").write_bytes((annotators / "ControlNetHED.pth").read_bytes())
    monkeypatch.setenv("ZSTUDIO_ANNOTATORS", str(partial))
    assert control.preprocessor_choices() == ["canny", "hed", "none"]
    monkeypatch.setenv("ZSTUDIO_ANNOTATORS", str(annotators))
    assert control.preprocessor_choices() == ["canny", "hed", "mlsd", "lineart", "pose", "none"]


@needs_aux
def test_annotators_are_read_from_the_hugging_face_cache(hub_cache, picture, annotators):
    put_in_cache(hub_cache, "lllyasviel/Annotators", annotators)  # the default ZSTUDIO_ANNOTATORS
    assert control.preprocessor_choices() == ["canny", "hed", "mlsd", "lineart", "pose", "none"]
    ours = np.asarray(preprocessors.run("hed", fitted(picture), load_settings()))
    assert np.array_equal(ours, library_map("hed", annotators, fitted(picture)))


@needs_aux
def test_missing_annotator_files_are_named_in_one_line(monkeypatch, tmp_path, picture):
    settings = settings_with(monkeypatch, ZSTUDIO_ANNOTATORS=tmp_path)
    with pytest.raises(ParamError) as err:
        control.validate(request(picture, "pose"), UNION, WIDTH, HEIGHT, settings=settings)
    text = str(err.value)
    assert err.value.field == "control_preprocess" and "\n" not in text
    assert "body_pose_model.pth, hand_pose_model.pth, facenet.pth" in text and "ZSTUDIO_ANNOTATORS" in text
    assert "give a ready pose image as control instead" in text


@pytest.mark.skipif(importlib.util.find_spec("controlnet_aux") is not None, reason="controlnet_aux is installed")
@pytest.mark.parametrize("name", ["hed", "mlsd", "lineart", "pose"])
def test_without_controlnet_aux_the_annotators_name_the_extra(monkeypatch, tmp_path, picture, name):
    settings = settings_with(monkeypatch, ZSTUDIO_ANNOTATORS=tmp_path)
    with pytest.raises(ParamError) as err:
        control.validate(request(picture, name), UNION, WIDTH, HEIGHT, settings=settings)
    assert "controlnet_aux" in str(err.value) and "zstudio[annotators]" in str(err.value)
    assert "\n" not in str(err.value) and err.value.field == "control_preprocess"


def test_benchmark_times_a_full_size_depth_model(monkeypatch, tmp_path):
    from zstudio.bench.preprocessors import main

    monkeypatch.setenv("ZSTUDIO_DEPTH_MODEL", "mine")

    report = main(["--only", "depth", "--size", "64x48", "--repeats", "1", "--devices", "cpu", "--json",
                   str(tmp_path / "bench.json")])  # fmt: skip
    assert report["parameters"]["depth"] == 24_785_089  # Depth Anything V2 Small's size: the config is the hub's
    assert report["results"]["depth"]["cpu"]["seconds"] > 0 and (tmp_path / "bench.json").is_file()
    assert os.environ["ZSTUDIO_DEPTH_MODEL"] == "mine" and "ZSTUDIO_ANNOTATORS" not in os.environ  # left as found


def test_the_nets_run_where_the_setting_says_and_a_bad_device_is_one_line(monkeypatch, picture, depth_folder):
    settings = settings_with(monkeypatch, ZSTUDIO_DEPTH_MODEL=depth_folder)
    preprocessors.run("depth", fitted(picture), settings)
    assert ("depth", str(depth_folder)) in preprocessors._LOADED  # cpu, the default
    assert next(preprocessors._LOADED[("depth", str(depth_folder))].model.parameters()).device.type == "cpu"
    bad = settings_with(monkeypatch, ZSTUDIO_DEPTH_MODEL=depth_folder, ZSTUDIO_ANNOTATOR_DEVICE="gpu")
    with pytest.raises(ParamError, match="ZSTUDIO_ANNOTATOR_DEVICE: must be cpu, cuda or cuda:N, got 'gpu'"):
        preprocessors.run("depth", fitted(picture), bad)
