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
from .jobs import QueueFull, Unavailable

HISTORY_PAGE = 24


def status_line(studio: Studio) -> str:
    s = status(studio)
    free = f"{s['free_gpu_memory_gb']} GB free" if s["free_gpu_memory_gb"] is not None else "n/a"
    line = (
        f"**Model** {s['model']} · **device** {s['device']} ({s['dtype']}, speed {s['speed']}) · "
        f"**memory mode** {s['memory_mode']} · **GPU memory** {free} · **queue** {s['queue']['waiting']} waiting"
    )
    if s["embedded_default"]:
        line = (
            f"⚠️ The real Z-Image weights are not available here: this is the {s['model']}, not Z-Image. "
            "Run `zstudio download` (or pass `--model /path/to/folder`) and restart.\n\n" + line
        )
    return line


def progress_html(text: str, step: int = 0, total: int = 0) -> str:
    bar = f'<progress value="{step}" max="{total}" style="width:100%"></progress>' if total else ""
    return f'<div id="zstudio-progress">{text}{bar}</div>'


def build_ui(studio: Studio) -> gr.Blocks:
    queue = studio.queue
    profile = queue.generator.profile  # presets, aspect ratios, sliders and defaults follow the loaded model
    aspects = {name: size for name, size in ASPECT_RATIOS.items() if max(size) <= profile.max_side}

    with gr.Blocks(title="zstudio") as demo:
        gr.Markdown("# zstudio — Z-Image-Turbo")
        status_md = gr.Markdown(lambda: status_line(studio), elem_id="zstudio-status")
        job_id = gr.State(None)
        last_seed = gr.State(None)
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(
                        label="Prompt",
                        lines=3,
                        elem_id="prompt",
                        placeholder="a cozy evening street in Kyoto / 一只坐在窗台上的猫",
                    )
                    negative = gr.Textbox(label="Negative prompt (used when CFG > 0)", lines=1)
                    with gr.Row():
                        preset_buttons = [gr.Button(f"{w}x{h}", size="sm") for w, h in profile.sizes]
                        aspect = gr.Dropdown(
                            ["—", *aspects], value="—", label="Aspect ratio (~1 MP)", visible=bool(aspects)
                        )
                    with gr.Row():
                        width = gr.Slider(*profile.side_range, value=profile.width, step=16, label="Width")
                        height = gr.Slider(*profile.side_range, value=profile.height, step=16, label="Height")
                    with gr.Row():
                        steps = gr.Slider(
                            1,
                            MAX_STEPS,
                            value=profile.num_inference_steps,
                            step=1,
                            label="Steps",
                            info="transformer evaluations; Turbo's 8 = the model card's '9' in older diffusers",
                        )
                        cfg = gr.Slider(0, 20, value=profile.cfg_scale, step=0.1, label="CFG (0 = off)")
                    with gr.Row():
                        seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                        dice = gr.Button("🎲", size="sm")
                        reuse = gr.Button("Reuse last seed", size="sm")
                        count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                    with gr.Row():
                        run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel_btn = gr.Button("Cancel", variant="stop")
                with gr.Column(scale=3):
                    progress = gr.HTML(progress_html("Ready."))
                    gallery = gr.Gallery(label="Result", columns=2, height="auto", elem_id="result")
        with gr.Tab("History"):
            with gr.Row():
                page = gr.Number(value=1, precision=0, label="Page", minimum=1)
                refresh = gr.Button("Refresh", size="sm")
            history_gallery = gr.Gallery(label="Past generations (newest first)", columns=6, elem_id="history")
            history_info = gr.Markdown("Select an image to see its settings.")
            selected = gr.State(None)
            with gr.Row():
                use_btn = gr.Button("Use these settings")
                delete_btn = gr.Button("Delete entry", variant="stop")

        for button, (w, h) in zip(preset_buttons, profile.sizes):
            button.click(lambda w=w, h=h: (w, h), outputs=[width, height])
        aspect.change(lambda a: aspects.get(a, (gr.update(), gr.update())), aspect, [width, height])
        dice.click(lambda: random.randint(0, MAX_SEED - MAX_IMAGES), outputs=seed)
        reuse.click(lambda s: s if s is not None else -1, last_seed, seed)

        def generate(p, neg, w, h, n_steps, g, s, n):
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
                raise gr.Error(str(err)) from None
            while not job.finished:
                seen = job.version
                if job.status == "queued":
                    text = progress_html(f"Queued — position {queue.position(job.id)}")
                else:
                    text = progress_html(f"Step {job.step} of {job.total_steps}", job.step, job.total_steps)
                yield gr.update(), text, job.id, gr.update(), status_line(studio)
                queue.wait(job, seen, 1.0)
            if job.status != "done":
                yield (
                    gr.update(),
                    progress_html(f"{job.status}: {job.error or ''}"),
                    None,
                    gr.update(),
                    status_line(studio),
                )
                return
            per_image = (job.seconds or 0) / max(1, len(job.outputs))
            images = [
                (str(studio.outputs / name), f"seed {sd} · {per_image:.2f} s")
                for name, sd in zip(job.outputs, job.seeds)
            ]
            done = progress_html(f"Done: {len(images)} image(s) in {job.seconds:.2f} s, seeds {job.seeds}")
            yield images, done, None, job.seeds[0], status_line(studio)

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

        def select(records, evt: gr.SelectData):
            record = records[evt.index]
            p = record["params"]
            text = (
                f"**{p['prompt']}**  \nnegative: {p['negative_prompt'] or '—'} · {p['width']}x{p['height']} · "
                f"{p['num_inference_steps']} steps · CFG {p['cfg_scale']} · seeds {record['seeds']} · "
                f"{record['seconds'] or 0:.2f} s"
            )
            return record, text

        history_gallery.select(select, history_records, [selected, history_info])

        def use(record: dict[str, Any] | None):
            if not record:
                raise gr.Error("select an entry first")
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

        def delete(record, page_number):
            if not record:
                raise gr.Error("select an entry first")
            try:
                studio.delete_entry(record["id"])
            except Exception as err:  # still running: say so
                raise gr.Error(str(getattr(err, "detail", err))) from None
            items, shown = load_history(page_number)
            return items, shown, None, f"Deleted {record['id']}."

        delete_btn.click(delete, [selected, page], [history_gallery, history_records, selected, history_info])
    return demo
