"""The web UI's ControlNet panels (Generate, Image to image, Inpaint / Outpaint): the preview shows the control image
the model will get at the tab's output size, a job with a control picture carries it into the picture and its record,
a sent or reused controlled result brings its control along, a bad control picture is refused before queueing, and
without a ControlNet each panel is a one-line note.

The handlers are the page's own (found in the built Blocks by name, called with the values of the components they
are wired to), on the tiny checkpoint and its tiny ControlNet, without a browser; browser tests click Preview."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from typing import Any

import cv2
import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import CHROMIUM, FLAGS, Running, ui_request
from zstudio.control import sha256_pixels
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.server.app import create_app
from zstudio.server.ui import build_ui, control_values
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
    """The handler's result: a job's last update, or a preview's picture (decoded from the page's inline PNG)."""
    fn = handler(demo, name)
    result = fn.fn(ui_request(lang), *[values.get(c.elem_id, c.value) for c in fn.inputs])
    if isinstance(result, str):
        return shown(result)
    *_, last = result  # a generator: the last update is the result
    return last


def shown(page_html: str) -> Image.Image:
    """The picture an inline preview shows (a data URL in an <img>)."""
    data = re.search(r'src="data:image/png;base64,([^"]+)"', page_html)[1]
    return Image.open(io.BytesIO(base64.b64decode(data)))


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
    for prefix in ("", "img2img-", "inpaint-"):  # every job tab's panel
        assert components[f"{prefix}controlnet-note"].visible and not components[f"{prefix}control-preview-btn"].visible
    with pytest.raises(gr.Error, match="needs a ControlNet"):
        call(demo, "preview_control", {**VALUES, "control-image": picture})


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_preview_in_the_browser_in_chinese(served, picture):
    from playwright.sync_api import sync_playwright

    page_url, studio, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(locale="zh-CN").new_page()
        page.goto(page_url)
        page.locator("#zstudio-progress", has_text="就绪").wait_for(timeout=30_000)
        page.locator("#controlnet").get_by_text("ControlNet 控制").first.click()
        page.locator("#control-image input[type=file]").set_input_files(picture)
        page.get_by_role("button", name="预览控制图").click()
        page.locator("#control-preview img").wait_for(timeout=30_000)
        page.wait_for_function("document.querySelector('#control-preview img').naturalWidth > 0")  # it loaded
        profile = studio.queue.generator.profile  # the Generate tab's size is the model's default
        assert f"模型看到的控制图 · {profile.width}x{profile.height}" in page.inner_text("#control-preview")
        browser.close()


# ------------------------------------------------------------------------------------------- the edit tabs
# 4 steps: control from 0.25 to 0.75 applies on steps 1 and 2 (diffusers' rule; of 2 steps it would apply on none).
EDIT = {f"{tab}-{key}": value for tab in ("img2img", "inpaint")
        for key, value in {"prompt": "a red circle", "negative": "", "seed": 5, "steps": 4}.items()}  # fmt: skip
CONTROL = {"control-image": None, "control-type": "canny", "control-scale": 0.9, "control-start": 0.25,
           "control-end": 0.75}  # fmt: skip


def controls(prefix: str, picture: str | None) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in {**CONTROL, "control-image": picture}.items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """An edit's source: 160x96 (so the output, and the control image fitted to it, is not the control picture's
    size nor square)."""
    image = Image.new("RGB", (160, 96), (40, 90, 160))
    ImageDraw.Draw(image).rectangle((20, 20, 80, 70), fill=(220, 200, 40))
    path = tmp_path_factory.mktemp("ui-control-source") / "source.png"
    image.save(path)
    return str(path)


def editor_value(path: str, box: tuple[int, int, int, int] | None = (40, 24, 120, 72)) -> dict[str, Any]:
    """The image editor's value: the source as background, a white brush stroke over `box` as the mask layer."""
    background = Image.open(path).convert("RGBA")
    layer = Image.new("RGBA", background.size, (0, 0, 0, 0))
    if box:
        layer.paste((255, 255, 255, 255), box)
    return {"background": background, "layers": [layer], "composite": background}


