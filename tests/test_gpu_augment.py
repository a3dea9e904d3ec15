"""augment_on=gpu: batched device ops against PIL's, parameter draws, DCT-scaled crop decoding, the loader path
(determinism, resume, workers) and its agreement with the CPU path where both are deterministic."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from train.data import build_train_loader, write_shards
from train.gpu_augment import DeviceAugment
from train.transforms import _FILL, _OPS, RandAugment, decode_crop, random_resized_crop


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth image with texture (gradients + blobs + noise): every op has something to change."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([200 * xx + 30, 180 * yy + 40, 120 * np.sin(6 * xx * yy) + 120], -1)
    base += rng.normal(0, 12, base.shape)
    return base.clip(0, 255).astype(np.uint8)


class _FixedSign(random.Random):
    """``random()`` fixed: 0.0 makes the PIL ops' ``_signed`` keep the sign, 1.0 flips it."""

    def __init__(self, value: float):
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("name", RandAugment.OPS)
def test_device_ops_match_pil(name):
    binary = np.where(_photo(37, 37, 1) > 128, 200, 10).astype(np.uint8)
    aug = DeviceAugment(37)
    for arr in (_photo(37, 37), np.full((37, 37, 3), 77, np.uint8), binary):  # textured, constant, two levels
        img = Image.fromarray(arr)
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()  # [1, 3, 37, 37]
        for sign, value in ((1.0, 0.0), (-1.0, 1.0)):
            for m in (3.7, 9.2):
                ref = np.array(_OPS[name](img, m, _FixedSign(value), _FILL)).astype(np.int32)
                p = torch.tensor([[RandAugment.OPS.index(name), m, sign]], dtype=torch.float64)
                out = aug._rand_augment_slot(x.clone(), p)[0].permute(1, 2, 0).numpy().astype(np.int32)
                diff = np.abs(out - ref)
                assert diff.max() <= 1 and diff.mean() < 0.05, (name, sign, m, diff.max(), diff.mean())


def test_apply_flip_normalise_erase_exact_and_reproducible():
    aug = DeviceAugment(20, rand_augment=None)
    assert aug.num_params == 7
    imgs = torch.from_numpy(np.stack([_photo(20, 20, s) for s in range(3)])).permute(0, 3, 1, 2).contiguous()
    p = torch.zeros(3, 7, dtype=torch.float64)
    p[1, 0] = 1  # flip sample 1
    p[2, 1:6] = torch.tensor([1, 3, 5, 4, 6])  # erase rows 3..6, cols 5..10 of sample 2
    p[:, 6] = torch.tensor([11, 22, 33])
    out = aug.apply(imgs, p)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    want = (imgs.float() / 255 - mean) / std
    want[1] = want[1].flip(-1)
    box = torch.zeros(20, 20, dtype=torch.bool)
    box[3:7, 5:11] = True
    torch.testing.assert_close(out[:2], want[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2][:, ~box], want[2][:, ~box], rtol=0, atol=1e-6)
    assert not torch.allclose(out[2][:, box], want[2][:, box]) and out[2][:, box].abs().max() < 6
    torch.testing.assert_close(aug.apply(imgs, p), out, rtol=0, atol=0)  # same rows -> same noise
    p[:, 6] += 1
    assert not torch.equal(aug.apply(imgs, p)[2], out[2])


def test_sample_params_reproducible_and_distributed_as_the_recipe():
    aug = DeviceAugment(224)
    assert np.array_equal(aug.sample_params(random.Random(5)), aug.sample_params(random.Random(5)))
    rows = np.stack([aug.sample_params(random.Random(i)) for i in range(3000)])
    assert abs(rows[:, 0].mean() - 0.5) < 0.04  # flip p = 0.5
    ops = rows[:, [1, 4]]
    assert abs((ops >= 0).mean() - 0.5) < 0.03  # each op applied with p = 0.5
    assert set(np.unique(ops[ops >= 0]).astype(int)) == set(range(15))
    mags = rows[:, [2, 5]]
    assert abs(mags.mean() - 9.0) < 0.05 and 0.4 < mags.std() < 0.6 and mags.max() <= 10
    erase = rows[:, 7:12]
    on = erase[:, 0] > 0
    assert abs(on.mean() - 0.25) < 0.03
    top, left, h, w = erase[on, 1:].T
    assert (top + h <= 224).all() and (left + w <= 224).all() and (h * w >= 0.015 * 224**2).all()
    off = DeviceAugment(32, augment=False)
    assert not off.sample_params(random.Random(0)).any()


