"""Eager PyTorch reference of every op the Triton kernels replace. **This file is the spec.**

Each function is plain PyTorch (no triton import), has the same signature as its fused counterpart in
``kernels/<op>.py``, and serves both as the ``eager`` backend of :mod:`groupvit.ops` and as the test oracle.
Math is done in ``promote(input dtype, float32)`` so the spec is never the noisy party; results are returned in
the input dtype.

Dim letters: B batch, G groups (softmax axis of the assignment), N image tokens (keys), C channels,
H heads, L sequence length, D embedding dim, K prompts per image, W world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from kernels.utils import compute_dtype

__all__ = [
    "assign_attention",
    "assignment_maps",
    "gumbel_like",
    "attention",
    "contrastive_loss",
    "contrastive_loss_chunked",
    "all_gather_with_grad",
    "clamped_scale",
]

LOGIT_SCALE_MAX = 100.0


# ----------------------------------------------------------------------------------------------------------------
# Assignment attention (GroupViT's AssignAttention core, projections excluded)
# ----------------------------------------------------------------------------------------------------------------


def gumbel_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Gumbel(0, 1) noise shaped like ``x`` in fp32: ``-log(-log u)``, ``u`` clamped to [tiny, 1 - eps]."""
    fi = torch.finfo(torch.float32)
    kw = {} if generator is None else {"generator": generator}  # generator=None breaks dynamic-shape compile
    u = torch.rand(x.shape, device=x.device, dtype=torch.float32, **kw)
    u = u.clamp_(fi.tiny, 1.0 - fi.eps)
    return -torch.log(-torch.log(u))


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
    """Token-to-group assignment attention with straight-through Gumbel-softmax over the *group* axis.

    Args:
        q: projected group tokens ``[B, G, C]``.
        k: projected image tokens (keys) ``[B, N, C]``.
        v: projected image tokens (values) ``[B, N, C]``.
        tau: softmax temperature.
        hard: straight-through one-hot (``H + Y - sg(Y)``) if True, plain softmax ``Y`` if False.
        gumbel: add Gumbel(0, 1) noise to the logits (training). Noise comes from ``noise`` if given,
            else from torch's RNG.
        noise: explicit noise ``[B, G, N]`` (any float dtype); requires ``gumbel=True``.
        eps: added to the per-group sum over image tokens before normalising (GroupViT's assign_eps = 1.0).
        scale: logit multiplier, default ``C ** -0.5``.

    Returns:
        ``[B, G, C]`` in the dtype of ``q``: ``(A @ V) / (sum_n A + eps)`` where ``A`` is the assignment.
    """
    a = _assignment(q, k, tau=tau, hard=hard, gumbel=gumbel, noise=noise, scale=scale)  # [B, G, N]
    cd = a.dtype
    a = a / (a.sum(dim=-1, keepdim=True) + eps)
    return torch.matmul(a, v.to(cd)).to(q.dtype)


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
    """The two maps a grouping block reports: ``soft = softmax_g(QK^T scale)`` (never noisy, used for
    segmentation) and the assignment ``A`` before normalisation (straight-through one-hot when ``hard``).
    Both ``[B, G, N]`` in the compute dtype."""
    cd = compute_dtype(q.dtype, k.dtype)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    soft = torch.softmax(torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * s, dim=-2)
    a = _assignment(q, k, tau=tau, hard=hard, gumbel=gumbel, noise=noise, scale=scale)
    return soft, a


def _assignment(
    q: Tensor, k: Tensor, *, tau: float, hard: bool, gumbel: bool, noise: Tensor | None, scale: float | None
) -> Tensor:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"assign_attention: expected q [B,G,C] and k [B,N,C], got {tuple(q.shape)}, {tuple(k.shape)}")
    cd = compute_dtype(q.dtype, k.dtype)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * s  # [B, G, N]
    if noise is not None and not gumbel:
        raise ValueError("assign_attention: noise given but gumbel=False")
    if gumbel:
        if noise is None:
            noise = gumbel_like(logits)
        elif noise.shape != logits.shape:
            raise ValueError(f"assign_attention: noise shape {tuple(noise.shape)} != logits {tuple(logits.shape)}")
        logits = logits + noise.to(cd)
    y = torch.softmax(logits / tau, dim=-2)  # over groups
    if not hard:
        return y
    idx = logits.argmax(dim=-2, keepdim=True)  # ties -> lowest index, as torch does
    one_hot = torch.zeros_like(y).scatter_(-2, idx, 1.0)
    return one_hot - y.detach() + y  # value: one-hot (to 1 ulp); gradient: softmax


# ----------------------------------------------------------------------------------------------------------------
# Multi-head attention (ViT blocks, pre-assign cross-attention, causal text blocks)
# ----------------------------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None) -> Tensor:
    """Softmax attention over keys. ``q [B, H, Lq, Dh]``, ``k, v [B, H, Lk, Dh]`` -> ``[B, H, Lq, Dh]``.
    ``causal`` masks keys after the query position (requires ``Lq == Lk``)."""
    cd = compute_dtype(q.dtype, k.dtype, v.dtype)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * s
    if causal:
        lq, lk = scores.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.to(cd)).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Contrastive losses (image-text InfoNCE and the multi-label soft-target variant)