def assert_records_control(meta: dict[str, Any], picture: str, preview: Image.Image) -> None:
    control = meta["control"]
    expected = ("canny", "canny", 0.9, 0.25, 0.75)
    assert (control["type"], control["preprocessor"], control["scale"], control["start"], control["end"]) == expected
    assert control["source_sha256"] == hashlib.sha256(open(picture, "rb").read()).hexdigest()
    assert control["sha256"] == sha256_pixels(preview)  # the image the model saw is the one the tab's Preview showed


@pytest.fixture(scope="module")
def controlled_edit(served, picture, source) -> str:
    """An image-to-image result of the Image to image tab with a Canny control."""
    _, _, demo = served
    return call(demo, "image_to_image", {**EDIT, "img2img-image": source, **controls("img2img-", picture)})[5][0]


def test_image_to_image_tab_runs_with_control_and_records_it(served, picture, source, controlled_edit):
    _, _, demo = served
    meta = read_metadata(controlled_edit)
    assert meta["edit"]["mode"] == "image-to-image"
    assert meta["edit"]["source"]["sha256"] == hashlib.sha256(open(source, "rb").read()).hexdigest()
    values = {"img2img-image": source, **controls("img2img-", picture)}
    preview = call(demo, "preview_img2img_control", values)
    assert preview.size == Image.open(controlled_edit).size == (160, 96)  # fitted to the edit's output size
    assert_records_control(meta, picture, preview)
    plain = call(demo, "image_to_image", {**EDIT, "img2img-image": source})[5][0]
    assert "control" not in read_metadata(plain)
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (plain, controlled_edit))
    assert np.abs(a - b).max() > 8  # the control changed the picture


def test_inpaint_tab_runs_with_control_and_its_preview_follows_the_outpaint(served, picture, source):
    _, _, demo = served
    values = {**EDIT, "inpaint-editor": editor_value(source), **controls("inpaint-", picture)}
    out = call(demo, "inpaint", values)[5][0]
    meta = read_metadata(out)
    assert meta["edit"]["mode"] == "inpaint" and meta["edit"]["mask"]["from"] == "file"
    assert_records_control(meta, picture, call(demo, "preview_inpaint_control", values))
    extended = call(demo, "preview_inpaint_control", {**values, "outpaint-left": 32, "outpaint-top": 16})
    assert extended.size == (192, 112)  # the canvas grown by the outpaint
    outpainted = call(demo, "inpaint", {**values, "inpaint-editor": editor_value(source, None), "outpaint-left": 32,
                                        "outpaint-top": 16})  # fmt: skip
    meta = read_metadata(outpainted[5][0])
    assert meta["edit"]["mode"] == "outpaint" and Image.open(outpainted[5][0]).size == (192, 112)
    assert_records_control(meta, picture, extended)


def test_a_bad_control_picture_in_an_edit_tab_is_refused_before_queueing(served, source, tmp_path):
    _, studio, demo = served
    not_image = tmp_path / "edges.png"
    not_image.write_text("not a picture")
    jobs, entries = len(studio.queue.jobs), len(studio.queue.history.page(limit=1000))
    cases = [
        ("image_to_image", {**EDIT, "img2img-image": source, **controls("img2img-", str(not_image))}),
        ("inpaint", {**EDIT, "inpaint-editor": editor_value(source), **controls("inpaint-", str(not_image))}),
    ]
    for name, values in cases:
        with pytest.raises(gr.Error) as refused:
            call(demo, name, values, lang="zh")
        message = refused.value.message
        assert message.startswith("输入有误：control: ") and "not a PNG" in message and "\n" not in message
    assert (len(studio.queue.jobs), len(studio.queue.history.page(limit=1000))) == (jobs, entries)  # nothing queued
    with pytest.raises(gr.Error) as refused:  # the preview, too, and without a source there is no size to fit to
        call(demo, "preview_img2img_control", controls("img2img-", str(not_image)))
    assert refused.value.message == "Upload an image or send a result here first."


