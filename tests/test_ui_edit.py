"""The web UI's edit tabs: image to image, inpaint / outpaint, upscale, and the buttons that send results to them.

The logic runs through the tabs' own handler functions with a real Studio on the tiny checkpoint (no browser); two
browser tests check the wiring (send buttons, tab switching, a brush stroke in Gradio's ImageEditor as the mask, the
Chinese labels).
"""

from __future__ import annotations

import hashlib

import gradio as gr
import numpy as np
import pytest
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from helpers import CHROMIUM, FLAGS, Running, ui_request
from test_lora import reference_layers, write_format
from test_ui_lora import handler
from zstudio import lora
from zstudio.engine import Generator
from zstudio.outputs import read_metadata
from zstudio.params import GenerationParams
from zstudio.server.app import create_app
from zstudio.server.ui import (
    edit_request,
    file_recipe,
    hires_request,
    inpaint_request,
    inputs_folder,
    record_text,
    run_job,
    upscale_job,
)
from zstudio.upscale import RERENDER_SETS

RECIPE = {"prompt": "a red circle", "negative_prompt": "", "num_inference_steps": 2, "cfg_scale": 0.0, "seed": 5,
          "num_images": 1}  # fmt: skip


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    generator = Generator(model=str(tiny_dir), device="cpu").load()
    folder = tmp_path_factory.mktemp("ui-edit-loras")  # ink0 ... ink4: more LoRAs than a tab has rows
    sd, _ = write_format(reference_layers(generator.pipe.transformer, 1), "peft")
    for i in range(5):
        save_file(sd, str(folder / f"ink{i}.safetensors"))
    generator.loras.folder = lora.LoraFolder(folder)
    app = create_app(generator, tmp_path_factory.mktemp("ui-edit-outputs"))
    runner = Running(app)
    client = runner.__enter__()
    yield f"{client.base_url}/ui/", app.state.studio
    runner.__exit__(None, None, None)


def finish(steps) -> tuple:
    """Drain a handler's updates; the last one is the result."""
    *_, last = steps
    return last


@pytest.fixture(scope="module")
def draft(served):
    _, studio = served
    files = finish(run_job(studio, "en", lambda: GenerationParams(**RECIPE, width=256, height=256)))[5]
    return files[0]


def test_inpaint_keeps_the_pixels_outside_the_painted_mask(served, draft):
    _, studio = served
    source = Image.open(draft).convert("RGBA")
    layer = Image.new("RGBA", source.size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (96, 96, 160, 160))  # a white brush stroke, as the editor exports it
    editor = {"background": source, "layers": [layer], "composite": source}
    sides = dict.fromkeys(("left", "right", "top", "bottom"), 0)
    make = lambda: inpaint_request(studio, RECIPE, editor, 1.0, 0, 0, sides, 4)  # noqa: E731
    out = finish(run_job(studio, "en", make))[5][0]
    meta = read_metadata(out)
    assert meta["edit"]["mode"] == "inpaint" and meta["edit"]["mask"]["from"] == "file"
    before, after = (
        np.asarray(source.convert("RGB")).astype(int),
        np.asarray(Image.open(out).convert("RGB")).astype(int),
    )
    outside = np.ones(before.shape[:2], bool)
    outside[96 - 12 : 160 + 12, 96 - 12 : 160 + 12] = False  # the mask plus its soft edge
    assert (before[outside] == after[outside]).all()
    assert np.abs(before[100:156, 100:156] - after[100:156, 100:156]).mean() > 5  # repainted inside


def test_upscale_and_rerender_follow_the_source(served, draft):
    _, studio = served
    out = finish(upscale_job(studio, "en", draft, 2.0, "lanczos", 0))[2][0]
    assert Image.open(out).size == (512, 512)
    recipe = read_metadata(out)
    assert recipe["upscale"]["scale"] == 2.0 and recipe["upscale"]["upscaler"]["name"] == "lanczos"
    assert recipe["source"]["sha256"] == hashlib.sha256(open(draft, "rb").read()).hexdigest()
    hires = hires_request(draft)  # "Re-render at 1024": the draft's own recipe, larger, at a low strength
    assert (hires.width, hires.height, hires.strength, hires.image) == (1024, 1024, 0.3, draft)
    assert (hires.prompt, hires.seed, hires.num_inference_steps) == (RECIPE["prompt"], 5, 2)


