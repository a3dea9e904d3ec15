"""Distributed training plumbing: the process group (torchrun's environment, NCCL on GPUs, gloo on CPU), BatchNorm
synchronised across ranks (``nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` on CPU, where torch's refuses to
run) and the small collectives the loop needs for its logs and checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "CPUSyncBatchNorm",
    "DistContext",
    "convert_sync_batchnorm",
    "gather_objects",
    "mean_over_ranks",
    "setup_distributed",
    "sum_over_ranks",
]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a summed quantity is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g


class CPUSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm whose training statistics span all ranks, for CPU tensors (gloo), where ``nn.SyncBatchNorm``
    raises. Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d``. Input ``[B, C]`` or ``[B, C, L]``.
    Two-pass statistics (mean, then centred squares), so large means do not cost precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        n_local = float(x.numel() // c)
        tot = _AllReduceSum.apply(torch.cat([xf.sum(dims), xf.new_tensor([n_local])]))  # [C + 1]
        n = tot[-1].detach()
        mean = tot[:c] / n  # [C]
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n  # biased, for normalisation [C]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm synchronise its batch statistics across ranks (SyncBatchNorm on GPUs)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CPUSyncBatchNorm):
            new = CPUSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # we initialised the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (or an already initialised one)."""
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device(device if device.startswith("cuda:") else f"cuda:{local}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu" if device == "auto" else device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank, world, local, dev, owns)


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (collective), in rank order; ``[obj]`` in a single process."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """The element-wise mean of ``values`` over the ranks (collective)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def sum_over_ranks(counts: dict[str, int], ctx: DistContext) -> dict[str, int]:
    """Integer counters summed over the ranks (collective; every rank passes the same keys)."""
    if not ctx.distributed or not counts:
        return counts
    keys = sorted(counts)
    vals = mean_over_ranks([float(counts[k]) for k in keys], ctx)
    return {k: int(round(v * ctx.world_size)) for k, v in zip(keys, vals)}
