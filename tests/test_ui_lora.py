"""The web UI's LoRA accordion: the rows reach the request, the dropdowns follow the LoRA folder, recipes bring their
LoRAs back, and refusals reach the page in one line.

The handlers are the page's own (found in the built Blocks by name and called with the values of the components
they are wired to, so the wiring is checked too) on the tiny checkpoint, without a browser; one browser test checks
the Chinese accordion.
"""

from __future__ import annotations

import shutil
from typing import Any

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import CHROMIUM, FLAGS, Running, ui_request
from test_lora import reference_layers, write_format
from zstudio import lora
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app
from zstudio.server.ui import LORA_ROWS, NO_LORA, build_ui, lora_note, lora_pairs, recipe_updates

VALUES = {"prompt": "a red circle", "negative": "", "seed": 5, "steps": 2, "width": 256, "height": 256}  # by elem_id


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    """A served studio on the tiny checkpoint whose LoRA folder holds one reference LoRA, `ink`; and its page."""
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    folder = tmp_path_factory.mktemp("ui-loras")
    sd, _ = write_format(reference_layers(generator.pipe.transformer, 1), "peft")
    save_file(sd, str(folder / "ink.safetensors"))
    generator.loras.folder = lora.LoraFolder(folder)
    app = create_app(generator, tmp_path_factory.mktemp("ui-lora-outputs"))
    runner = Running(app)
    client = runner.__enter__()
    studio = app.state.studio
    yield f"{client.base_url}/ui/", studio, build_ui(studio)
    runner.__exit__(None, None, None)


def handler(demo: gr.Blocks, name: str, first_input: str | None = None):
    """The page's event handler called `name` (the one whose first input has elem_id `first_input`)."""
    for fn in demo.fns.values():
        if fn.name == name and (first_input is None or fn.inputs[0].elem_id == first_input):
            return fn
    raise AssertionError(f"no handler {name}")


def call(demo: gr.Blocks, name: str, values: dict[str, Any], first_input: str | None = None, lang: str = "en"):
    """Run a handler as a click would: each input is `values[elem_id]` or the component's initial value."""
    fn = handler(demo, name, first_input)
    inputs = [values.get(c.elem_id, c.value) for c in fn.inputs]
    result = fn.fn(ui_request(lang), *inputs)
    if isinstance(result, list | tuple):
        return result
    *_, last = result  # a generator: the last update is the result
    return last


def generated(demo: gr.Blocks, **rows: Any) -> tuple[str, dict]:
    out = call(demo, "generate", {**VALUES, **rows})[5][0]
    return out, read_metadata(out)


def test_a_chosen_lora_reaches_the_picture_and_its_record(served):
    _, _, demo = served
    base, _ = generated(demo)
    # Row 0 empty (its strength ignored), row 1 chosen: only the chosen row counts.
    out, meta = generated(demo, **{"lora-0": NO_LORA, "lora-strength-0": 1.5, "lora-1": "ink", "lora-strength-1": 0.8})
    assert meta["params"]["loras"] == [{"name": "ink", "strength": 0.8}]
    assert [(a["name"], a["strength"]) for a in meta["loras"]] == [("ink", 0.8)]
    before, after = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (base, out))
    assert np.abs(before - after).max() > 10


def test_rows_without_a_name_are_left_out():
    assert lora_pairs(["ink", 0.5, NO_LORA, 2.0, "", -1.0, None, 1.0, " two ", None]) == (
        ("ink", 0.5),
        ("two", 1.0),
    )


def test_dropdowns_list_the_folder_and_refresh_finds_new_files(served):
    _, studio, demo = served
    first = handler(demo, "generate").inputs
    dropdown = next(c for c in first if c.elem_id == "lora-0")
    assert dropdown.choices == [(NO_LORA, NO_LORA), ("ink", "ink")]
    folder = studio.queue.generator.loras.folder.folder
    (folder / "style").mkdir(exist_ok=True)
    shutil.copy(folder / "ink.safetensors", folder / "style" / "wash.safetensors")
    try:
        updates = call(demo, "list_loras", {})
        dropdowns, notes = updates[: 3 * LORA_ROWS], updates[3 * LORA_ROWS :]
        assert len(notes) == 3 and all(not n.visible for n in notes)  # three tabs, each told there are LoRAs
        for update in dropdowns:
            assert [value for _, value in update.choices] == [NO_LORA, "ink", "style/wash"]
    finally:
        shutil.rmtree(folder / "style")


def test_an_empty_folder_says_where_loras_go(served, tmp_path):
    _, studio, _ = served
    loras = studio.queue.generator.loras
    kept, loras.folder = loras.folder, lora.LoraFolder(tmp_path / "none")
    try:
        for lang, words in (("en", "No LoRAs in"), ("zh", "中没有 LoRA")):
            note = lora_note(studio, lang)
            assert words in note and str(tmp_path / "none") in note and "ZSTUDIO_LORAS" in note
    finally:
        loras.folder = kept
    assert lora_note(studio, "en") == ""


def test_recipes_bring_their_loras_back(served):
    _, studio, demo = served
    out, _ = generated(demo, **{"lora-0": "ink", "lora-strength-0": -0.35})
    rows = [NO_LORA, 1.0] * LORA_ROWS
    rows[:2] = ["ink", -0.35]
    assert recipe_updates(out)[5:] == rows  # the send buttons (image to image, inpaint)
    record = next(r for r in studio.queue.history.page(limit=5) if r["params"]["loras"])
    used = handler(demo, "use").fn(record, ui_request())
    assert list(used[8 : 8 + 2 * LORA_ROWS]) == rows  # "Use these settings"
    assert recipe_updates(str(studio.outputs / "missing.png")) == [gr.update()] * (5 + 2 * LORA_ROWS)


def test_refusals_reach_the_page_in_one_line(served):
    _, studio, demo = served
    with pytest.raises(gr.Error) as refused:  # a LoRA since removed: refused before queueing
        call(demo, "generate", {**VALUES, "lora-0": "gone"}, lang="zh")
    assert refused.value.message.startswith("输入有误：loras: no LoRA 'gone'") and "\n" not in refused.value.message
    folder = studio.queue.generator.loras.folder.folder
    other = {"transformer.elsewhere.lora_A.weight": torch.zeros(4, 8),
             "transformer.elsewhere.lora_B.weight": torch.zeros(8, 4)}  # fmt: skip
    save_file(other, str(folder / "other.safetensors"))
    try:  # a LoRA for another model: refused by the engine while the job runs, and the progress line says so
        progress = call(demo, "generate", {**VALUES, "lora-0": "other"})[1]
    finally:
        (folder / "other.safetensors").unlink()
    assert "failed: ParamError: loras: other: 1 of 1 LoRA layers do not match this Z-Image transformer" in progress


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_accordion_speaks_chinese(served):
    from playwright.sync_api import sync_playwright

    page_url, _, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(locale="zh-CN").new_page()
        page.goto(page_url)
        page.locator("#zstudio-progress", has_text="就绪").wait_for(timeout=30_000)
        page.locator("#loras").get_by_text("LoRA 模型").first.click()
        page.get_by_role("button", name="刷新 LoRA 列表").first.wait_for(timeout=10_000)
        assert "强度" in page.inner_text("#lora-strength-0")
        browser.close()
