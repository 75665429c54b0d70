"""The web UI (Gradio Blocks), a thin layer over the same job queue as the HTTP API."""

from __future__ import annotations

import random
from typing import Any

import gradio as gr

from ..params import (
    ASPECT_RATIOS,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    GenerationParams,
    ParamError,
)
from .api import Studio, status
from .i18n import I18N, language, text
from .jobs import QueueFull, Unavailable

HISTORY_PAGE = 24


def status_line(studio: Studio, lang: str = "en") -> str:
    s = status(studio)
    gb = s["free_gpu_memory_gb"]
    free = text(lang, "free_memory", gb=gb) if gb is not None else text(lang, "not_available")
    line = text(lang, "status", model=s["model"], device=s["device"], dtype=s["dtype"], speed=s["speed"],
                memory=s["memory_mode"], free=free, waiting=s["queue"]["waiting"])  # fmt: skip
    if s["embedded_default"]:
        line = text(lang, "not_z_image", model=s["model"]) + "\n\n" + line
    return line


def error_message(lang: str, err: Exception) -> str:
    """A refusal in the page's language, ahead of the engine's own English line (which names field and value)."""
    kind = "invalid" if isinstance(err, ParamError) else "busy" if isinstance(err, QueueFull) else "unavailable"
    return text(lang, kind, error=err)


def progress_html(text: str, step: int = 0, total: int = 0) -> str:
    bar = f'<progress value="{step}" max="{total}" style="width:100%"></progress>' if total else ""
    return f'<div id="zstudio-progress">{text}{bar}</div>'


