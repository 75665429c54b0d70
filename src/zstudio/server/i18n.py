"""The web UI's words in English and Simplified Chinese (the CLI and the HTTP API stay English).

Labels are Gradio i18n keys (`I18N(key)`), which the browser translates by its language, or by the language picked
under "Settings" in the page's footer. Text the server writes while running (status, progress, errors) is translated
here, by the language the browser sends in Accept-Language (`language(request)`).
"""

from __future__ import annotations

import gradio as gr

LANGUAGES = ("en", "zh")

# key: (English, 简体中文). Placeholders in braces are filled by `text`.
TEXTS: dict[str, tuple[str, str]] = {
    "generate_tab": ("Generate", "生成"),
    "history_tab": ("History", "历史"),
    "prompt": ("Prompt", "提示词"),
    "prompt_placeholder": (
        "a cozy evening street in Kyoto / 一只坐在窗台上的猫",
        "一只坐在窗台上的猫 / a cozy evening street in Kyoto",
    ),
    "negative": ("Negative prompt (used when CFG > 0)", "反向提示词（CFG > 0 时生效）"),
    "aspect": ("Aspect ratio (~1 MP)", "宽高比（约 100 万像素）"),
    "width": ("Width", "宽度"),
    "height": ("Height", "高度"),
    "steps": ("Steps", "步数"),
    "steps_info": (
        "transformer evaluations; Turbo's 8 = the model card's '9' in older diffusers",
        "Transformer 计算次数；Turbo 的 8 即模型卡中旧版 diffusers 的“9”",
    ),
    "cfg": ("CFG (0 = off)", "CFG（0 = 关闭）"),
    "seed": ("Seed (-1 = random)", "种子（-1 = 随机）"),
    "reuse_seed": ("Reuse last seed", "沿用上次种子"),
    "images": ("Images", "张数"),
    "generate": ("Generate", "生成"),
    "cancel": ("Cancel", "取消"),
    "result": ("Result", "结果"),
    "page": ("Page", "页码"),
    "refresh": ("Refresh", "刷新"),
    "history_gallery": ("Past generations (newest first)", "历史生成（最新在前）"),
    "select_hint": ("Select an image to see its settings.", "选择一张图片以查看其参数。"),
    "use_settings": ("Use these settings", "使用这些参数"),
    "delete_entry": ("Delete entry", "删除记录"),
    # Editing and upscaling tabs, and the buttons that send a result to them.
    "img2img_tab": ("Image to image", "图生图"),
    "inpaint_tab": ("Inpaint / Outpaint", "局部重绘 / 扩图"),
    "upscale_tab": ("Upscale", "放大"),
    "source_image": ("Source image", "原图"),
    "strength": ("Strength", "重绘强度"),
    "strength_info": (
        "the share of the steps re-run: low keeps the picture, 1 redraws it",
        "重新运行的步数比例：越低越接近原图，1 为完全重绘",
    ),
    "edit_width": ("Width (0 = the source's)", "宽度（0 = 原图宽度）"),
    "edit_height": ("Height (0 = the source's)", "高度（0 = 原图高度）"),
    "editor": ("Paint the area to repaint (white = repaint)", "涂抹要重绘的区域（白色 = 重绘）"),
    "outpaint_left": ("Extend left (px)", "向左扩展（像素）"),
    "outpaint_right": ("Extend right (px)", "向右扩展（像素）"),
    "outpaint_top": ("Extend top (px)", "向上扩展（像素）"),
    "outpaint_bottom": ("Extend bottom (px)", "向下扩展（像素）"),
    "mask_blur": ("Mask blur (px)", "蒙版羽化（像素）"),
    "run_edit": ("Run", "运行"),
    "scale": ("Scale", "倍数"),
    "upscaler": ("Upscaler", "放大模型"),
    "refine": ("Refine strength (0 = off)", "细化强度（0 = 关闭）"),
    "refine_info": (
        "hires fix: re-render the upscaled picture with its own recipe; 0.2-0.4 keeps the composition",
        "高清修复：用原图的参数重绘放大后的图片；0.2-0.4 保持构图",
    ),
    "upscale": ("Upscale", "放大"),
    "send_img2img": ("Send to image to image", "发送到图生图"),
    "send_inpaint": ("Send to inpaint", "发送到局部重绘"),
    "upscale_x2": ("Upscale x2", "放大 2 倍"),
    # The LoRA accordion of the job tabs.
    "loras": ("LoRA", "LoRA 模型"),
    "lora": ("Name", "名称"),
    "lora_strength": ("Strength", "强度"),
    "refresh_loras": ("Refresh LoRAs", "刷新 LoRA 列表"),
    "rerender": ("Re-render at 1024", "以 1024 重绘"),
    # Written by the server while it runs.
    "status": (
        "**Model** {model} · **device** {device} ({dtype}, speed {speed}) · **memory mode** {memory} · "
        "**GPU memory** {free} · **queue** {waiting} waiting",
        "**模型** {model} · **设备** {device}（{dtype}，加速 {speed}）· **显存模式** {memory} · "
        "**显存** {free} · **队列** {waiting} 个等待中",
    ),
    "free_memory": ("{gb} GB free", "可用 {gb} GB"),
    "not_available": ("n/a", "不可用"),
    "not_z_image": (
        "⚠️ The real Z-Image weights are not available here: this is the {model}, not Z-Image. "
        "Run `zstudio download` (or pass `--model /path/to/folder`) and restart.",
        "⚠️ 此处没有真正的 Z-Image 权重：当前是 {model}，不是 Z-Image。"
        "请运行 `zstudio download`（或传入 `--model /path/to/folder`）后重启。",
    ),
    "ready": ("Ready.", "就绪。"),
    "queued": ("Queued — position {position}", "排队中 — 第 {position} 位"),
    "step": ("Step {step} of {total}", "第 {step} 步，共 {total} 步"),
    "done": (
        "Done: {count} image(s) in {seconds:.2f} s, seeds {seeds}",
        "完成：{count} 张图片，用时 {seconds:.2f} 秒，种子 {seeds}",
    ),
    "ended": ("{status}: {error}", "{status}：{error}"),
    "failed": ("failed", "失败"),
    "cancelled": ("cancelled", "已取消"),
    "caption": ("seed {seed} · {seconds:.2f} s", "种子 {seed} · {seconds:.2f} 秒"),
    "record": (
        "**{prompt}**  \nnegative: {negative} · {width}x{height} · {steps} steps · CFG {cfg} · seeds {seeds} · "
        "{seconds:.2f} s",
        "**{prompt}**  \n反向提示词：{negative} · {width}x{height} · {steps} 步 · CFG {cfg} · 种子 {seeds} · "
        "{seconds:.2f} 秒",
    ),
    "select_first": ("select an entry first", "请先选择一条记录"),
    "deleted": ("Deleted {id}.", "已删除 {id}。"),
    "no_image": ("Upload an image or send a result here first.", "请先上传图片，或把结果发送到这里。"),
    "paint_mask": (
        "Paint the area to repaint, or give pixels to extend by.",
        "请涂抹要重绘的区域，或填写扩展的像素数。",
    ),
    "no_loras": (
        "No LoRAs in `{folder}`: put `.safetensors` files there (or point `ZSTUDIO_LORAS` at another folder), then "
        "press Refresh LoRAs.",
        "`{folder}` 中没有 LoRA：请把 `.safetensors` 文件放到那里（或用 `ZSTUDIO_LORAS` 指定其他文件夹），"
        "然后点击“刷新 LoRA 列表”。",
    ),
    "upscaling": ("Upscaling…", "放大中…"),
    "upscaled": (
        "Done: {width}x{height} in {seconds:.2f} s ({upscaler})",
        "完成：{width}x{height}，用时 {seconds:.2f} 秒（{upscaler}）",
    ),
    "upscale_caption": ("upscale {scale:g}x · {prompt}", "放大 {scale:g}x · {prompt}"),
    "upscale_record": (
        "**Upscale {scale:g}x** of `{source}` · {upscaler} · refine {refine} · {width}x{height} · {seconds:.2f} s  \n"
        "{prompt}",
        "**放大 {scale:g}x**，来源 `{source}` · {upscaler} · 精修 {refine} · {width}x{height} · {seconds:.2f} 秒  \n"
        "{prompt}",
    ),
    # The history's line on an edit or an upscale's source, from the result file's recipe (what `zstudio show` says).
    "edit_record": (
        "**{mode}** of `{image}` ({size}, {format}, sha256 `{sha256}`) · strength {strength} · "
        "{fit} to {width}x{height}",
        "**{mode}**，来源 `{image}`（{size}，{format}，sha256 `{sha256}`）· 重绘强度 {strength} · "
        "{fit}至 {width}x{height}",
    ),
    "edit_mask_file": (
        " · mask `{mask}` (sha256 `{sha256}`) · mask blur {blur} px",
        " · 蒙版 `{mask}`（sha256 `{sha256}`）· 蒙版模糊 {blur} 像素",
    ),  # fmt: skip
    "edit_mask_alpha": (
        " · mask: the image's transparent pixels · mask blur {blur} px",
        " · 蒙版：图片的透明像素 · 蒙版模糊 {blur} 像素",
    ),  # fmt: skip
    "edit_mask_outpaint": (" · mask blur {blur} px", " · 蒙版模糊 {blur} 像素"),
    "edit_outpaint": (" · outpaint {sides}", " · 外扩 {sides}"),
    "mode_image-to-image": ("Image to image", "图生图"),
    "mode_inpaint": ("Inpaint", "局部重绘"),
    "mode_outpaint": ("Outpaint", "外扩"),
    "fit_crop": ("centre-cropped", "居中裁剪"),
    "fit_scale and crop": ("scaled and centre-cropped", "缩放并居中裁剪"),
    "upscale_source": (
        "source {width}x{height}, sha256 `{sha256}` · upscaler {upscaler} ({architecture}, native scale {native})",
        "来源 {width}x{height}，sha256 `{sha256}` · 放大器 {upscaler}（{architecture}，原生倍率 {native}）",
    ),
    "source_gone": (
        "The source {source} is no longer here: the Upscale tab has the settings; add the picture.",
        "来源 {source} 已不在：放大页已填入设置，请添加图片。",
    ),
    # The ControlNet panel of the job tabs: Generate, Image to image, Inpaint / Outpaint (zstudio.control).
    "controlnet": ("ControlNet", "ControlNet 控制"),
    "no_controlnet": (
        "No ControlNet is loaded: start the studio with `--controlnet SPEC` (or ZSTUDIO_CONTROLNET) to use one.",
        "未加载 ControlNet：启动时加 `--controlnet SPEC`（或设置 ZSTUDIO_CONTROLNET）即可使用。",
    ),
    "control_image": ("Control picture", "控制图"),
    "control_type": ("Control type", "控制类型"),
    "control_type_info": (
        "canny: the picture's edges (OpenCV, thresholds 100/200); none: the picture is already a control map",
        "canny：提取图片边缘（OpenCV，阈值 100/200）；none：图片本身已是控制图",
    ),
    "control_scale": ("Control strength", "控制强度"),
    "control_start": ("Control from (share of the steps)", "控制起点（步数比例）"),
    "control_end": ("Control until", "控制终点"),
    "preview_control": ("Preview control image", "预览控制图"),
    "control_preview": ("Control image as the model sees it", "模型看到的控制图"),
    "no_control_image": ("Add a control picture first.", "请先添加控制图。"),
    "control_gone": (
        "The control picture {control} is no longer here: the other control settings are filled; add the picture.",
        "控制图 {control} 已不在：其余控制设置已填入，请添加图片。",
    ),
    # Before an error the engine or the queue wrote (in English, naming the field and the value).
    "invalid": ("Invalid input: {error}", "输入有误：{error}"),
    "busy": ("The queue is full: {error}", "队列已满：{error}"),
    "unavailable": ("The studio cannot run jobs now: {error}", "工作室暂时无法运行任务：{error}"),
    "refused": ("Not possible: {error}", "无法执行：{error}"),
}

I18N = gr.I18n(**{lang: {key: pair[i] for key, pair in TEXTS.items()} for i, lang in enumerate(LANGUAGES)})


def language(request: gr.Request | None) -> str:
    """The browser's first language we have ("zh-CN,zh;q=0.9,en;q=0.8" -> "zh"); English otherwise."""
    header = request.headers.get("accept-language", "") if request is not None else ""
    for part in header.split(","):
        tag = part.split(";")[0].strip().lower()
        base = tag.split("-")[0]
        if base in LANGUAGES:
            return base
    return "en"


def text(lang: str, key: str, **values) -> str:
    """The server-side words for `key` in `lang`, with `values` filled in."""
    english, chinese = TEXTS[key]
    return (chinese if lang == "zh" else english).format(**values)
