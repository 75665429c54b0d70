"""Session 9: how far the metric-depth map is from transformers' own on the H100 host (tests/test_preprocessors.py's
test_metric_depth_is_flipped_so_near_is_white failed there). Prints the difference's statistics, no assertion."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, "tests")
import test_preprocessors as t  # noqa: E402

from zstudio import preprocessors  # noqa: E402
from zstudio.settings import load_settings  # noqa: E402

work = Path(tempfile.mkdtemp())
ramp = np.tile(np.linspace(20, 200, 240, dtype=np.uint8), (180, 1))
from PIL import Image, ImageDraw  # noqa: E402

image = Image.fromarray(np.stack([ramp, ramp // 2, 255 - ramp], axis=-1))
draw = ImageDraw.Draw(image)
draw.rectangle((150, 20, 190, 170), fill=(120, 120, 120))
draw.ellipse((40, 40, 140, 140), fill=(250, 240, 230))
image.save(work / "scene.png")
for kind in ("metric", "relative"):
    folder = t.make_depth_model(work / kind, kind=kind)
    os.environ["ZSTUDIO_DEPTH_MODEL"] = str(folder)
    preprocessors._LOADED.clear()
    ours = np.asarray(preprocessors.run("depth", t.fitted(work / "scene.png"), load_settings()))[..., 0].astype(int)
    lib = t.library_depth(folder, t.fitted(work / "scene.png")).astype(int)
    theirs = 255 - lib if kind == "metric" else lib
    d = np.abs(ours - theirs)
    print(kind, "mean", d.mean(), "p99", np.percentile(d, 99), "max", d.max(), "hist", np.bincount(d.ravel())[:8],
          "lib range", lib.min(), lib.max(), flush=True)
