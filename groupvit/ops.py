"""The one switch: every fusable op the model runs goes through this module.

Backends, chosen at call time (never stored in weights):

* ``eager``  -- the reference implementations in :mod:`kernels.reference` (the spec);
* ``triton`` -- the fused kernels in ``kernels/<op>.py``. There is **no silent fallback**: an input the kernel
  cannot run (CPU tensor without ``TRITON_INTERPRET=1``, unsupported size or dtype) raises an error naming the op
  and the shapes.

Select with ``GROUPVIT_BACKEND=eager|triton`` (read at import), :func:`set_backend`, or the context manager
:func:`use_backend`, which flips an existing model instance::

    with ops.use_backend("triton"):
        loss = model(images, texts)

Attention inside the ViT and text blocks is dispatched here too. It has no Triton kernel of ours; its
implementation is chosen by ``GROUPVIT_ATTENTION`` / :func:`set_attention`: ``auto`` (default: xformers
``memory_efficient_attention`` on CUDA where installed, else torch SDPA), ``sdpa``, ``xformers`` (raises if
unusable) or ``math`` (the reference).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import reference
from kernels.registry import OPS

Backend = Literal["eager", "triton"]
BACKENDS: tuple[str, ...] = ("eager", "triton")
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "sdpa", "xformers", "math")


def _validated(name: str, allowed: tuple[str, ...], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; choose one of {allowed}")
    return name


_backend: str = _validated(os.environ.get("GROUPVIT_BACKEND", "eager"), BACKENDS, "GROUPVIT_BACKEND")
_attention: str = _validated(os.environ.get("GROUPVIT_ATTENTION", "auto"), ATTENTION_IMPLS, "GROUPVIT_ATTENTION")
_kernel_noise: bool = False
_check_finite: bool = True


def set_backend(name: str) -> None:
    """Select ``eager`` or ``triton`` for every fused op from now on. ``triton`` loads the kernels here (an error
    now if they cannot load), so that a later ``torch.compile`` traces no import."""
    global _backend
    _backend = _validated(name, BACKENDS, "backend")
    if _backend == "triton":
        for op, spec in OPS.items():
            if spec.triton is not None:
                _triton_impl(op)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def _scoped(setter: Callable[[Any], None], prev: Any, value: Any) -> Iterator[None]:
    """``setter(value)`` for the ``with`` block, ``setter(prev)`` after it (also on error)."""
    setter(value)
    try:
        yield
    finally:
        setter(prev)


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Temporarily select a backend (restored on exit, also on error)."""
    return _scoped(set_backend, _backend, name)


def set_attention(name: str) -> None:
    global _attention
    _attention = _validated(name, ATTENTION_IMPLS, "attention implementation")


def use_attention(name: str) -> contextlib.AbstractContextManager[None]:
    return _scoped(set_attention, _attention, name)


def set_check_finite(enabled: bool) -> None:
    """Turn the fused contrastive loss's own non-finite input check on (default) or off.

    On, a NaN/Inf in the loss inputs raises a ``ValueError`` naming the input, at the price of one host sync per
    loss call on a GPU. Training turns it off (``TrainConfig.check_finite``): its step checks the loss and the
    gradient norm itself, with the step's one sync. The eager backend has no such check (non-finite in, out)."""
    global _check_finite
    _check_finite = bool(enabled)


def get_check_finite() -> bool:
    return _check_finite


