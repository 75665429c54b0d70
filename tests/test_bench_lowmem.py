"""bench.lowmem's steps on the CPU with the tiny checkpoint: the H100 run must not fail on a typo after minutes."""

import importlib.util
import json

from zstudio.bench import lowmem

TINY_RUN = ["--device", "cpu", "--size", "256x256", "--steps", "1", "--calls", "1"]


def test_a_cap_step_reports_the_choice_and_new_prompt_calls_with_pngs_on_disk(tiny_dir, tmp_path):
    out = tmp_path / "cap.json"
    report = lowmem.main(["cap", "--folder", str(tiny_dir), "--cap", "16", *TINY_RUN, "--json", str(out)])
    assert json.loads(out.read_text())["memory_mode"] == report["memory_mode"] == "resident"  # CPU: no modes
    assert report["text_encoder"] == "resident" and report["new_prompt_call_s"]["n"] == 1
    assert report["resident_blocks"] is None  # only memory mode stream keeps blocks
    assert report["png_files"] == 3  # warm-up, one timed call, the repeated prompt
    assert report["target_s"] == 1.5 and report["meets_target"] in (True, False)


def test_the_quality_step_compares_the_int8_encoder_with_full_precision(tiny_dir):
    report = lowmem.main(["quality", "--folder", str(tiny_dir), *TINY_RUN])
    assert report["placements"]["resident"]["n"] == len(lowmem.QUALITY_PROMPTS) - 1
    if importlib.util.find_spec("torchao") is None:
        assert "torchao" in report["int8_error"]
        return
    error = report["int8_embedding_error"]
    assert len(error["per_prompt"]) == len(lowmem.QUALITY_PROMPTS)
    assert 0 < error["relative_error_max"] < 0.05 and error["cosine_min"] > 0.99
    assert report["int8_image_psnr_db"] > 30
