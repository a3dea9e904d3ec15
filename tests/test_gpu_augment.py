"""augment_on=gpu: batched device ops against PIL's, parameter draws, the crops' regions and their batched resize
against PIL's, DCT-scaled decoding, the loader path (determinism, resume, workers, corrupt images) and its agreement
with the CPU path where both are deterministic."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import build_train_loader, write_shards
from train.gpu_augment import DeviceAugment
from train.transforms import (
    _FILL,
    _OPS,
    RandAugment,
    center_crop,
    decode_region,
    random_resized_crop,
    random_resized_crop_params,
    resize_short_side,
)


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


def _resized(regions, size: int, dtype=None) -> np.ndarray:
    """``DeviceAugment.crop_resize`` of ``decode_region``-style results → ``int [B, S, S, 3]``."""
    aug = DeviceAugment(size)
    flat, rows = aug.pack_regions(regions)
    assert flat.numel() == sum(r.size for r, _ in regions) and rows.shape == (len(regions), 6)
    return aug.crop_resize(flat, rows, dtype=dtype).permute(0, 2, 3, 1).numpy().astype(int)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16 is what CUDA uses
def test_crop_resize_is_pils_bilinear_resize(dtype):
    """Odd region sizes, fractional boxes, down- and upsampling, boxes on the region's edges, and real decoded
    regions: PIL's fixed-point resize (the oracle) within 1 grey level in float32, 2 in float16."""
    regions, boxes = (
        [],
        [(0.0, 0.0, 37.0, 29.0), (3.25, 1.5, 30.75, 20.0), (10.0, 7.0, 19.0, 15.5), (0.5, 0.0, 71.0, 9.0)],
    )
    for i, box in enumerate(boxes):
        regions.append((_photo(37 + 34 * (i == 3), 29, i)[: [29, 29, 29, 9][i]], box))
    regions.append((_photo(151, 140, 9)[5:140, 2:151], (1.7, 0.4, 148.1, 134.9)))  # a view, not contiguous
    regions += [decode_region(_jpeg(_photo(300 + 7 * s, 211, s)), 23, random.Random(s)) for s in range(4)]
    out = _resized(regions, 23, dtype)
    for (region, box), got in zip(regions, out):
        want = np.array(
            Image.fromarray(np.ascontiguousarray(region)).resize((23, 23), Image.Resampling.BILINEAR, box=box)
        )
        diff = np.abs(got - want)
        # float16 rounds the weights and the horizontal pass's sums (spacing 1/8 above 128)
        if dtype == torch.float32:
            assert diff.max() <= 1 and diff.mean() < 0.03, (box, diff.mean())
        else:
            assert diff.max() <= 2 and diff.mean() < 0.15, (box, diff.max(), diff.mean())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crop_resize_on_cuda_is_pils_resize():
    """On CUDA (float16 matmuls by default) the batched resize of real decoded regions stays within 2 grey levels
    of PIL's (0.15 on average), and the whole device half runs there."""
    aug = DeviceAugment(64)
    regions = [decode_region(_jpeg(_photo(300 + 7 * s, 211, s)), 64, random.Random(s)) for s in range(6)]
    flat, rows = aug.pack_regions(regions)
    out = aug.crop_resize(flat.cuda(), rows)
    assert out.is_cuda and out.dtype == torch.uint8
    for (region, box), got in zip(regions, out.permute(0, 2, 3, 1).cpu().numpy().astype(int)):
        want = np.array(
            Image.fromarray(np.ascontiguousarray(region)).resize((64, 64), Image.Resampling.BILINEAR, box=box)
        )
        assert np.abs(got - want).max() <= 2 and np.abs(got - want).mean() < 0.15
    params = torch.from_numpy(np.stack([aug.sample_params(random.Random(s)) for s in range(6)]))
    assert bool(torch.isfinite(aug.apply(out, params)).all())


