"""CPU-meaningful benchmarks (pytest-benchmark): eager reference ops at real GroupViT shapes with small batches,
the tokenizer and the data pipeline.

CI runs these once as plain tests (``--benchmark-disable`` in pytest.ini); to see timings and compare runs::

    pytest tests/test_bench_cpu.py --benchmark-enable --benchmark-autosave      # then --benchmark-compare
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from kernels.registry import OPS

CPU = torch.device("cpu")


def _inputs(op: str, case: str, batch: int | None = None, dtype: torch.dtype = torch.float32):
    """Registry inputs of ``case`` (batch reduced to ``batch`` when given), grad leaves requiring grad."""
    spec = OPS[op]
    c = spec.case(case)
    if batch is not None:
        c = dataclasses.replace(c, dims={**c.dims, "B": batch})
    args, kw = spec.make_inputs(c, dtype, CPU, 0)
    args = [a.detach().clone().requires_grad_(i in spec.grad_inputs) for i, a in enumerate(args)]
    return spec, args, kw


def _fwd_bwd(spec, args, kw):
    for a in args:
        a.grad = None
    y = spec.reference(*args, **kw)
    y.backward(torch.ones_like(y) if y.dim() == 0 else torch.randn_like(y))
    return y


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_bench_assign_attention_stage1(benchmark, mode):
    spec, args, kw = _inputs("assign_attention", "stage1-b2")  # B=2, G=64, N=196, C=384
    if mode == "fwd":
        with torch.no_grad():
            out = benchmark(spec.reference, *args, **kw)
    else:
        out = benchmark(_fwd_bwd, spec, args, kw)
        assert all(bool(torch.isfinite(a.grad).all()) for a in args)
    assert out.shape == (2, 64, 384) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("case", ["gpu256", "b256-k3"])
def test_bench_contrastive_loss(benchmark, case):
    spec, args, kw = _inputs("contrastive_loss", case)
    loss = benchmark(_fwd_bwd, spec, args, kw)
    k = kw.get("num_prompts", 1)
    # random-ish embeddings with correlated positives: loss positive and below the uniform log(B*K) + log(B) bound
    assert 0 < loss.item() < torch.log(torch.tensor(256.0 * k)).item() + torch.log(torch.tensor(256.0)).item()
    assert all(bool(torch.isfinite(a.grad).all()) for a in args)


@pytest.mark.parametrize("case", ["stage1-self", "text-causal"])
def test_bench_attention_math(benchmark, case):
    spec, args, kw = _inputs("attention", case, batch=1)
    out = benchmark(_fwd_bwd, spec, args, kw)
    assert out.shape == args[0].shape and bool(torch.isfinite(out).all())


def test_bench_tokenizer(benchmark):
    import groupvit.tokenizer as tok_mod

    tok = tok_mod.ClipTokenizer()
    rng = random.Random(0)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "cat",
        "dog",
        "sitting",
        "on",
        "red",
        "chair",
        "in",
        "kitchen",
        "two",
        "people",
        "riding",
        "bicycles",
        "down",
        "street",
        "near",
        "large",
        "building",
        "&amp;",
        "café",
    ]
    captions = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) for _ in range(256)]
    ids = benchmark(tok, captions)
    assert ids.shape == (256, 77) and bool((ids[:, 0] == 49406).all())
    # reference ids from the CLIP release for this caption (issue text)
    assert tok(["a photo of a cat."])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


def test_bench_train_transform(benchmark):
    transforms = pytest.importorskip("train.transforms")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (375, 500, 3), generator=g, dtype=torch.uint8).numpy())
    t = transforms.TrainTransform(224)
    x = benchmark(t, img, random.Random(0))
    assert x.shape == (3, 224, 224) and bool(torch.isfinite(x).all())


def test_bench_data_pipeline(benchmark, tmp_path):
    data = pytest.importorskip("train.data")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    samples = [
        (
            f"s{i:03d}",
            Image.fromarray(torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8).numpy()),
            f"a photo of thing number {i}",
        )
        for i in range(32)
    ]
    shards = data.write_shards(samples, tmp_path, "bench", maxcount=16)

    def one_pass():
        loader = data.build_train_loader(
            shards, batch_size=8, num_workers=0, img_size=32, augment=False, shuffle_buffer=0, multi_label=0
        )
        return [b for b in loader]

    batches = benchmark(one_pass)
    assert len(batches) == 4
    assert batches[0]["images"].shape == (8, 3, 32, 32) and batches[0]["texts"].shape == (8, 1, 77)
