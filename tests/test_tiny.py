import hashlib
import json

from transformers import AutoTokenizer

from zstudio.models import COMPONENTS
from zstudio.tiny import make_tiny


def digests(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_layout_is_the_real_diffusers_one(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"][1].startswith("Qwen3")
    for component in COMPONENTS:
        assert (tiny_dir / component).is_dir()
    for weights in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert (tiny_dir / weights).is_file()
    scheduler = json.loads((tiny_dir / "scheduler/scheduler_config.json").read_text())
    assert scheduler["shift"] == 3.0
    vae = json.loads((tiny_dir / "vae/config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (0.3611, 0.1159, 16)
    total = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert total < 10e6


def test_same_seed_same_weights_other_seed_other_weights(tiny_dir, tmp_path):
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    assert digests(again) == digests(tiny_dir)
    assert all(digests(other)[k] != v for k, v in digests(tiny_dir).items())


def test_tokenizer_is_real_bpe_with_chat_template(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    text = "蓝色背景上的红色圆形, a red circle on a blue background"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # learned merges, not raw bytes
    wrapped = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert wrapped == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    special = tokenizer("<|im_start|>").input_ids
    assert len(special) == 1