def test_crop_resize_rejects_mismatched_rows():
    aug = DeviceAugment(8)
    flat, rows = aug.pack_regions([(np.zeros((4, 5, 3), np.uint8), (0.0, 0.0, 5.0, 4.0))])
    with pytest.raises(ValueError, match="rows describe 60 bytes, flat has 59"):
        aug.crop_resize(flat[:-1], rows)
    with pytest.raises(ValueError, match="expected flat uint8"):
        aug.crop_resize(flat.float(), rows)


def test_decode_region_then_resize_is_the_cpu_crop():
    """Crops below 2x the target (no DCT scaling), a PNG, and the center crop without augmentation: the region +
    the batched resize give PIL's random_resized_crop of the full decode (same draws) within 1 grey level."""
    full = _photo(203, 157, 4)
    for data in (_jpeg(full), _png(full)):
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        regions = [decode_region(data, 48, random.Random(s), scale=(0.05, 0.15)) for s in range(6)]
        want = np.stack(
            [np.array(random_resized_crop(decoded, 48, random.Random(s), scale=(0.05, 0.15))) for s in range(6)]
        )
        diff = np.abs(_resized(regions, 48) - want)
        assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())
        assert all(r.shape[0] < 157 and r.shape[1] < 203 for r, _ in regions)  # only the crop (+ margin) is kept
    for side in (40, 150):  # without augmentation: resize the short side, center crop (as TrainTransform)
        region, box = decode_region(_png(full), side, random.Random(0), augment=False)
        want = np.array(center_crop(resize_short_side(decoded, side), side))
        assert np.abs(_resized([(region, box)], side)[0] - want).max() <= 1


def test_decode_region_uses_dct_scaling_for_large_jpegs():
    data = _jpeg(_photo(1024, 768))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    regions = [decode_region(data, 64, random.Random(s), scale=(0.5, 1.0)) for s in range(6)]
    for (region, (x0, y0, x1, y1)), s in zip(regions, range(6)):
        _, _, h, w = random_resized_crop_params(1024, 768, (0.5, 1.0), (3 / 4, 4 / 3), random.Random(s))
        assert x1 - x0 <= w / 4 and y1 - y0 <= h / 4  # every crop >= 2x the target each way: decoded at <= 1/4
        assert x1 - x0 >= 64 and y1 - y0 >= 64  # ... and still at least the target size
    want = np.stack([np.array(random_resized_crop(full, 64, random.Random(s), scale=(0.5, 1.0))) for s in range(6)])
    diffs = np.abs(_resized(regions, 64) - want).mean((1, 2, 3))
    assert max(diffs) < 3.0, diffs


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


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


def test_gpu_path_jpeg_oddities_decoded_or_counted(tmp_path):
    """libjpeg warnings (extraneous bytes before EOI) and CMYK go through PIL and are kept, with PIL's pixels; a
    truncated JPEG is counted as corrupt and a too-large one as oversized, as on the CPU path."""
    arr = _photo(24, 20, 3)
    good = _jpeg(arr)
    warned = good[:-2] + b"\x00\x00\x00" + good[-2:]
    cmyk = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    big = _jpeg(_photo(64, 64, 1))
    samples = [("warned", warned, "a"), ("cmyk", cmyk.getvalue(), "b"), ("cut", good[: len(good) // 2], "c")]
    samples.append(("big", big, "d"))
    urls = write_shards(samples, tmp_path, "odd", maxcount=10)
    for augment_on in ("gpu", "cpu"):
        loader = build_train_loader(
            urls, batch_size=1, img_size=16, augment=False, shuffle_buffer=0, max_pixels=2000, augment_on=augment_on
        )
        batches = list(loader)
        assert [b["keys"] for b in batches] == [["warned"], ["cmyk"]], augment_on
        assert (loader.stats.corrupt_images, loader.stats.oversized_images) == (1, 1)
        if augment_on == "gpu":
            gpu = torch.cat([b["images"] for b in batches])
    torch.testing.assert_close(gpu, torch.cat([b["images"] for b in batches]), rtol=0, atol=0.02)  # <= 1 level


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
