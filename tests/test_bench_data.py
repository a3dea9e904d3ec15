"""pytest-benchmark cases of the data pipeline's stages (bench/bench_data.py has the full per-core report).

CI runs them once as plain tests (``--benchmark-disable`` in pytest.ini); for timings::

    pytest tests/test_bench_data.py --benchmark-enable --benchmark-autosave
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import bench_data
from groupvit.imageio import decode_image
from train.gpu_augment import DeviceAugment
from train.transforms import TrainTransform, decode_region


def _jpeg(side: int) -> bytes:
    rng = np.random.default_rng(side)
    yy, xx = np.mgrid[0:side, 0:side] / side
    arr = np.stack([255 * xx, 255 * yy, 128 + 100 * np.sin(9 * xx * yy)], -1) + rng.normal(0, 10, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("side", [500, 1024])
def test_bench_cpu_path_sample(benchmark, side):
    data, t = _jpeg(side), TrainTransform(224)
    seeds = iter(range(10**9))
    x = benchmark(lambda: t(decode_image(data), random.Random(next(seeds))))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


@pytest.mark.parametrize("side", [500, 1024])
def test_bench_gpu_path_cpu_half(benchmark, side):
    data, aug = _jpeg(side), DeviceAugment(224)
    seeds = iter(range(10**9))

    def one():
        rng = random.Random(next(seeds))
        return decode_region(data, 224, rng), aug.sample_params(rng)

    (region, box), p = benchmark(one)
    assert region.ndim == 3 and region.dtype == np.uint8 and len(box) == 4 and p.shape == (aug.num_params,)


def test_bench_device_augment_batch(benchmark):
    aug = DeviceAugment(96)
    flat, rows = aug.pack_regions([decode_region(_jpeg(300), 96, random.Random(i)) for i in range(8)])
    params = torch.from_numpy(np.stack([aug.sample_params(random.Random(i)) for i in range(8)]))
    out = benchmark(lambda: aug.apply(aug.crop_resize(flat, rows), params))
    assert out.shape == (8, 3, 96, 96) and bool(torch.isfinite(out).all())


def test_bench_data_cli_smoke(tmp_path, capsys):
    """The benchmark's own command end to end on a few generated images (tiny sizes: plumbing only)."""
    src = tmp_path / "src"
    src.mkdir()
    for i, side in enumerate((120, 90)):
        (src / f"im{i}.jpg").write_bytes(_jpeg(side))
    out = tmp_path / "r.json"
    assert (
        bench_data.main(
            [
                "--samples",
                "16",
                "--batch-size",
                "8",
                "--images",
                str(src),
                "--workers",
                "1",
                "--repeats",
                "1",
                "--rounds",
                "1",
                "--json",
                str(out),
                "--size",
                "32",
                "--large-side",
                "256",
                "--device",
                "cpu",
                "--device-batch",
                "4",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "cores per GPU needed at 8000 pairs/s" in text and "medians of 1 alternating rounds" in text
    for case in ("voc", "256-px", "256-px-mosaic"):
        assert f"[{case} JPEGs, " in text and " bits/pixel] stages: decode " in text, case
    assert text.count("1 worker, its CPU time (with the hand-over to the main process): cpu path ") == 3
    assert "device half on cpu, ms per batch of 4 VOC crops: copy" in text and "kB/sample shipped" in text
    assert Path(out).is_file()
