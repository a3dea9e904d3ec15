"""Parity assertions following kernels_notes.md §6 (the rule lives in :mod:`kernels.tolerance`):
``max|out - ref_hp| <= factor * max|out_lp - ref_hp| + atol[dtype]`` with verbose failure reports."""

from __future__ import annotations

from torch import Tensor

from kernels.tolerance import ATOL, describe_mismatch, parity

__all__ = ["ATOL", "assert_close", "assert_parity", "describe_mismatch"]


def assert_parity(out: Tensor, out_lp: Tensor, ref_hp: Tensor, *, factor: float = 2.0, atol: float | None = None,
                  name: str = "output") -> None:
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