# ----------------------------------------------------------------------------------------------------------------


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (rank-major) whose backward sums the gradients of all ranks and keeps this rank's
    slice. Uses all_reduce rather than reduce_scatter so that every backend (gloo included) works."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ws = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def all_gather_with_grad(x: Tensor, group=None) -> Tensor:
    """Differentiable all-gather ``[n, ...] -> [W*n, ...]``; identity without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)


def clamped_scale(logit_scale: Tensor) -> Tensor:
    """``min(exp(theta), 100)``: the clamp blocks the gradient where it is active."""
    return torch.clamp(logit_scale.exp(), max=LOGIT_SCALE_MAX)


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, *, num_prompts: int = 1, group=None) -> Tensor:
    """GroupViT's contrastive loss for this rank: local rows against all-gathered columns.

    ``num_prompts == 1``: the image-text InfoNCE. ``num_prompts == K > 1``: the multi-label loss, where image i's
    positives are its K prompts (soft target 1/K each) and prompt (i, k)'s positive is image i.

    Args:
        image: L2-normalised image embeddings of this rank ``[B, D]``.
        text: L2-normalised text embeddings ``[B*K, D]`` (prompt k of image i at row ``i*K + k``).
        logit_scale: the raw learnable temperature parameter ``theta`` (0-dim); the logits are
            ``min(exp(theta), 100) * image @ text^T``.
        num_prompts: K.
        group: process group; under an initialised ``torch.distributed`` the columns are gathered (with gradient)
            from every rank, rank-major, and the positives are offset by ``rank * B``.

    Returns:
        0-dim loss ``0.5 * (mean over image rows + mean over text rows)``, fp32 (or fp64 for fp64 inputs).
    """
    _check_contrastive(image, text, logit_scale, num_prompts)
    cd = compute_dtype(image.dtype, text.dtype)
    img, txt = image.to(cd), text.to(cd)
    img_all, txt_all = all_gather_with_grad(img, group), all_gather_with_grad(txt, group)
    b, k = img.shape[0], num_prompts
    rank = dist.get_rank(group) if img_all.shape[0] != b else 0
    s = clamped_scale(logit_scale.to(cd))
    rows = torch.arange(b, device=img.device)
    # image side: [B, W*B*K], target 1/K on columns (rank*B + i)*K + k
    li = s * img @ txt_all.t()
    pos = (rank * b + rows)[:, None] * k + torch.arange(k, device=img.device)[None, :]  # [B, K]
    img_loss = (torch.logsumexp(li, dim=1) - li.gather(1, pos).mean(dim=1)).mean()
    # text side: [B*K, W*B], target image rank*B + i for prompt (i, k)
    lt = s * txt @ img_all.t()
    txt_loss = F.cross_entropy(lt, (rank * b + rows).repeat_interleave(k))
    return 0.5 * (img_loss + txt_loss)


def contrastive_loss_chunked(
    image: Tensor, text: Tensor, logit_scale: Tensor, num_prompts: int, cd: torch.dtype, chunk: int = 2048
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Single-process :func:`contrastive_loss` and its gradients (image, text, logit scale), all in ``cd``, from
    the closed form of docs/kernels.md §3, ``chunk`` rows at a time: the oracle where the reference's B x B*K
    matrices do not fit (~26 GB each at B = 32768, K = 3, fp64). Checked against the reference in the tests."""
    i, t = image.to(cd), text.to(cd)
    b, m, k = i.shape[0], t.shape[0], num_prompts
    th = logit_scale.detach().to(cd).requires_grad_(True)
    s = clamped_scale(th)
    (ds_dth,) = torch.autograd.grad(s, th)
    s = s.detach()
    r = torch.cat([torch.logsumexp(s * i[a : a + chunk] @ t.T, dim=1) for a in range(0, b, chunk)])  # [B]
    c = torch.cat([torch.logsumexp(s * t[a : a + chunk] @ i.T, dim=1) for a in range(0, m, chunk)])  # [M]
    pos = (i.view(b, 1, -1) * t.view(b, k, -1)).sum(-1)  # [B, K]
    loss = 0.5 * ((r - s * pos.mean(1)).mean() + (c.view(b, k) - s * pos).mean())
    alpha, beta = 0.5 / b, 0.5 / m
    d_i, d_t, d_s = torch.empty_like(i), torch.zeros_like(t), torch.zeros((), dtype=cd, device=i.device)
    for a in range(0, b, chunk):
        rows = torch.arange(a, min(a + chunk, b), device=i.device)
        raw = i[rows] @ t.T  # [chunk, M]
        x = s * raw
        gx = alpha * torch.exp(x - r[rows, None]) + beta * torch.exp(x - c[None, :])
        cols = rows[:, None] * k + torch.arange(k, device=i.device)  # positives of these rows
        gx.scatter_add_(1, cols, torch.full(cols.shape, -(alpha / k + beta), dtype=cd, device=i.device))
        d_i[rows] = s * gx @ t
        d_t += s * gx.T @ i[rows]
        d_s += (gx * raw).sum()
    return loss, d_i, d_t, d_s * ds_dth


def _check_contrastive(image: Tensor, text: Tensor, logit_scale: Tensor, num_prompts: int) -> None:
    if image.dim() != 2 or text.dim() != 2:
        raise ValueError(
            f"contrastive_loss: expected image [B,D] and text [B*K,D], got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    if image.shape[0] == 0:
        raise ValueError("contrastive_loss: empty batch")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"contrastive_loss: embedding dims differ: image {image.shape[1]} vs text {text.shape[1]}")
    if num_prompts < 1 or text.shape[0] != image.shape[0] * num_prompts:
        raise ValueError(f"contrastive_loss: text rows {text.shape[0]} != B*K = {image.shape[0]}*{num_prompts}")
    if logit_scale.numel() != 1:
        raise ValueError(f"contrastive_loss: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    if image.device != text.device:
        raise ValueError(f"contrastive_loss: image on {image.device}, text on {text.device}")