def sent(demo: gr.Blocks, name: str, *args) -> dict[gr.components.Component, Any]:
    """A send or "use" handler's outputs, by the component they fill."""
    fn = handler(demo, name)
    return dict(zip(fn.outputs, fn.fn(*args, ui_request())))


def panel(page: dict[gr.components.Component, Any], prefix: str) -> list[Any]:
    shown = {c.elem_id: v for c, v in page.items()}
    return [shown[f"{prefix}control-{key}"] for key in ("image", "type", "scale", "start", "end")]


def test_sending_or_reusing_a_controlled_result_keeps_its_control(served, picture, controlled_edit):
    _, studio, demo = served
    kept = studio.inputs.folder / read_metadata(controlled_edit)["params"]["control"]  # the UI's copy, by SHA-256
    assert kept.read_bytes() == open(picture, "rb").read()
    expected = [str(kept), "canny", 0.9, 0.25, 0.75]
    for name, prefix in (("to_img2img", "img2img-"), ("to_inpaint", "inpaint-"), ("to_rerender", "img2img-")):
        assert panel(sent(demo, name, controlled_edit), prefix) == expected, name
    (record,) = [r for r in studio.queue.history.page(limit=50) if r["outputs"] == [controlled_edit.rsplit("/", 1)[1]]]
    assert panel(sent(demo, "use", record), "") == expected  # "Use these settings" fills the Generate tab's panel
    # Sent on and run as the page is then: the new edit is controlled as the first was.
    page = sent(demo, "to_img2img", controlled_edit)
    fn = handler(demo, "image_to_image")
    *_, last = fn.fn(ui_request(), *[page.get(c, c.value) for c in fn.inputs])
    assert read_metadata(last[5][0])["control"] == read_metadata(controlled_edit)["control"]
    plain = call(demo, "generate", VALUES)[5][0]  # a recipe without control clears the panel's picture
    assert panel(sent(demo, "to_img2img", plain), "img2img-")[0] is None


def test_a_recipes_control_picture_is_found_by_name_only(served, tmp_path):
    """A sent file's metadata names its control picture; the panel takes it only from this server's folders, by its
    name: a picture gone, or a path elsewhere (a crafted PNG's), leaves the picture empty and keeps the settings."""
    _, studio, _ = served
    elsewhere = tmp_path / "elsewhere.png"
    Image.new("RGB", (64, 64)).save(elsewhere)
    recipe = {"control_type": "none", "control_scale": 1.25, "control_start": 0.0, "control_end": 0.5}
    for named in ("0" * 64 + ".png", str(elsewhere)):
        with pytest.warns(UserWarning, match="is no longer here"):
            values = control_values(studio, {**recipe, "control": named})
        assert values == [None, "none", 1.25, 0.0, 0.5]
    assert control_values(studio, {"prompt": "x"})[0] is None  # no control: the panel is cleared


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_image_to_image_control_preview_in_the_browser(served, picture, source):
    from playwright.sync_api import sync_playwright

    page_url, _, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(page_url)
        page.locator("#zstudio-progress", has_text="Ready").wait_for(timeout=30_000)
        page.get_by_role("tab", name="Image to image").click()
        page.locator("#img2img-image input[type=file]").set_input_files(source)
        page.wait_for_selector("#img2img-image img", timeout=30_000)
        page.locator("#img2img-controlnet").get_by_text("ControlNet").first.click()
        page.locator("#img2img-control-image input[type=file]").set_input_files(picture)
        page.click("#img2img-control-preview-btn")
        preview = page.locator("#img2img-control-preview img")
        preview.wait_for(timeout=30_000)
        page.wait_for_function("document.querySelector('#img2img-control-preview img').naturalWidth > 0")
        size = preview.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size == [160, 96]  # fitted to the edit's output size (the source's), not the Generate tab's
        # The uploaded pictures show in their boxes (the access guard serves Gradio's copies of real pictures).
        for box in ("#img2img-image img", "#img2img-control-image img"):
            page.wait_for_function(f"document.querySelector('{box}').complete")
            assert page.locator(box).first.evaluate("img => img.naturalWidth") > 0, box
        browser.close()