def use_check_finite(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Temporarily set :func:`set_check_finite` (restored on exit, also on error)."""
    return _scoped(set_check_finite, _check_finite, enabled)


@contextlib.contextmanager
def use_kernel_noise(enabled: bool = True) -> Iterator[None]:
    """Make the eager backend draw its Gumbel noise from the fused kernel's Philox stream.

    Inside this context, an eager ``assign_attention`` call draws its seed exactly as the kernel would and
    materialises the kernel's noise (``kernels.assign_attention.gumbel_noise``), so eager and triton see identical
    noise under the same ``torch.manual_seed``: training-mode model parity becomes testable. Needs a device where
    Triton can launch (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """
    global _kernel_noise
    prev, _kernel_noise = _kernel_noise, enabled
    try:
        yield
    finally:
        _kernel_noise = prev


_TRITON: dict[str, tuple[Callable[..., Tensor], Any]] = {}  # op -> (function, its module), loaded once


def _triton_impl(op: str) -> Callable[..., Tensor]:
    if op not in _TRITON:
        try:
            fn = OPS[op].triton_fn()
        except ImportError as e:  # triton missing or broken: say so instead of falling back
            raise RuntimeError(
                f"backend 'triton' selected but op {op!r} could not be loaded: {e}. "
                f"Install triton (see README) or select the eager backend (ops.set_backend('eager'); "
                f"backend=eager in training; --backend eager in the CLIs)."
            ) from e
        _TRITON[op] = (fn, importlib.import_module(OPS[op].triton.split(":")[0]))
    return _TRITON[op][0]


def _triton_module(op: str) -> Any:
    _triton_impl(op)
    return _TRITON[op][1]


def _impl(op: str) -> Callable[..., Tensor]:
    return OPS[op].reference if _backend == "eager" else _triton_impl(op)


# ---- ops ----------------------------------------------------------------------------------------------------------


def assign_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    gumbel: bool = False,
    noise: Tensor | None = None,
    eps: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """Grouping assignment ``q [B,G,C], k, v [B,N,C] -> [B,G,C]``; spec: :func:`kernels.reference.assign_attention`."""
    if _backend == "eager" and _kernel_noise and gumbel and noise is None:
        from kernels.assign_attention import draw_seed, gumbel_noise

        noise = gumbel_noise(draw_seed(q.device), 0, (q.shape[0], q.shape[1], k.shape[1]), q.device)
    return _impl("assign_attention")(q, k, v, tau=tau, hard=hard, gumbel=gumbel, noise=noise, eps=eps, scale=scale)


def assignment_maps(
    q: Tensor,
    k: Tensor,
    *,
    tau: float = 1.0,
    hard: bool = True,
    gumbel: bool = False,
    noise: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft and hard ``[B,G,N]`` maps of a grouping block (diagnostics and segmentation; always eager)."""
    return reference.assignment_maps(q, k, tau=tau, hard=hard, gumbel=gumbel, noise=noise, scale=scale)


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, *, num_prompts: int = 1, group=None) -> Tensor:
    """Image-text (K=1) or multi-label (K>1) loss of this rank; spec: :func:`kernels.reference.contrastive_loss`.
    With the triton backend, :func:`set_check_finite` decides whether non-finite inputs raise."""
    if _backend == "triton":
        mod = _triton_module("contrastive_loss")
        if mod._check_finite != _check_finite:
            mod.set_check_finite(_check_finite)
    return _impl("contrastive_loss")(image, text, logit_scale, num_prompts=num_prompts, group=group)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None) -> Tensor:
    """Multi-head attention ``q [B,H,Lq,Dh], k, v [B,H,Lk,Dh] -> [B,H,Lq,Dh]`` (SDPA / xformers / math); ``scale``
    multiplies the logits (default ``Dh ** -0.5``)."""
    impl = _attention
    if impl == "auto":
        impl = "xformers" if (q.is_cuda and _xformers_ok()) else "sdpa"
    if impl == "math":
        return reference.attention(q, k, v, causal=causal, scale=scale)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if not (q.is_cuda and _xformers_ok()):
        raise RuntimeError(
            f"attention implementation 'xformers' requested for {q.device} tensors of shape "
            f"{tuple(q.shape)}, but xformers memory_efficient_attention is not usable here "
            f"(it needs xformers with CUDA). Use ops.set_attention('sdpa')."
        )
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    # xformers takes [B, L, H, Dh]
    out = memory_efficient_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_bias=LowerTriangularMask() if causal else None,
        scale=scale,
    )
    return out.transpose(1, 2)


@functools.cache
def _xformers_ok() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()
