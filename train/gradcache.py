"""Contrastive batches larger than memory: cached tower outputs and replayed micro-batches (GradCache, Gao et al.
2021), exact for GroupViT.

A contrastive loss does not decompose over micro-batches (every row's negatives are the whole batch), so gradient
accumulation would change the objective. Instead one step on a batch of B pairs, in micro-batches of m:

1. **cache**: the towers (:meth:`groupvit.GroupViT.forward_towers`) run on each micro-batch without a graph; their
   pooled outputs (image ``[B, C]``, texts ``[B(1+K), W]``, O(B·C)) are kept, with the RNG state before each
   micro-batch;
2. **loss**: the projectors (whose BatchNorm is the only cross-sample layer: statistics over the whole batch, running
   statistics updated once) and both losses run on the whole cached batch with a graph; one backward gives the
   projector/temperature gradients and the gradients of the loss with respect to every pooled output;
3. **replay**: each micro-batch's towers run again with a graph, from the saved RNG state -- so the Gumbel noise of
   the hard assignment (eager: ``torch.rand``; triton: the Philox seed drawn from the CPU generator by
   :func:`kernels.assign_attention.draw_seed`) and drop-path draw exactly what the cache pass drew -- and
   back-propagate their slice of those gradients. Parameter gradients accumulate over the micro-batches.

The result is the full-batch step's loss and gradient (up to float summation order) with tower activations for
m samples at a time; the price is one extra tower forward (about +1/3 of a step). Under torch.distributed the
contrastive batch is the global one as in the plain step (the loss gathers every rank's columns); the bare model is
run (DistributedDataParallel's hooks stay idle) and the gradients are averaged over ranks afterwards, as DDP would.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from train.checkpoint import unwrap

RngState = tuple[Tensor, Tensor | None]  # (CPU generator, the device's CUDA generator or None)


def _rng_get(device: torch.device) -> RngState:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _rng_set(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def micro_slices(batch: int, micro_batch: int) -> Iterator[slice]:
    """``[0, m), [m, 2m), ...`` covering ``batch`` rows (the last one shorter when m does not divide it)."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    return (slice(s, min(s + micro_batch, batch)) for s in range(0, batch, micro_batch))


def gradcache_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    images: Tensor,
    texts: Tensor,
    micro_batch: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    host_texts: Tensor | None = None,
) -> dict[str, Tensor]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(model(images, texts))["loss"]`` over the whole batch
    (scaled by ``scaler`` when given), running the towers ``micro_batch`` samples at a time.

    Args:
        model: a :class:`groupvit.GroupViT`, possibly wrapped in DistributedDataParallel.
        images: ``[B, 3, H, W]``; texts: ``[B, L]`` or ``[B, 1+K, L]``.
        host_texts: ``texts`` on the CPU (the loader's batch), for the text trimming plans without a device read;
            None: planned from ``texts``.

    Returns:
        ``loss_fn``'s dict, detached. The RNG ends where a single pass over the batch would leave it.
    """
    bare = unwrap(model)
    device = images.device
    texts = texts[:, None] if texts.dim() == 2 else texts  # [B, 1+K, L]
    t = texts.shape[1]
    parts = list(micro_slices(images.shape[0], micro_batch))
    host = texts if host_texts is None else host_texts.reshape(texts.shape)
    plans = [bare.plan_text(host[sl]).to(device) for sl in parts]  # one per micro-batch, for both passes

    states: list[RngState] = []
    img_parts, txt_parts = [], []
    with torch.no_grad(), _autocast(device, autocast_dtype):  # 1. cache
        for sl, plan in zip(parts, plans):
            states.append(_rng_get(device))
            fi, ft = bare.forward_towers(images[sl], texts[sl], text_plan=plan)  # [m, C], [m(1+K), W]
            img_parts.append(fi)
            txt_parts.append(ft)
    after = _rng_get(device)

    img_feat = torch.cat(img_parts).requires_grad_(True)  # [B, C]
    txt_feat = torch.cat(txt_parts).requires_grad_(True)  # [B(1+K), W]
    del img_parts, txt_parts
    with _autocast(device, autocast_dtype):  # 2. projectors + losses over the whole batch
        losses = loss_fn(bare.project(img_feat, txt_feat, num_texts=t))
    loss = losses["loss"]
    (scaler.scale(loss) if scaler is not None else loss).backward()
    g_img, g_txt = img_feat.grad, txt_feat.grad

    for sl, plan, state in zip(parts, plans, states):  # 3. replay with the cache pass's random draws
        _rng_set(state, device)
        with _autocast(device, autocast_dtype):
            fi, ft = bare.forward_towers(images[sl], texts[sl], text_plan=plan)
        torch.autograd.backward((fi, ft), (g_img[sl], g_txt[sl.start * t : sl.stop * t]))
    _rng_set(after, device)

    if model is not bare and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        average_gradients(bare)
    return {k: v.detach() for k, v in losses.items()}


def average_gradients(model: nn.Module) -> None:
    """Average every existing ``.grad`` over the ranks (one flat all-reduce), as DistributedDataParallel does."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
