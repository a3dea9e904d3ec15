"""The embedded default (`make demo`) end to end at toy size: generated shards -> training with the demo preset ->
zero-shot evaluation of the untrained and trained model -> result file and overlay pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train import demo


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()  # demo.main sets its own thread count
    yield
    torch.set_num_threads(n)


def test_demo_end_to_end_at_toy_size(tmp_path, capsys, keep_threads):
    out = tmp_path / "demo"
    rc = demo.main(
        [
            "--out",
            str(out),
            "--steps",
            "3",
            "data.synthetic_train=96",
            "data.synthetic_val=5",
            "data.batch_size=16",
            "data.num_workers=0",
        ]
    )
    assert rc == 0
    res = json.loads((out / "demo_result.json").read_text())
    assert res["steps"] == 3 and res["val_images"] == 5 and res["eval_scale"] == demo.EVAL_SCALE
    assert res["classes"][0] == "background" and len(res["classes"]) == 7
    for key in ("miou_untrained", "miou_trained", "miou_text_background_untrained", "miou_text_background_trained"):
        assert 0.0 <= res[key] <= 1.0, key
    for key in ("iou_untrained", "iou_trained"):
        iou = np.asarray(res[key])
        assert iou.shape == (7,) and np.all((iou >= 0) & (iou <= 1) | np.isnan(iou)), key
    assert np.isclose(res["miou_trained"], np.nanmean(res["iou_trained"]))
    overlays = sorted((out / "overlays").glob("overlay_*.png"))
    assert len(overlays) == 5
    with Image.open(overlays[0]) as im:  # two rows of four 3x upscaled titled panels, caption on top, legend below
        assert im.size == (4 * 64 * 3 + 3 * 4, 16 + 2 * (64 * 3 + 14) + 22)
        px = np.asarray(im.convert("RGB"))
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 50  # pictures were drawn, not a blank canvas
    ck = torch.load(out / "latest.pt", weights_only=True)  # the CLI reads the demo's protocol from here
    seg = ck["segmentation"]
    assert json.loads(json.dumps(seg)) == seg
    assert seg["classes"] == res["classes"][1:] and all(t.count("{}") == 1 for t in seg["templates"])
    assert seg["bg_thresh"] == res["bg_thresh"] and seg["eval_scale"] == res["eval_scale"]
    assert res["seed"] == 0 and res["groups_per_stage"] == list(ck["config"]["vision"]["num_output_groups"])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "untrained" in printed and str(out / "overlays") in printed