def build_ui(studio: Studio) -> gr.Blocks:
    queue = studio.queue
    profile = queue.generator.profile  # presets, aspect ratios, sliders and defaults follow the loaded model
    aspects = {name: size for name, size in ASPECT_RATIOS.items() if max(size) <= profile.max_side}

    with gr.Blocks(title="zstudio") as demo:
        gr.Markdown(f"# zstudio — {queue.generator.resolve_source().label}")  # the model that runs
        status_md = gr.Markdown(elem_id="zstudio-status")  # filled on load, in the browser's language
        job_id = gr.State(None)
        last_seed = gr.State(None)
        with gr.Tab(I18N("generate_tab")):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(
                        label=I18N("prompt"),
                        lines=3,
                        elem_id="prompt",
                        placeholder=I18N("prompt_placeholder"),
                    )
                    negative = gr.Textbox(label=I18N("negative"), lines=1)
                    with gr.Row():
                        preset_buttons = [gr.Button(f"{w}x{h}", size="sm") for w, h in profile.sizes]
                        aspect = gr.Dropdown(["—", *aspects], value="—", label=I18N("aspect"), visible=bool(aspects))
                    with gr.Row():
                        width = gr.Slider(
                            *profile.side_range, value=profile.width, step=16, label=I18N("width"), elem_id="width"
                        )
                        height = gr.Slider(
                            *profile.side_range, value=profile.height, step=16, label=I18N("height"), elem_id="height"
                        )
                    with gr.Row():
                        steps = gr.Slider(
                            1,
                            MAX_STEPS,
                            value=profile.num_inference_steps,
                            step=1,
                            label=I18N("steps"),
                            elem_id="steps",
                            info=I18N("steps_info"),
                        )
                        cfg = gr.Slider(0, 20, value=profile.cfg_scale, step=0.1, label=I18N("cfg"))
                    with gr.Row():
                        seed = gr.Number(value=-1, precision=0, label=I18N("seed"), elem_id="seed")
                        dice = gr.Button("🎲", size="sm")
                        reuse = gr.Button(I18N("reuse_seed"), size="sm")
                        count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label=I18N("images"), elem_id="images")
                    with gr.Row():
                        run_btn = gr.Button(I18N("generate"), variant="primary", elem_id="generate")
                        cancel_btn = gr.Button(I18N("cancel"), variant="stop")
                with gr.Column(scale=3):
                    progress = gr.HTML(progress_html(""))
                    gallery = gr.Gallery(label=I18N("result"), columns=2, height="auto", elem_id="result")
        with gr.Tab(I18N("history_tab")):
            with gr.Row():
                page = gr.Number(value=1, precision=0, label=I18N("page"), minimum=1)
                refresh = gr.Button(I18N("refresh"), size="sm")
            history_gallery = gr.Gallery(label=I18N("history_gallery"), columns=6, elem_id="history")
            history_info = gr.Markdown(I18N("select_hint"))
            selected = gr.State(None)
            with gr.Row():
                use_btn = gr.Button(I18N("use_settings"))
                delete_btn = gr.Button(I18N("delete_entry"), variant="stop")

        for button, (w, h) in zip(preset_buttons, profile.sizes):
            button.click(lambda w=w, h=h: (w, h), outputs=[width, height])
        aspect.change(lambda a: aspects.get(a, (gr.update(), gr.update())), aspect, [width, height])
        dice.click(lambda: random.randint(0, MAX_SEED - MAX_IMAGES), outputs=seed)
        reuse.click(lambda s: s if s is not None else -1, last_seed, seed)

        def generate(p, neg, w, h, n_steps, g, s, n, request: gr.Request):
            lang = language(request)
            try:
                params = GenerationParams(
                    prompt=p,
                    negative_prompt=neg,
                    width=int(w),
                    height=int(h),
                    num_inference_steps=int(n_steps),
                    cfg_scale=float(g),
                    seed=int(s),
                    num_images=int(n),
                )
                job = queue.submit(params)
            except (ParamError, QueueFull, Unavailable) as err:  # tell the user, keep the page alive
                raise gr.Error(error_message(lang, err)) from None
            while not job.finished:
                seen = job.version
                if job.status == "queued":
                    shown = progress_html(text(lang, "queued", position=queue.position(job.id)))
                else:
                    shown = progress_html(text(lang, "step", step=job.step, total=job.total_steps), job.step,
                                          job.total_steps)  # fmt: skip
                yield gr.update(), shown, job.id, gr.update(), status_line(studio, lang)
                queue.wait(job, seen, 1.0)
            if job.status != "done":
                yield (
                    gr.update(),
                    progress_html(text(lang, "ended", status=text(lang, job.status), error=job.error or "")),
                    None,
                    gr.update(),
                    status_line(studio, lang),
                )
                return
            per_image = (job.seconds or 0) / max(1, len(job.outputs))
            images = [
                (str(studio.outputs / name), text(lang, "caption", seed=sd, seconds=per_image))
                for name, sd in zip(job.outputs, job.seeds)
            ]
            done = progress_html(text(lang, "done", count=len(images), seconds=job.seconds, seeds=job.seeds))
            yield images, done, None, job.seeds[0], status_line(studio, lang)

        run_btn.click(
            generate,
            [prompt, negative, width, height, steps, cfg, seed, count],
            [gallery, progress, job_id, last_seed, status_md],
        )
        cancel_btn.click(lambda j: queue.cancel(j) and None, job_id, None)

        def load_history(page_number):
            offset = (max(1, int(page_number or 1)) - 1) * HISTORY_PAGE
            records = queue.history.page(limit=HISTORY_PAGE, offset=offset)
            items = []
            for r in records:
                caption = f"{r['params']['prompt'][:60]} · {r['status']}"
                for name in r["outputs"][:1]:
                    items.append((str(studio.outputs / name), caption))
            shown = [r for r in records if r["outputs"]]
            return items, shown

        history_records = gr.State([])
        refresh.click(load_history, page, [history_gallery, history_records])
        page.change(load_history, page, [history_gallery, history_records])
        demo.load(load_history, page, [history_gallery, history_records])

        def greet(request: gr.Request):
            lang = language(request)
            return status_line(studio, lang), progress_html(text(lang, "ready"))

        demo.load(greet, None, [status_md, progress])

        def select(records, evt: gr.SelectData, request: gr.Request):
            record = records[evt.index]
            p = record["params"]
            shown = text(language(request), "record", prompt=p["prompt"], negative=p["negative_prompt"] or "—",
                         width=p["width"], height=p["height"], steps=p["num_inference_steps"], cfg=p["cfg_scale"],
                         seeds=record["seeds"], seconds=record["seconds"] or 0)  # fmt: skip
            return record, shown

        history_gallery.select(select, history_records, [selected, history_info])

        def use(record: dict[str, Any] | None, request: gr.Request):
            if not record:
                raise gr.Error(text(language(request), "select_first"))
            p = record["params"]
            return (
                p["prompt"],
                p["negative_prompt"],
                p["width"],
                p["height"],
                p["num_inference_steps"],
                p["cfg_scale"],
                record["seeds"][0] if record["seeds"] else p["seed"],
                p["num_images"],
            )

        use_btn.click(use, selected, [prompt, negative, width, height, steps, cfg, seed, count])

        def delete(record, page_number, request: gr.Request):
            lang = language(request)
            if not record:
                raise gr.Error(text(lang, "select_first"))
            try:
                studio.delete_entry(record["id"])
            except Exception as err:  # still running: say so
                raise gr.Error(text(lang, "refused", error=getattr(err, "detail", err))) from None
            items, shown = load_history(page_number)
            return items, shown, None, text(lang, "deleted", id=record["id"])

        delete_btn.click(delete, [selected, page], [history_gallery, history_records, selected, history_info])
    return demo
