"""What a training run reports: rank 0's progress bar, ``metrics.jsonl`` and optional TensorBoard (:class:`Logger`),
the per-interval record averaged over steps and ranks (:func:`log_window`) and the final one-line summary."""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from train import rundir
from train.config import TrainConfig
from train.distributed import DistContext, mean_over_ranks, sum_over_ranks

__all__ = ["Logger", "add_counts", "format_summary", "log_window"]


class Logger:
    """Rank-0 sinks: tqdm bar, JSONL metrics, optional TensorBoard. All methods are no-ops on other ranks."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, total: int, initial: int) -> None:
        self.active = ctx.is_main
        self.bar = None
        self.tb = None
        self.jsonl = None
        if not self.active:
            return
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0,
                file=sys.stderr,
            )
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception as e:  # tensorboard is optional
                warnings.warn(f"tensorboard requested but unavailable ({e}); logging to metrics.jsonl only")

    def bar_update(self, rec: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} scale {rec['logit_scale']:.1f} "
            f"{rec['images_per_s']:.0f} img/s wait {100 * rec['data_wait']:.0f}%",
            refresh=False,
        )

    def record(self, rec: dict[str, Any]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(rundir.json_safe(rec), allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Counters of ``a`` plus those of ``b`` (a key missing on one side counts 0)."""
    return {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in {**a, **b}}


def log_window(
    window: list[dict[str, Any]],
    ctx: DistContext,
    log: Logger,
    counters: dict[str, Any],
    data_stats: dict[str, int],
    global_batch: int,
    data_base: Mapping[str, int] | None = None,
) -> None:
    """One JSONL record per log interval: losses averaged over the window's steps and over ranks, rates over the
    window, data counters summed over ranks plus ``data_base`` (earlier segments of a resumed run; a collective:
    every rank calls it)."""
    keys = ("loss", "loss_itc", "loss_ml")
    local = [float(np.mean([w[k] for w in window])) for k in keys]
    mean = mean_over_ranks(local, ctx)
    data_stats = add_counts(data_base or {}, sum_over_ranks(data_stats, ctx))
    last = window[-1]
    dt = sum(w["dt"] for w in window)
    rec = {
        "step": last["step"],
        "epoch": last["epoch"],
        **dict(zip(keys, mean)),
        "lr": last["lr"],
        "logit_scale": last["logit_scale"],
        "multi_label_logit_scale": last["multi_label_logit_scale"],
        "grad_norm": float(np.mean([w["grad_norm"] for w in window])),
        "images_per_s": global_batch * len(window) / max(dt, 1e-9),
        "data_wait": sum(w["wait"] for w in window) / max(dt, 1e-9),
        "skipped_steps": counters["skipped_steps"],
        "time": time.time(),
        "data": data_stats,
    }
    log.record(rec)


def format_summary(s: dict[str, Any]) -> str:
    """The run summary (``summary.json``'s content) as the one line printed at the end."""
    d = s["data"]
    skipped = (
        f"{d.get('skipped', 0)} bad samples skipped (missing image {d.get('missing_images', 0)}, missing caption "
        f"{d.get('missing_captions', 0)}, empty caption {d.get('empty_captions', 0)}, corrupt image "
        f"{d.get('corrupt_images', 0)}, oversized image {d.get('oversized_images', 0)}), "
        f"{d.get('shard_errors', 0)} shard errors"
    )
    return (
        f"done: {s['steps']}/{s['total_steps']} steps ({s['stopped_by']}), {s['steps_this_run']} this run in "
        f"{s['train_s']:.1f} s ({s['wall_s']:.1f} s wall) on {s['world_size']} x {s['device']}; "
        f"{s['images_per_s']:.1f} images/s, data wait {100 * s['data_wait_frac']:.1f}%, final loss "
        f"{s['final_loss']:.4f}; {s['skipped_steps']} non-finite steps skipped; {skipped}; "
        f"checkpoint {s['checkpoint']}"
    )
