import math

import pytest

from zstudio.params import ASPECT_RATIOS, PRESETS, GenerationParams, ParamError, resolve_size


def make(**kw):
    return GenerationParams(**{"prompt": "a cat", **kw})


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"width": 1000}, "width", "use 992 or 1008"),
        ({"height": 1030}, "height", "use 1024 or 1040"),
        ({"width": 48}, "width", "outside 64-2048"),
        ({"height": 2064}, "height", "outside 64-2048"),
        ({"num_inference_steps": 0}, "num_inference_steps", "outside 1-100"),
        ({"num_inference_steps": 101}, "num_inference_steps", "outside 1-100"),
        ({"cfg_scale": -0.5}, "cfg_scale", "outside 0-20"),
        ({"cfg_scale": math.nan}, "cfg_scale", "outside 0-20"),
        ({"cfg_scale": 20.5}, "cfg_scale", "outside 0-20"),
        ({"num_images": 0}, "num_images", "outside 1-8"),
        ({"num_images": 9}, "num_images", "outside 1-8"),
        ({"seed": -2}, "seed", "outside 0-4294967295"),
        ({"seed": 2**32}, "seed", "outside 0-4294967295"),
        ({"seed": 2**32 - 1, "num_images": 2}, "seed", "4294967296"),
        ({"prompt": "  "}, "prompt", "must not be empty"),
        ({"output_format": "gif"}, "output_format", "png, jpeg, webp"),
        ({"max_sequence_length": 513}, "max_sequence_length", "outside 1-512"),
        ({"width": "512"}, "width", "whole number"),
        ({"cfg_scale": True}, "cfg_scale", "must be a number"),
        ({"cfg_normalization": True}, "cfg_normalization", "must be a number"),
        ({"cfg_truncation": False}, "cfg_truncation", "must be a number"),
        ({"cfg_truncation": math.nan}, "cfg_truncation", "outside 0-1"),
        ({"seed": True}, "seed", "whole number"),
        ({"prompt": "x" * 8001}, "prompt", "8001 characters; at most 8000"),
        ({"negative_prompt": "y" * 8001}, "negative_prompt", "at most 8000"),
        ({"prompt": "a\ud800b"}, "prompt", "unpaired UTF-16 surrogate (0xd800) at character 1"),
        ({"prompt": "a\x00"}, "prompt", "NUL character"),
        ({"output_format": 5}, "output_format", "must be text"),
    ],
)
def test_bad_input_names_the_field(changes, field, fragment):
    with pytest.raises(ParamError) as info:
        make(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_good_input_is_kept():
    p = make(width=2048, height=2048, num_inference_steps=100, cfg_scale=20, seed=2**32 - 1, num_images=1)
    assert (p.width, p.height, p.seed) == (2048, 2048, 2**32 - 1)
    assert make(output_format="JPG").output_format == "jpeg"


def test_presets_and_aspect_ratios():
    assert resolve_size("512") == (512, 512)
    assert resolve_size("768") == (768, 768)
    assert resolve_size("1024") == (1024, 1024)
    assert resolve_size("1024x768") == (1024, 768)
    assert resolve_size("640x480") == (640, 480)
    for name, (w, h) in {**PRESETS, **ASPECT_RATIOS}.items():
        make(width=w, height=h)  # every named size passes validation
        if ":" in name:
            a, b = map(int, name.split(":"))
            assert abs(w / h - a / b) < 0.02, name
            assert 0.75e6 <= w * h <= 1.15e6, name
    with pytest.raises(ParamError) as info:
        resolve_size("huge")
    assert info.value.field == "size"


def test_size_takes_ascii_digits_only():
    for name in ("１０２４x１０２４", "٥١٢x٥١٢", "512x512\u0660", "99999999999x16"):
        with pytest.raises(ParamError) as info:
            resolve_size(name)
        assert info.value.field == "size"


def test_cost_limit_names_the_limit():
    make(width=2048, height=2048, num_inference_steps=100, num_images=1).check_cost(500)
    with pytest.raises(ParamError) as info:
        make(width=2048, height=2048, num_inference_steps=100, num_images=8).check_cost(500)
    assert info.value.field == "max_megapixel_steps"
    assert "3355 megapixel-steps, over this server's limit of 500" in str(info.value)


def test_errors_about_bad_text_stay_one_encodable_line():
    err = ParamError("\ud800field", "bad\nvalue \udfff")
    assert "\n" not in str(err)
    str(err).encode("utf-8")  # raises if a lone surrogate survived


def test_profile_defaults_fill_only_unset_fields():
    p = make().with_defaults(num_inference_steps=9, cfg_scale=0.0)
    assert (p.num_inference_steps, p.cfg_scale) == (9, 0.0)
    p = make(num_inference_steps=4, cfg_scale=2).with_defaults(num_inference_steps=9, cfg_scale=0.0)
    assert (p.num_inference_steps, p.cfg_scale) == (4, 2.0)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ParamError) as info:
        GenerationParams.from_dict({"prompt": "x", "guidance": 3})
    assert info.value.field == "guidance"
    with pytest.raises(ParamError) as info:
        GenerationParams.from_dict({"width": 512})
    assert info.value.field == "prompt"
    assert GenerationParams.from_dict(make(seed=3).to_dict()) == make(seed=3)