def _jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_decode_crop_uses_dct_scaling_for_large_jpegs(monkeypatch):
    data = _jpeg(_photo(1024, 768))
    drafts = []
    real = JpegImageFile.draft

    def spy(self, mode, size):
        drafts.append(size)
        return real(self, mode, size)

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    diffs = []
    for seed in range(6):
        out = decode_crop(data, 64, random.Random(seed), scale=(0.5, 1.0))
        ref = np.array(random_resized_crop(full, 64, random.Random(seed), scale=(0.5, 1.0)))  # same draws
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        diffs.append(np.abs(out.astype(int) - ref).mean())
    assert len(drafts) == 6 and all(w < 1024 / 4 for w, _ in drafts)  # every crop >= 2x: decoded at <= 1/4
    assert max(diffs) < 3.0, diffs
    # a PNG (no DCT scaling) gives exactly the full-decode crop
    buf = io.BytesIO()
    full.save(buf, format="PNG")
    np.testing.assert_array_equal(
        decode_crop(buf.getvalue(), 64, random.Random(1)), np.array(random_resized_crop(full, 64, random.Random(1)))
    )


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gpu_aug")
    samples = [(f"k{i:03d}", _jpeg(_photo(40 + i % 7, 36 + i % 5, i)), f"photo {i} of a dog") for i in range(40)]
    write_shards(samples, root, "jp", maxcount=10)
    return str(root / "jp-{000000..000003}.tar")


def _run(urls, start=0, **kw):
    args = dict(batch_size=4, img_size=24, shuffle_buffer=8, seed=1, epoch_len=5, augment_on="gpu")
    args.update(kw)
    loader = build_train_loader(urls, **args)
    return [b for b in loader.iter_epoch(0, start)]


def test_loader_gpu_path_deterministic_resumable_and_worker_invariant(jpeg_shards):
    full = _run(jpeg_shards)
    assert len(full) == 5
    for b in full:
        assert b["images"].dtype == torch.float32 and b["images"].shape == (4, 3, 24, 24)
        assert "aug_params" not in b and bool(torch.isfinite(b["images"]).all())
    again = _run(jpeg_shards)
    resumed = _run(jpeg_shards, start=2)
    for a, b in zip(full, again):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    for a, b in zip(full[2:], resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    w2 = _run(jpeg_shards, num_workers=2)
    w2_resumed = _run(jpeg_shards, start=3, num_workers=2)
    for a, b in zip(w2[3:], w2_resumed):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    # augmentation differs per sample and per epoch
    assert not torch.allclose(full[0]["images"][0], full[0]["images"][1])


def test_gpu_path_without_augmentation_equals_cpu_path(tmp_path):
    samples = [(f"s{i}", Image.fromarray(_photo(16, 16, i)), f"caption {i}") for i in range(6)]
    urls = write_shards(samples, tmp_path, "sq", maxcount=6, image_format="png")
    kw = dict(batch_size=3, img_size=16, augment=False, shuffle_buffer=0, epoch_len=None)
    gpu = _run(urls, augment_on="gpu", **kw)
    cpu = _run(urls, augment_on="cpu", **kw)
    assert len(gpu) == len(cpu) == 2
    for a, b in zip(gpu, cpu):
        assert a["keys"] == b["keys"]
        torch.testing.assert_close(a["images"], b["images"], rtol=0, atol=1e-5)


def test_gpu_path_rejects_a_custom_transform(jpeg_shards):
    with pytest.raises(ValueError, match="augment_on='cpu'"):
        build_train_loader(jpeg_shards, batch_size=2, augment_on="gpu", transform=lambda im, rng: im)
    with pytest.raises(ValueError, match="augment_on must be one of"):
        build_train_loader(jpeg_shards, batch_size=2, augment_on="tpu")


def test_training_killed_and_resumed_with_gpu_augmentation(jpeg_shards, tmp_path):
    """The driver with augment_on=gpu (on CPU torch here): a run cut after 1 step and resumed gives the same losses."""
    import math

    from train.config import load_config
    from train.loop import train

    def cfg(out, **kw):
        ov = {
            "data.train_shards": [jpeg_shards],
            "data.batch_size": 4,
            "data.num_workers": 0,
            "data.img_size": 32,
            "data.shuffle_buffer": 8,
            "data.augment_on": "gpu",
            "data.multi_label": 0,
            "model.preset": "groupvit-tiny",
            "optim.steps_per_epoch": 1,
            "optim.epochs": 2,
            "optim.warmup_epochs": 0.5,
            "optim.lr_ref_batch": 4,
            "output_dir": str(out),
            "log_interval": 1,
            "ckpt_interval": 100,
            "progress": False,
            "seed": 5,
            **kw,
        }
        return load_config(overrides=ov)

    full = [h["loss"] for h in train(cfg(tmp_path / "full"))["history"]]
    assert len(full) == 2 and all(math.isfinite(v) for v in full)
    part = train(cfg(tmp_path / "cut", max_steps=1))["history"]  # resumed at the start of epoch 1
    rest = train(cfg(tmp_path / "cut", resume="auto"))["history"]
    assert [h["loss"] for h in part + rest] == pytest.approx(full, abs=1e-6, rel=0)
