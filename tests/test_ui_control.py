"""The web UI's ControlNet panel: the preview shows the control image the model will get, a generation with a control
picture carries it into the picture and its record, and without a ControlNet the panel is a one-line note.

The handlers are the page's own (found in the built Blocks by name, called with the values of the components they
are wired to), on the tiny checkpoint and its tiny ControlNet, without a browser; one browser test clicks Preview."""

from __future__ import annotations

from typing import Any

import cv2
import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import CHROMIUM, FLAGS, Running, ui_request
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app
from zstudio.server.ui import build_ui
from zstudio.tiny import CONTROLNET_FOLDER

VALUES = {"prompt": "a red circle", "negative": "", "seed": 5, "steps": 2, "width": 128, "height": 128}  # by elem_id


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu", controlnet=str(tiny_dir / CONTROLNET_FOLDER)).load()
    app = create_app(generator, tmp_path_factory.mktemp("ui-control-outputs"))
    runner = Running(app)
    client = runner.__enter__()
    studio = app.state.studio
    yield f"{client.base_url}/ui/", studio, build_ui(studio)
    runner.__exit__(None, None, None)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    """A disc and a bar on black, wider than the output (so the fit crops it)."""
    image = Image.new("RGB", (192, 128), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 20, 140, 100), fill="white")
    draw.rectangle((150, 10, 170, 120), fill=(128, 128, 128))
    path = tmp_path_factory.mktemp("ui-control") / "shape.png"
    image.save(path)
    return str(path)


def handler(demo: gr.Blocks, name: str):
    return next(fn for fn in demo.fns.values() if fn.name == name)


def call(demo: gr.Blocks, name: str, values: dict[str, Any], lang: str = "en"):
    fn = handler(demo, name)
    result = fn.fn(ui_request(lang), *[values.get(c.elem_id, c.value) for c in fn.inputs])
    if isinstance(result, Image.Image | list | tuple):
        return result
    *_, last = result  # a generator: the last update is the result
    return last


def test_preview_shows_the_fitted_canny_edges(served, picture):
    _, _, demo = served
    shown = call(demo, "preview_control", {**VALUES, "control-image": picture, "control-type": "canny"})
    fitted = Image.open(picture).resize((192, 128), Image.Resampling.LANCZOS).crop((32, 0, 160, 128))
    assert shown.size == (128, 128)
    assert np.array_equal(np.asarray(shown)[..., 0], cv2.Canny(np.asarray(fitted.convert("L")), 100, 200))
    ready = call(demo, "preview_control", {**VALUES, "control-image": picture, "control-type": "none"})
    assert np.array_equal(np.asarray(ready), np.asarray(fitted.convert("RGB")))  # a ready map: only fitted
    with pytest.raises(gr.Error) as refused:
        call(demo, "preview_control", {**VALUES, "control-image": None}, lang="zh")
    assert refused.value.message == "请先添加控制图。"


def test_generate_with_a_control_picture_records_it_and_changes_the_picture(served, picture):
    _, _, demo = served
    plain = call(demo, "generate", VALUES)[5][0]
    values = {**VALUES, "control-image": picture, "control-type": "canny", "control-scale": 0.9, "control-end": 0.5}
    controlled = call(demo, "generate", values)[5][0]
    recipe = read_metadata(controlled)["control"]
    assert (recipe["type"], recipe["preprocessor"], recipe["scale"], recipe["end"]) == ("canny", "canny", 0.9, 0.5)
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (plain, controlled))
    assert np.abs(a - b).max() > 8


def test_without_a_controlnet_the_panel_is_a_note(generator, tmp_path, picture):
    app = create_app(generator, tmp_path / "outputs")
    demo = build_ui(app.state.studio)
    components = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    assert components["controlnet-note"].visible and not components["control-preview-btn"].visible
    with pytest.raises(gr.Error, match="needs a ControlNet"):
        call(demo, "preview_control", {**VALUES, "control-image": picture})


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_preview_in_the_browser_in_chinese(served, picture):
    from playwright.sync_api import sync_playwright

    page_url, _, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(locale="zh-CN").new_page()
        page.goto(page_url)
        page.locator("#zstudio-progress", has_text="就绪").wait_for(timeout=30_000)
        page.locator("#controlnet").get_by_text("ControlNet 控制").first.click()
        page.locator("#control-image input[type=file]").set_input_files(picture)
        page.get_by_role("button", name="预览控制图").click()
        page.locator("#control-preview img").wait_for(timeout=30_000)
        browser.close()
