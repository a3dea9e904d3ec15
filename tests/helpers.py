"""Parity assertions following kernels_notes.md §6:
``max|out - ref_hp| <= factor * max|out_lp - ref_hp| + atol[dtype]`` with verbose failure reports."""

from __future__ import annotations

import torch
from torch import Tensor

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def describe_mismatch(out: Tensor, ref: Tensor, tol: float) -> str:
    out64, ref64 = out.detach().double(), ref.detach().double()
    err = (out64 - ref64).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    nan_disagree = int((out64.isnan() != ref64.isnan()).sum())
    inf_disagree = int((out64.isinf() != ref64.isinf()).sum())
    finite_err = torch.nan_to_num(err, nan=float("inf"))
    worst = int(finite_err.argmax()) if err.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.numel() else ()
    return (f"{int(bad.sum())}/{err.numel()} elements off by more than {tol:.3g}; worst at {idx}: "
            f"out={out64.flatten()[worst].item():.8g} ref={ref64.flatten()[worst].item():.8g}; "
            f"NaN disagreements {nan_disagree}, Inf disagreements {inf_disagree}")


def assert_parity(out: Tensor, out_lp: Tensor, ref_hp: Tensor, *, factor: float = 2.0, atol: float | None = None,
                  name: str = "output") -> None:
    """Kernel ``out`` vs high-precision ``ref_hp``, allowed ``factor`` x the same-dtype eager error + atol."""
    assert out.shape == ref_hp.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_hp.shape)}"
    a = ATOL[out.dtype] if atol is None else atol
    base = (out_lp.detach().double() - ref_hp.detach().double()).abs().max().item() if out_lp.numel() else 0.0
    tol = factor * base + a
    err = (out.detach().double() - ref_hp.detach().double()).abs()
    if not bool((err <= tol).all()):
        raise AssertionError(f"{name}: " + describe_mismatch(out, ref_hp, tol))


def assert_close(out: Tensor, ref: Tensor, *, atol: float, rtol: float = 0.0, name: str = "output") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = atol + rtol * ref.detach().double().abs()
    err = (out.detach().double() - ref.detach().double()).abs()
    if not bool((err <= tol).all()):
        raise AssertionError(f"{name}: " + describe_mismatch(out, ref, float(tol.max()) if tol.numel() else atol))