def run_wired(demo: gr.Blocks, send: str, run: str, path: str) -> dict:
    """Click a send button as the page wires it: `send`'s outputs fill the page, then `run` takes the page's values
    (each component's initial value where `send` set none). Returns the recipe of the job's first picture."""
    sent = handler(demo, send)
    page = {id(c): v for c, v in zip(sent.outputs, sent.fn(path, ui_request()))}
    job = handler(demo, run)
    *_, last = job.fn(ui_request(), *(page.get(id(c), c.value) for c in job.inputs))
    return read_metadata(last[5][0])["params"]


def test_rerender_and_send_keep_every_field_of_the_sources_recipe(served):
    """Fields without a control in the edit tabs (max_sequence_length, cfg_normalization, cfg_truncation, the output
    format, LoRAs past the rows) travel with the sent picture; only what the re-render sets itself differs."""
    _, studio = served
    loras = [(f"ink{i}", 0.1 * (i + 1)) for i in range(5)]
    recipe = {**RECIPE, "negative_prompt": "blurry", "cfg_scale": 1.5, "max_sequence_length": 77,
              "cfg_normalization": 1.2, "cfg_truncation": 0.9, "loras": loras, "output_format": "webp"}  # fmt: skip
    draft = finish(run_job(studio, "en", lambda: GenerationParams(**recipe, width=64, height=64)))[5][0]
    source = read_metadata(draft)["params"]
    assert source["max_sequence_length"] == 77 and len(source["loras"]) == 5  # what must travel
    kept = {k: v for k, v in source.items() if k not in RERENDER_SETS}

    rerendered = run_wired(studio.blocks, "to_rerender", "image_to_image", draft)
    assert {k: v for k, v in rerendered.items() if k not in RERENDER_SETS} == kept
    assert (rerendered["width"], rerendered["strength"]) == (1024, 0.3)

    sent = run_wired(studio.blocks, "to_img2img", "image_to_image", draft)
    assert {k: v for k, v in sent.items() if k not in RERENDER_SETS} == kept
    assert (sent["width"], sent["height"]) == (64, 64)


def test_the_history_shows_an_edits_source_mask_and_strength(served, draft):
    _, studio = served
    mask = Image.new("L", Image.open(draft).size, 0)
    mask.paste(255, (64, 64, 128, 128))
    out = finish(run_job(studio, "en", lambda: edit_request(studio, RECIPE, draft, mask, 0.8, mask_blur=2)))[5][0]
    (record,) = [r for r in studio.queue.history.page(limit=5) if r["outputs"] == [out.rsplit("/", 1)[1]]]
    recipe = file_recipe(out)
    source_sha = hashlib.sha256(open(draft, "rb").read()).hexdigest()
    mask_sha = recipe["edit"]["mask"]["sha256"]
    line = record_text(record, "en", recipe)
    # The UI keeps its own copy of the source, named by its SHA-256.
    assert f"**Inpaint** of `{source_sha}.png` (256x256, PNG, sha256 `{source_sha}`) · strength 0.8" in line
    assert f"mask `{mask_sha}.png` (sha256 `{mask_sha}`) · mask blur 2 px" in line
    assert "**局部重绘**" in record_text(record, "zh", recipe)
    assert "Inpaint" not in record_text(record, "en")  # without the file's recipe: the generation's line only


