"""Test helpers: parity assertions following docs/kernels.md §6 (the rule lives in :mod:`kernels.tolerance`):
``max|out - ref_hp| <= factor * max|out_lp - ref_hp| + atol[dtype]`` with verbose failure reports; a tiny-model
batch and the deterministic-towers training mode (gradient-cache tests and their gloo workers)."""

from __future__ import annotations

import random

import torch
from torch import Tensor

import groupvit
from groupvit.tokenizer import tokenize
from kernels.tolerance import ATOL, describe_mismatch, parity

__all__ = ["ATOL", "assert_close", "assert_parity", "describe_mismatch", "deterministic_towers", "make_batch"]


def assert_parity(
    out: Tensor, out_lp: Tensor, ref_hp: Tensor, *, factor: float = 2.0, atol: float | None = None, name: str = "output"
) -> None:
    """Kernel ``out`` vs high-precision ``ref_hp``, allowed ``factor`` x the same-dtype eager error + atol."""
    assert out.shape == ref_hp.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hp.shape)}"
    res = parity(out, out_lp, ref_hp, factor=factor, atol=atol)
    if not res.ok:
        raise AssertionError(f"{name}: {res.detail}")


def assert_close(out: Tensor, ref: Tensor, *, atol: float, rtol: float = 0.0, name: str = "output") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = atol + rtol * ref.detach().double().abs()
    err = (out.detach().double() - ref.detach().double()).abs()
    if not bool((err <= tol).all()):
        raise AssertionError(f"{name}: " + describe_mismatch(out, ref, float(tol.max()) if tol.numel() else atol))


def make_batch(b: int, seed: int = 0, ctx: int = 16) -> dict[str, torch.Tensor]:
    """A ``groupvit-tiny`` batch: fp64 images ``[b, 3, 32, 32]`` and a caption + 3 prompts per image
    ``[b, 4, ctx]`` of random colour/shape words."""
    rng = random.Random(seed)
    words = ["red", "green", "blue", "circle", "square", "triangle", "dog", "sky"]
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(4 * b)]
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(b, 3, 32, 32, generator=g, dtype=torch.float64),
        "texts": tokenize(texts, ctx).reshape(b, 4, ctx),
    }


def deterministic_towers(model: groupvit.GroupViT) -> groupvit.GroupViT:
    """Training mode with the towers in eval mode: no Gumbel noise or drop-path, so the plain full-batch step is
    the reference, while the projectors' BatchNorm still uses (and updates) batch statistics."""
    model.train()
    model.img_encoder.eval()
    model.text_encoder.eval()
    return model


def official_tiny_model_section(multi_label) -> dict:
    """The ``model:`` section of an official GroupViT YAML config at the tiny preset's size (a test fixture)."""
    return {
        "type": "MultiLabelContrastive",
        "img_encoder": {
            "type": "GroupViT",
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 64,
            "depths": [1, 1, 1],
            "num_heads": [2, 2, 2],
            "num_group_tokens": [8, 4, 0],
            "num_output_groups": [8, 4],
            "drop_path_rate": 0.0,
            "embed_factors": [1, 1, 1],
        },
        "text_encoder": {
            "type": "TextTransformer",
            "context_length": 16,
            "width": 64,
            "layers": 2,
            "heads": 2,
            "vocab_size": 49408,
        },
        "contrast_temperature": 0.07,
        "proj_num_layers": 2,
        "output_dim": 32,
        "multi_label": multi_label,
    }
