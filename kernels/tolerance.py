"""The project's parity rule (docs/kernels.md §6), one home for tests/helpers.py and bench/verdict.py.

``max|out - ref_hp| <= factor * max|out_lp - ref_hp| + atol[dtype]``: the kernel output ``out`` may miss the
high-precision reference ``ref_hp`` by ``factor`` (2) times the same-dtype eager error plus a dtype floor.
The hard argmax of assignment attention is discontinuous: compare only where the top-2 logit margin exceeds
:data:`ARGMAX_MARGIN` (:func:`top2_margin`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ARGMAX_MARGIN = 1e-4  # fp64 top-2 gap below which an argmax may legitimately flip


@dataclass(frozen=True)
class Parity:
    """Outcome of one comparison: ``ok`` and, for the report, the allowed and the worst error."""

    ok: bool
    tol: float
    worst: float
    detail: str  # empty when ok


def describe_mismatch(out: Tensor, ref: Tensor, tol: float) -> str:
    """Mismatch count, worst index and values, NaN / Inf disagreements (``out`` vs ``ref``, allowed ``tol``)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    err = (out64 - ref64).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    nan_disagree = int((out64.isnan() != ref64.isnan()).sum())
    inf_disagree = int((out64.isinf() != ref64.isinf()).sum())
    finite_err = torch.nan_to_num(err, nan=float("inf"))
    worst = int(finite_err.argmax()) if err.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape)) if err.numel() else ()
    return (
        f"{int(bad.sum())}/{err.numel()} elements off by more than {tol:.3g}; worst at {idx}: "
        f"out={out64.flatten()[worst].item():.8g} ref={ref64.flatten()[worst].item():.8g}; "
        f"NaN disagreements {nan_disagree}, Inf disagreements {inf_disagree}"
    )


def parity(out: Tensor, out_lp: Tensor, ref_hp: Tensor, *, factor: float = 2.0, atol: float | None = None) -> Parity:
    """``out`` vs ``ref_hp`` under the rule, the baseline being the same-dtype eager ``out_lp``."""
    if out.shape != ref_hp.shape:
        return Parity(False, math.nan, math.nan, f"shape {tuple(out.shape)} != {tuple(ref_hp.shape)}")
    a = ATOL[out.dtype] if atol is None else atol
    ref64 = ref_hp.detach().double()
    base = (out_lp.detach().double() - ref64).abs().max().item() if out_lp.numel() else 0.0
    tol = factor * base + a
    err = (out.detach().double() - ref64).abs()
    worst = torch.nan_to_num(err, nan=math.inf).max().item() if err.numel() else 0.0
    if bool((err <= tol).all()):
        return Parity(True, tol, worst, "")
    return Parity(False, tol, worst, describe_mismatch(out, ref_hp, tol))


def top2_margin(q: Tensor, k: Tensor, noise: Tensor | None = None, scale: float | None = None) -> Tensor:
    """fp64 gap between the two largest assignment logits ``scale q k^T + noise`` per token ``[B, N]`` (inf when
    G == 1): where it is below :data:`ARGMAX_MARGIN` the hard assignment may flip under rounding."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    x = torch.matmul(q.double(), k.double().transpose(-1, -2)) * s
    if noise is not None:
        x = x + noise.double()
    if x.shape[1] < 2:
        return torch.full((x.shape[0], x.shape[2]), math.inf, dtype=torch.float64, device=x.device)
    top = x.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]