def test_bad_edits_are_refused_in_one_line_in_the_users_language(served, draft, tmp_path):
    _, studio = served
    small_mask = tmp_path / "mask.png"
    Image.new("L", (128, 128), 255).save(small_mask)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = [
        (lambda: edit_request(studio, RECIPE, draft, Image.open(small_mask)), "输入有误：mask: is 128x128"),
        (lambda: edit_request(studio, RECIPE, str(not_image)), "输入有误：image: notes.png is not a PNG"),
        (lambda: edit_request(studio, RECIPE, draft, strength=1.5), "输入有误：strength: 1.5 is outside 0-1"),
    ]
    for make, message in cases:
        with pytest.raises(gr.Error) as refused:
            finish(run_job(studio, "zh", make))
        assert str(refused.value.message).startswith(message) and "\n" not in refused.value.message
    with pytest.raises(gr.Error) as refused:  # upscales too (through the studio's door: names it knows, not paths)
        finish(upscale_job(studio, "zh", draft, 2.0, "no-such-upscaler", 0))
    assert refused.value.message.startswith("输入有误：model: 'no-such-upscaler' is not an upscaler of this server")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_send_a_result_to_img2img_upscale_and_inpaint_from_the_browser(served):
    from playwright.sync_api import sync_playwright

    page_url, studio = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(page_url)
        page.locator("#zstudio-progress", has_text="Ready").wait_for(timeout=30_000)
        page.fill("#prompt textarea", "a red circle")
        page.get_by_role("button", name="512x512").click()
        page.locator("#steps input[type=number]").fill("2")
        page.locator("#steps input[type=number]").press("Enter")
        page.click("#generate")
        page.locator("#zstudio-progress", has_text="Done").wait_for(timeout=60_000)
        first = sorted(studio.outputs.glob("outputs_*.png"))[-1]

        page.click("#generate-send-img2img")
        page.wait_for_selector("#img2img-image img", timeout=30_000)
        assert page.input_value("#img2img-prompt textarea") == "a red circle"  # the source's own recipe
        page.locator("#img2img-strength input[type=number]").fill("0.45")
        page.locator("#img2img-strength input[type=number]").press("Enter")
        page.click("#img2img-run")
        page.locator("#img2img-progress", has_text="Done").wait_for(timeout=60_000)
        edited = sorted(studio.outputs.glob("outputs_*.png"))[-1]
        recipe = read_metadata(edited)["edit"]
        assert recipe["source"]["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
        assert recipe["strength"] == 0.45 and recipe["mode"] == "image-to-image"

        page.click("#img2img-upscale-x2")  # an edit's result, sent on: Lanczos by default
        page.locator("#upscale-progress", has_text="Done: 1024x1024").wait_for(timeout=60_000)
        upscaled = sorted(studio.outputs.glob("outputs_*.png"))[-1]
        assert Image.open(upscaled).size == (1024, 1024)
        assert read_metadata(upscaled)["source"]["sha256"] == hashlib.sha256(edited.read_bytes()).hexdigest()

        page.get_by_role("tab", name="Generate").click()
        page.click("#generate-send-inpaint")  # nothing painted, no outpaint: a one-line message, the page goes on
        page.wait_for_selector("#inpaint-editor canvas", timeout=30_000)
        page.click("#inpaint-run")
        page.get_by_text("Paint the area to repaint, or give pixels to extend by.").wait_for(timeout=10_000)
        page.locator("#inpaint-editor button[aria-label=Brush]").click()  # a stroke across the middle
        box = page.locator("#inpaint-editor canvas").first.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x - 40, y)
        page.mouse.down()
        page.mouse.move(x + 40, y, steps=20)
        page.mouse.up()
        page.click("#inpaint-run")
        page.locator("#inpaint-progress", has_text="Done").wait_for(timeout=60_000)
        inpainted = sorted(studio.outputs.glob("outputs_*.png"))[-1]
        recipe = read_metadata(inpainted)["edit"]
        mask = Image.open(inputs_folder(studio) / f"{recipe['mask']['sha256']}.png")
        painted = np.asarray(mask) > 127
        assert recipe["mode"] == "inpaint" and mask.size == (512, 512) and 0 < painted.mean() < 0.2
        kept = ~(np.asarray(mask.filter(ImageFilter.MaxFilter(25))) > 127)  # beyond the stroke and its soft edge
        before, after = np.asarray(Image.open(first).convert("RGB")), np.asarray(Image.open(inpainted).convert("RGB"))
        assert (before[kept] == after[kept]).all() and (before[painted] != after[painted]).any()
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_edit_tabs_speak_chinese(served):
    from playwright.sync_api import sync_playwright

    page_url, _ = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_context(locale="zh-CN").new_page()
        page.goto(page_url)
        page.locator("#zstudio-progress", has_text="就绪").wait_for(timeout=30_000)
        for tab in ("图生图", "局部重绘 / 扩图", "放大"):
            assert page.get_by_role("tab", name=tab).count() == 1
        assert page.inner_text("#generate-send-img2img").strip() == "发送到图生图"
        page.get_by_role("tab", name="放大").click()
        page.get_by_text("细化强度（0 = 关闭）").first.wait_for(timeout=10_000)
        browser.close()
