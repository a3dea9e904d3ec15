"""One registry of fused ops and their shapes, shared by :mod:`groupvit.ops`, ``tests/`` and ``bench/``.

Each :class:`OpSpec` names the eager reference (the spec), the Triton implementation (a dotted path, imported
lazily so that this module needs torch only; ``None`` for an op without a kernel of ours), an input factory,
named shape cases taken from the real GroupViT
dimensions, and the FLOP / byte model used to report % of the physical floor (docs/kernels.md §4).

Case tags: ``smoke`` (tiny odd shapes, run under the Triton interpreter in CI), ``model`` (real GroupViT shapes;
a handful run in CI with B <= 2), ``sweep`` (benchmarks only), ``headline`` (the decisive shapes that
``python -m bench.verdict`` checks and times first on a GPU).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from kernels import reference

Inputs = tuple[tuple[Tensor, ...], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    name: str
    dims: dict[str, int]
    tags: frozenset[str] = frozenset({"sweep"})
    kwargs: dict[str, Any] = field(default_factory=dict)  # op options for this case (mode flags, K, ...)


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable[..., Tensor]
    triton: str | None  # "kernels.<module>:function", resolved on first use; None: no Triton kernel of ours
    make_inputs: Callable[[Case, torch.dtype, torch.device, int], Inputs]
    cases: tuple[Case, ...]
    flops: Callable[[dict[str, int], str], float]  # (dims, mode) -> FLOP
    bytes: Callable[[dict[str, int], str, int], float]  # (dims, mode, element size) -> bytes moved (HBM floor)
    grad_inputs: tuple[int, ...] = ()  # positional inputs that receive gradients

    def triton_fn(self) -> Callable[..., Tensor]:
        if self.triton is None:
            raise LookupError(f"{self.name} has no Triton kernel of ours")
        mod, fn = self.triton.split(":")
        return getattr(importlib.import_module(mod), fn)

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"{self.name}: no case {name!r}; have {[c.name for c in self.cases]}")

    def select(self, *tags: str) -> list[Case]:
        return [c for c in self.cases if set(tags) & c.tags]


def _gen(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# ---- assign_attention -------------------------------------------------------------------------------------------


def _assign_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    d = case.dims
    g = _gen(device, seed)
    # q, k roughly unit-variance per channel so logits * C^-0.5 are O(1): realistic, with mostly clear argmax margins.
    q = torch.randn(d["B"], d["G"], d["C"], generator=g, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn(d["B"], d["N"], d["C"], generator=g, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(d["B"], d["N"], d["C"], generator=g, device=device, dtype=torch.float32).to(dtype)
    return (q, k, v), dict(case.kwargs)


def _assign_flops(d: dict[str, int], mode: str) -> float:
    mm = 2.0 * d["B"] * d["G"] * d["N"] * d["C"]
    return {"fwd": 2 * mm, "bwd": 5 * mm, "fwd_bwd": 7 * mm}[mode]


def _assign_bytes(d: dict[str, int], mode: str, es: int) -> float:
    q = d["B"] * d["G"] * d["C"] * es
    kv = 2 * d["B"] * d["N"] * d["C"] * es
    fwd = q + kv + q  # read q, k, v; write out
    bwd = (q + kv + q) + (q + kv)  # read q, k, v, dout; write dq, dk, dv
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode]


_SMOKE = frozenset({"smoke"})
_MODEL = frozenset({"model", "sweep"})
_HEADLINE = _MODEL | {"headline"}

ASSIGN_ATTENTION = OpSpec(
    name="assign_attention",
    reference=reference.assign_attention,
    triton="kernels.assign_attention:assign_attention",
    make_inputs=_assign_inputs,
    grad_inputs=(0, 1, 2),
    cases=(
        Case("odd-7x13x24", dict(B=3, G=7, N=13, C=24), _SMOKE),
        Case("g8-n37-c40", dict(B=1, G=8, N=37, C=40), _SMOKE),
        Case("g16-n37-c24-soft", dict(B=2, G=16, N=37, C=24), _SMOKE, dict(hard=False)),
        Case("stage1-b2", dict(B=2, G=64, N=196, C=384), frozenset({"model"})),
        Case("stage1", dict(B=256, G=64, N=196, C=384), _HEADLINE),
        Case("stage2", dict(B=256, G=8, N=64, C=384), _HEADLINE),
        Case("crop448", dict(B=64, G=64, N=784, C=384), _MODEL),
    )
    + tuple(Case(f"stage1-b{b}", dict(B=b, G=64, N=196, C=384)) for b in (64, 128, 512)),
    flops=_assign_flops,
    bytes=_assign_bytes,
)


# ---- contrastive_loss -------------------------------------------------------------------------------------------


def _contrastive_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    d = case.dims
    g = _gen(device, seed)
    k = case.kwargs.get("num_prompts", 1)
    img = torch.nn.functional.normalize(torch.randn(d["B"], d["D"], generator=g, device=device), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(d["B"] * k, d["D"], generator=g, device=device), dim=-1)
    # correlate positives so the loss is not at its random-init plateau
    txt = torch.nn.functional.normalize(txt + img.repeat_interleave(k, 0), dim=-1)
    theta = torch.tensor(case.kwargs.get("theta", 2.6592), device=device)
    kwargs = {k_: v for k_, v in case.kwargs.items() if k_ != "theta"}
    return (img.to(dtype), txt.to(dtype), theta), kwargs


def _contrastive_flops(d: dict[str, int], mode: str) -> float:
    mm = 2.0 * d["B"] * d["B"] * d.get("K", 1) * d["D"]
    return {"fwd": mm, "bwd": 3 * mm, "fwd_bwd": 4 * mm}[mode]


def _contrastive_bytes(d: dict[str, int], mode: str, es: int) -> float:
    io = d["B"] * (1 + d.get("K", 1)) * d["D"] * es
    return {"fwd": io, "bwd": 2 * io, "fwd_bwd": 3 * io}[mode]


def _cl(name: str, b: int, dd: int, k: int, tags: frozenset[str], **kw: Any) -> Case:
    return Case(name, dict(B=b, D=dd, K=k), tags, dict(num_prompts=k, **kw))


CONTRASTIVE_LOSS = OpSpec(
    name="contrastive_loss",
    reference=reference.contrastive_loss,
    triton="kernels.contrastive_loss:contrastive_loss",
    make_inputs=_contrastive_inputs,
    grad_inputs=(0, 1, 2),
    cases=(
        _cl("b5-d16", 5, 16, 1, _SMOKE),
        _cl("b67-d40-k3", 67, 40, 3, _SMOKE),
        _cl("b100-d16", 100, 16, 1, _SMOKE),
        _cl("b1-d16-k3", 1, 16, 3, _SMOKE),
        _cl("b67-d16-clamp", 67, 16, 1, _SMOKE, theta=4.7),  # exp(4.7) > 100: clamp active
        _cl("gpu256", 256, 256, 1, frozenset({"model"})),
    )
    + tuple(
        _cl(f"b{b}-k{k}", b, 256, k, _HEADLINE if b == 32768 else _MODEL)
        for b in (256, 4096, 8192, 16384, 32768, 65536)
        for k in (1, 3)
    ),
    flops=_contrastive_flops,
    bytes=_contrastive_bytes,
)


# ---- attention (SDPA / xformers fast paths; no Triton kernel of ours) ------------------------------------------


def _attention_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    d = case.dims
    g = _gen(device, seed)
    shape_q = (d["B"], d["H"], d["Lq"], d["Dh"])
    shape_k = (d["B"], d["H"], d["Lk"], d["Dh"])
    q = torch.randn(shape_q, generator=g, device=device).to(dtype)
    k = torch.randn(shape_k, generator=g, device=device).to(dtype)
    v = torch.randn(shape_k, generator=g, device=device).to(dtype)
    return (q, k, v), dict(case.kwargs)


def _attention_flops(d: dict[str, int], mode: str) -> float:
    f = 4.0 * d["B"] * d["H"] * d["Lq"] * d["Lk"] * d["Dh"]
    return {"fwd": f, "bwd": 2.5 * f, "fwd_bwd": 3.5 * f}[mode]


def _attention_bytes(d: dict[str, int], mode: str, es: int) -> float:
    io = d["B"] * d["H"] * (2 * d["Lq"] + 2 * d["Lk"]) * d["Dh"] * es
    return {"fwd": io, "bwd": 2 * io, "fwd_bwd": 3 * io}[mode]


ATTENTION = OpSpec(
    name="attention",
    reference=reference.attention,
    triton=None,  # the model runs SDPA / xformers (selected by the model's attention switch)
    make_inputs=_attention_inputs,
    grad_inputs=(0, 1, 2),
    cases=(
        Case("odd", dict(B=2, H=2, Lq=13, Lk=13, Dh=16), _SMOKE),
        Case("cross-odd", dict(B=2, H=3, Lq=7, Lk=29, Dh=8), _SMOKE),
        Case("causal-odd", dict(B=2, H=2, Lq=11, Lk=11, Dh=16), _SMOKE, dict(causal=True)),
        Case("stage1-self", dict(B=256, H=6, Lq=260, Lk=260, Dh=64), _MODEL),
        Case("gb1-cross", dict(B=256, H=6, Lq=64, Lk=196, Dh=64), _MODEL),
        Case("crop448-self", dict(B=16, H=6, Lq=848, Lk=848, Dh=64), _MODEL),
        Case("text-causal", dict(B=1024, H=4, Lq=77, Lk=77, Dh=64), _MODEL, dict(causal=True)),
    ),
    flops=_attention_flops,
    bytes=_attention_bytes,
)

OPS: dict[str, OpSpec] = {op.name: op for op in (ASSIGN_ATTENTION, CONTRASTIVE_LOSS, ATTENTION)}
