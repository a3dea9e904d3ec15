"""AdamW with GroupViT's weight-decay split and the per-iteration warm-up + cosine learning-rate schedule.

Weight decay (docs/groupvit.md §8): parameters that are 1-D or whose name ends in ``.bias`` (LayerNorm and BatchNorm
weights/biases, all biases) get none; everything else is decayed, which includes every >= 2-D weight, ``pos_embed``,
the group tokens and -- unusually -- the two 0-dim logit scales (they are neither 1-D nor named ``*.bias``).

Schedule: timm ``CosineLRScheduler(t_initial=total_steps, warmup_t=warmup_steps, warmup_prefix=False, cycle_limit=1)``
stepped per iteration, i.e. the warm-up is *not* a prefix: the cosine is a function of the absolute step over all
``total_steps`` and the linear warm-up merely replaces its first ``warmup_steps`` values::

    t <  W:      lr(t) = warmup_lr + t * (base_lr - warmup_lr) / W
    W <= t < T:  lr(t) = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * t / T))
    t >= T:      lr(t) = min_lr

(so at ``t = W`` the lr jumps from ``base_lr - (base_lr - warmup_lr)/W`` to the cosine value, slightly below
``base_lr``). Iteration ``t`` (0-based) trains with ``lr(t)``; the official loop applies the same values one
iteration later (it calls ``step_update`` after each step), a shift of one step we do not reproduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (``weight_decay``) and ``no_decay`` (0). A ``module.`` prefix (DDP) is ignored."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 1 or name.endswith(".bias"):
            no_decay.append(p)
            no_decay_names.append(name)
        else:  # >= 2-D weights, pos_embed, group tokens and the 0-dim logit scales
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names, "group": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``lr`` is the initial value (the schedule overwrites it every step).

    ``fused`` (None: when every parameter is on a CUDA device): the fused AdamW kernel, one launch per dtype and
    device for all parameters, with no host read; otherwise the foreach implementation (a few launches per group)."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        **({"fused": True} if fused else {"foreach": True}),
    )


@dataclass(frozen=True)
class CosineSchedule:
    """Per-iteration lr: linear warm-up over ``warmup_steps``, cosine to ``min_lr`` over ``total_steps`` (absolute
    step, warm-up not a prefix), then constant ``min_lr``."""

    base_lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"CosineSchedule: total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"CosineSchedule: warmup_steps {self.warmup_steps} must lie in [0, {self.total_steps}]")

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) iteration ``step``."""
        if step < 0:
            raise ValueError(f"CosineSchedule.lr_at: step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.warmup_lr + step * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * step / self.total_steps))


class LRStepper:
    """Sets every param group's lr to ``schedule.lr_at(step)``; :meth:`step` advances by one iteration.

    Like ``LambdaLR`` but absolute (no multiplicative base lr) and with a tiny checkpointable state (the step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: CosineSchedule, step: int = 0) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.last_step = step
        self._apply()

    def _apply(self) -> None:
        lr = self.schedule.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.schedule.lr_at(self.last_step)

    def state_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "last_step": self.last_step,
            "schedule": [s.base_lr, s.warmup_lr, s.min_lr, s.warmup_steps, s.total_steps],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step. The schedule itself comes from the config; a different stored schedule is allowed
        (e.g. more epochs on resume) but the step count is kept."""
        self.last_step = int(state["last_step"])
        self._apply()
