"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically.

A checkpoint is one ``torch.save`` dict that is also a valid model file for :func:`groupvit.load_checkpoint`
(``format``, ``config`` = the model config, ``model`` = the unwrapped state dict) plus the training state:
optimizer, lr stepper, grad scaler, the RNG states of torch / CUDA / numpy / python *of every rank*, the data
position (``epoch`` and ``batch`` = batches of that epoch already consumed), the global ``step``, counters and the
:class:`~train.config.TrainConfig`. Everything is stored as tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``.

Writes go through :func:`groupvit.checkpoint.atomic_save` (temp file in the same directory, fsync, ``os.replace``):
a crash or kill mid-save leaves the previous ``latest.pt`` intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from groupvit.checkpoint import FORMAT, atomic_save, safe_torch_load

LATEST = "latest.pt"
TRAIN_FORMAT = "groupvit-triton-train/1"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, current CUDA device, numpy legacy global, python ``random``)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    train_config: dict[str, Any],
    step: int,
    epoch: int,
    batch: int,
    rng: list[dict[str, Any]],
    counters: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a full training checkpoint to ``path`` (see the module docstring for the layout).

    Args:
        rng: per-rank RNG states (index = rank), gathered by the caller.
        epoch, batch: data position of the *next* batch: ``batch`` batches of ``epoch`` are consumed.
    """
    bare = unwrap(model)
    payload = {
        "format": FORMAT,
        "train_format": TRAIN_FORMAT,
        "config": bare.cfg.to_dict(),
        "model": bare.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "train_config": train_config,
        "step": int(step),
        "epoch": int(epoch),
        "batch": int(batch),
        "rng": rng,
        "world_size": len(rng),
        "counters": dict(counters or {}),
    }
    path = Path(path)
    atomic_save(payload, path)
    return path


def load_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_checkpoint` (``weights_only`` loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = safe_torch_load(path)  # weights only: a crafted file runs no code
    if not isinstance(ckpt, dict) or ckpt.get("train_format") != TRAIN_FORMAT:
        raise ValueError(
            f"{path} is not a training checkpoint of this project (no train_format {TRAIN_FORMAT!r}); "
            f"use groupvit.load_checkpoint for model-only files"
        )
    return ckpt


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``'auto'`` -> ``output_dir/latest.pt`` if it exists; else the given path (must exist)."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        p = Path(output_dir) / LATEST
        if not p.exists():
            return None
    else:
        p = Path(resume)
        if p.is_dir() and not p.name == LATEST:
            p = p / LATEST
        if not p.exists():
            raise FileNotFoundError(f"resume checkpoint {p} does not exist")
    if not p.is_file():
        raise IsADirectoryError(
            f"resume checkpoint {p} is not a file (a directory?): move it away or give resume=PATH of a checkpoint file"
        )
    return p
