"""The training step and the training driver (one process or many under ``torchrun``).

:func:`train_step` is the unit the benchmarks time: forward, both losses, backward, clip, optimizer step, with
non-finite detection. :func:`train` runs a whole :class:`~train.config.TrainConfig`:

* distributed setup from the ``torchrun`` environment (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``): NCCL on CUDA, gloo
  on CPU; DistributedDataParallel; BatchNorm in the projectors synchronised across ranks (``nn.SyncBatchNorm`` on
  CUDA, :class:`train.distributed.CPUSyncBatchNorm` on CPU, where torch's SyncBatchNorm refuses to run);
* webdataset shards split across ranks and workers (:mod:`train.data`), bf16 autocast on CUDA;
* rank 0 logs: a tqdm bar (step, loss, lr, logit scale, images/s, data-wait fraction), ``metrics.jsonl``, optional
  TensorBoard, and a final summary (``summary.json``);
* periodic atomic checkpoints (``latest.pt``) and ``resume`` that reproduces an uninterrupted run's losses exactly
  (same process count): the data order depends only on (seed, epoch), consumed batches are skipped, and the RNG
  states of every rank are restored;
* one run per ``output_dir`` (a lock; no fresh run over a checkpoint without ``overwrite``), and SIGTERM ends the
  run at the next step with a checkpoint (:mod:`train.rundir`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import groupvit
from groupvit import ops
from train import rundir
from train.checkpoint import (
    LATEST,
    load_training_checkpoint,
    resolve_resume,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
    unwrap,
)
from train.config import TrainConfig
from train.data import build_loader
from train.distributed import (
    DistContext,
    convert_sync_batchnorm,
    gather_objects,
    mean_over_ranks,
    setup_distributed,
    sum_over_ranks,
)
from train.gradcache import gradcache_backward
from train.logs import Logger, add_counts, format_summary, log_window
from train.optim import CosineSchedule, LRStepper, build_optimizer
from train.shards import dataset_length_warning
from train.synthetic import prepare_synthetic


class NonFiniteLossError(RuntimeError):
    """A training step produced a non-finite loss or gradient norm (and ``skip_nonfinite`` is off)."""


# ---- one step -----------------------------------------------------------------------------------------------------


def train_step(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, Any],
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    clip_grad: float = 5.0,
    skip_nonfinite: bool = False,
    step: int | None = None,
    micro_batch: int | None = None,
    check_finite: bool = False,
    forward: Callable[..., dict[str, torch.Tensor]] | None = None,
    frozen: Sequence[nn.Parameter] = (),
) -> dict[str, Any]:
    """One optimizer step on ``batch = {"images": [B,3,H,W], "texts": [B,1+K,L], ...}``.

    Forward (under autocast when ``autocast_dtype`` is given) -> ``loss_fn`` (``loss``, ``loss_itc``, ``loss_ml``) ->
    backward (through ``scaler`` for fp16) -> grad-norm clip to ``clip_grad`` (0: measure only) -> optimizer step.
    With ``0 < micro_batch < B`` the forward and backward run through :func:`train.gradcache.gradcache_backward`
    (the same loss and gradients over the whole batch, tower activations of ``micro_batch`` samples at a time).

    The texts are planned for exact trimming (:class:`groupvit.model.TextPlan`) on the host *before* they move to
    the device, so no step reads device memory for it; ``forward(model, loss_fn, images, texts, text_plan)`` runs the
    forward and the losses (default :func:`forward_loss`; :func:`compile_forward_loss` for ``compile=true``).
    ``check_finite``: the fused loss's own input check (:func:`groupvit.ops.set_check_finite`; one more host sync
    per loss call on a GPU), off by default: the non-finite protection is the step's own check below.

    A step whose loss or global gradient norm is not finite is never applied: gradients are dropped and the
    BatchNorm running statistics restored. With ``skip_nonfinite`` it is skipped (``skipped=True`` returned);
    otherwise :class:`NonFiniteLossError` is raised naming ``step``. Under torch.distributed all ranks take the
    same decision.
    With a GradScaler, non-finite *gradients* are the scaler's business (it skips and lowers its scale); only a
    non-finite loss counts here.
    ``frozen``: parameters left unchanged by this step (their gradients are dropped before the clip, so AdamW
    neither moves nor decays them; used by ``optim.freeze_grouping_steps``).

    Returns:
        floats ``loss``, ``loss_itc``, ``loss_ml`` (NaN when absent), ``grad_norm``, ``logit_scale`` and
        ``multi_label_logit_scale`` (the clamped ``exp``, NaN when absent), and bools ``finite``, ``skipped``.
        The values are read with one host sync, the only one of the step (no GradScaler; ``check_finite`` off).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_step: the model has no trainable parameters")
    device = params[0].device
    bare = unwrap(model)
    text_plan = bare.plan_text(batch["texts"]).to(device)  # host-side for CPU batches (the loader's)
    images = batch["images"].to(device, non_blocking=True)
    texts = batch["texts"].to(device, non_blocking=True)
    buffers, saved = _snapshot_buffers(model)  # BatchNorm statistics (small), restored on a bad step

    optimizer.zero_grad(set_to_none=True)
    with ops.use_check_finite(check_finite):
        if micro_batch and micro_batch < images.shape[0]:
            if forward is not None:
                raise ValueError(
                    "train_step: a custom (e.g. compiled) forward cannot run micro-batched steps; "
                    "pass forward=None or micro_batch=None"
                )
            losses = gradcache_backward(
                model,
                loss_fn,
                images,
                texts,
                micro_batch,
                scaler=scaler,
                autocast_dtype=autocast_dtype,
                host_texts=batch["texts"],
            )
        else:
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                losses = (forward or forward_loss)(model, loss_fn, images, texts, text_plan)
            (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
    loss = losses["loss"]
    for p in frozen:
        p.grad = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf)

    nan = torch.full((), float("nan"), device=device)  # a fill kernel: torch.tensor(..., device) would sync
    ml_scale = getattr(bare, "multi_label_logit_scale", None)
    stats = torch.stack(
        [
            loss.detach().float(),
            losses.get("loss_itc", nan).detach().float(),
            losses.get("loss_ml", nan).detach().float(),
            grad_norm.detach().float().reshape(()),
            bare.logit_scale.detach().float().exp().clamp(max=100),
            ml_scale.detach().float().exp().clamp(max=100) if ml_scale is not None else nan,
        ]
    )
    finite = torch.isfinite(stats[0]) if scaler is not None else (torch.isfinite(stats[0]) & torch.isfinite(stats[3]))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = finite.float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank must agree to step or to skip
        finite = flag[0] > 0
    values = torch.cat([stats, finite.float().reshape(1)]).tolist()  # the one host sync
    loss_v, itc, ml, gnorm, scale, ml_s, ok = values
    ok = bool(ok)

    skipped = False
    if ok:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
        where = f"step {step}" if step is not None else "this step"
        msg = f"non-finite loss at {where}: loss={loss_v}, loss_itc={itc}, loss_ml={ml}, grad_norm={gnorm}"
        if not skip_nonfinite:
            raise NonFiniteLossError(msg + " (set skip_nonfinite=true to skip such steps)")
        if scaler is not None:
            scaler.update()
        skipped = True
    return {
        "loss": loss_v,
        "loss_itc": itc,
        "loss_ml": ml,
        "grad_norm": gnorm,
        "logit_scale": scale,
        "multi_label_logit_scale": ml_s,
        "finite": ok,
        "skipped": skipped,
    }


def forward_loss(
    model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, texts: torch.Tensor, text_plan: Any = None
) -> dict[str, torch.Tensor]:
    """``loss_fn(model(images, texts, text_plan=text_plan))``: the part of a step that ``compile=true`` compiles."""
    return loss_fn(model(images, texts, text_plan=text_plan))


def compile_forward_loss(
    mode: str | None = None, backend: str = "inductor", fullgraph: bool = False
) -> Callable[..., dict[str, torch.Tensor]]:
    """:func:`forward_loss` under ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs), the text plan's group
    sizes marked dynamic (:meth:`groupvit.model.TextPlan.mark_dynamic`). The fused kernels are custom ops (one node
    each; the assignment's Philox seed draw too, run eagerly, so compiled and eager runs draw the same seeds): one
    graph with either backend; in distributed runs DDP splits the graph at its gradient buckets."""
    compiled = torch.compile(forward_loss, mode=mode, backend=backend, fullgraph=fullgraph)

    def run(
        model: nn.Module, loss_fn: nn.Module, images: torch.Tensor, texts: torch.Tensor, text_plan: Any = None
    ) -> dict[str, torch.Tensor]:
        return compiled(model, loss_fn, images, texts, text_plan.mark_dynamic() if text_plan is not None else None)

    return run


_SNAPSHOTS: "weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]]" = weakref.WeakKeyDictionary()


def _snapshot_buffers(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's buffers and a copy of them, refilled in place every step (no per-step allocation)."""
    buffers = [b for b in model.buffers()]
    saved = _SNAPSHOTS.get(model)
    if saved is None or [s.shape for s in saved] != [b.shape for b in buffers]:
        saved = _SNAPSHOTS[model] = [b.detach().clone() for b in buffers]
    elif buffers:
        with torch.no_grad():
            torch._foreach_copy_(saved, buffers)
    return buffers, saved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- logging --------------------------------------------------------------------------------------------------------


# ---- data ------------------------------------------------------------------------------------------------------------


def _next_batch(it: Iterator[Mapping[str, Any]]) -> Mapping[str, Any]:
    # Starting a DataLoader iteration draws a base seed from torch's global RNG. Fork the RNG around every fetch so
    # the training stream (Gumbel noise, drop-path) never depends on where epochs or resumed runs begin: the data
    # stream is a function of (seed, epoch) alone (train.data), and the model's stream of the restored RNG state.
    with torch.random.fork_rng(devices=[]):
        return next(it)


def _loader_stats(loader: Any) -> dict[str, int]:
    st = getattr(loader, "stats", None)
    return {k: int(v) for k, v in st.as_dict().items()} if st is not None else {}


# ---- the driver ------------------------------------------------------------------------------------------------------


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training described by ``cfg``; returns the summary (also written to ``summary.json``).

    The returned dict adds ``history`` (this rank's per-step local losses: ``step``, ``loss``, ``skipped``) and
    ``model`` (the trained bare :class:`groupvit.GroupViT`, still on its device).
    """
    ctx = setup_distributed(cfg.device)
    try:
        lock = rundir.FolderLock(cfg.output_dir, "output directory") if ctx.is_main else contextlib.nullcontext()
        with lock, rundir.StopSignal() as stop:  # one run per output_dir; SIGTERM: checkpoint and stop
            return _train(cfg, ctx, stop)
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, ctx: DistContext, stop: rundir.StopSignal | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    seed_everything(cfg.seed + ctx.rank)
    ops.set_backend(cfg.backend)
    torch.set_num_threads(cfg.torch_threads(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))))
    out_dir = Path(cfg.output_dir)
    resume_path = resolve_resume(cfg.resume, out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        rundir.check_fresh_start(out_dir, resuming=resume_path is not None, overwrite=cfg.overwrite)
        rundir.clean_temp_files(out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    cfg = prepare_synthetic(cfg, ctx)

    # model, loss, optimizer, schedule
    model = groupvit.create_model(cfg.model.preset, **cfg.model_overrides()).to(ctx.device)
    if ctx.distributed:
        model = convert_sync_batchnorm(model, ctx.device)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    loss_fn = groupvit.GroupViTLoss()
    forward = compile_forward_loss(None if cfg.compile_mode == "default" else cfg.compile_mode) if cfg.compile else None
    steps_per_epoch = cfg.steps_per_epoch(ctx.world_size)
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    base_lr, warmup_lr, min_lr = cfg.scaled_lrs(ctx.world_size)
    optimizer = build_optimizer(
        unwrap(model), lr=base_lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
    )
    stepper = LRStepper(optimizer, CosineSchedule(base_lr, warmup_lr, min_lr, warmup_steps, total_steps))
    amp_dtype = autocast_dtype_for(cfg.precision, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type) if amp_dtype == torch.float16 else None

    # resume
    step, epoch, batch_idx = 0, 0, 0
    counters: dict[str, Any] = {"skipped_steps": 0, "train_time_s": 0.0, "data_before_epoch": {}}  # carried on resume
    if resume_path is not None:
        step, epoch, batch_idx = _resume(resume_path, cfg, ctx, model, optimizer, stepper, scaler, counters)

    data_base = dict(counters["data_before_epoch"])  # data counts of the epochs before the resumed one
    if ctx.is_main:
        rundir.truncate_metrics(out_dir, step)  # records past the checkpoint are re-run: no duplicate steps
    stop_at = total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)
    log = Logger(cfg, ctx, total=stop_at, initial=step)
    if ctx.is_main:
        n_params = sum(p.numel() for p in unwrap(model).parameters())
        log.message(
            f"GroupViT {cfg.model.preset} ({n_params / 1e6:.2f} M params) on {ctx.world_size} x {ctx.device}, "
            f"backend {cfg.backend}{' (compiled)' if cfg.compile else ''}, {torch.get_num_threads()} threads, "
            f"precision {amp_dtype or torch.float32}; {steps_per_epoch} steps/epoch x "
            f"{cfg.optim.epochs} epochs, global batch {cfg.data.batch_size * ctx.world_size}"
            + (f" (towers in micro-batches of {cfg.micro_batch})" if _micro(cfg.micro_batch, cfg) else "")
            + f", peak lr {base_lr:.3g} (optim.base_lr {cfg.optim.base_lr:.3g} x global batch "
            f"{cfg.data.batch_size * ctx.world_size} / optim.lr_ref_batch {cfg.optim.lr_ref_batch})"
            + (f"; resumed from {resume_path} at step {step}" if resume_path else "")
        )
        if cfg.optim.steps_per_epoch is None and (
            warn := dataset_length_warning(cfg.data.dataset_length, cfg.data.train_shards)
        ):
            log.message("warning: " + warn)

    history: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    global_batch = cfg.data.batch_size * ctx.world_size
    tot_wait = tot_time = 0.0
    steps_run = 0
    last_ckpt_step = step
    t_train0 = time.perf_counter()
    stopped_by = "completed" if step >= total_steps else "max_steps"
    loader = build_loader(
        cfg, ctx, steps_per_epoch=steps_per_epoch, context_length=unwrap(model).cfg.text.context_length
    )
    epoch_data = data_base  # data counts (whole run, all ranks) before the current epoch

    def checkpoint() -> None:
        nonlocal last_ckpt_step
        rngs = gather_objects(rng_state(), ctx)  # collective: every rank's RNG goes into rank 0's file
        total = add_counts(data_base, sum_over_ranks(_loader_stats(loader), ctx))  # collective too
        # a resume re-reads (and counts again) the consumed part of its epoch: carry the counts before that epoch
        counters["data_before_epoch"] = total if batch_idx == 0 else epoch_data
        if ctx.is_main:
            save_training_checkpoint(
                out_dir / LATEST,
                model=model,
                optimizer=optimizer,
                scheduler=stepper,
                scaler=scaler,
                train_config=cfg.to_dict(),
                step=step,
                epoch=epoch,
                batch=batch_idx,
                rng=rngs,
                counters=counters,
            )
            rundir.clean_temp_files(out_dir)  # temp files of saves killed earlier
        last_ckpt_step = step

    grouping = unwrap(model).grouping_parameters() if cfg.optim.freeze_grouping_steps else []
    model.train()
    try:
        while step < stop_at:
            epoch_data = add_counts(data_base, sum_over_ranks(_loader_stats(loader), ctx))
            it = loader.iter_epoch(epoch, batch_idx)
            this_epoch = epoch
            while epoch == this_epoch and step < stop_at:
                t0 = time.perf_counter()
                try:
                    batch = _next_batch(it)
                except StopIteration:
                    raise RuntimeError(
                        f"the data loader ended after {batch_idx} of {steps_per_epoch} batches in epoch "
                        f"{epoch}; check data.dataset_length / optim.steps_per_epoch"
                    ) from None
                t1 = time.perf_counter()
                try:
                    r = train_step(
                        model,
                        loss_fn,
                        optimizer,
                        batch,
                        forward=forward,
                        check_finite=cfg.check_finite,
                        scaler=scaler,
                        autocast_dtype=amp_dtype,
                        clip_grad=cfg.optim.clip_grad,
                        skip_nonfinite=cfg.skip_nonfinite,
                        step=step + 1,
                        micro_batch=cfg.micro_batch,
                        frozen=grouping if step < cfg.optim.freeze_grouping_steps else (),
                    )
                except NonFiniteLossError as e:
                    log.message(f"[step {step + 1}] {e}")  # steps counted from 1, as the bar and logs
                    raise
                lr = stepper.get_last_lr()
                stepper.step()
                t2 = time.perf_counter()
                if r["skipped"]:
                    counters["skipped_steps"] += 1
                    log.message(
                        f"[step {step + 1}] non-finite loss ({r['loss']}) or grad norm ({r['grad_norm']}): "
                        f"step skipped ({counters['skipped_steps']} so far)"
                    )
                wait, dt = t1 - t0, t2 - t0
                tot_wait, tot_time, steps_run = tot_wait + wait, tot_time + dt, steps_run + 1
                counters["train_time_s"] = float(counters["train_time_s"]) + dt
                rec = {
                    "step": step + 1,
                    "epoch": epoch,
                    "lr": lr,
                    "wait": wait,
                    "dt": dt,  # steps done, as the bar
                    **{
                        k: r[k]
                        for k in ("loss", "loss_itc", "loss_ml", "grad_norm", "logit_scale", "multi_label_logit_scale")
                    },
                }
                history.append({"step": step, "loss": r["loss"], "skipped": r["skipped"]})
                window.append(rec)
                step, batch_idx = step + 1, batch_idx + 1
                if batch_idx >= steps_per_epoch:
                    epoch, batch_idx = epoch + 1, 0
                log.bar_update({**rec, "images_per_s": global_batch / max(dt, 1e-9), "data_wait": wait / max(dt, 1e-9)})
                if step % cfg.log_interval == 0 or step == stop_at:
                    log_window(window, ctx, log, counters, _loader_stats(loader), global_batch, data_base)
                    window = []
                over_time = cfg.time_limit_s is not None and time.perf_counter() - t_train0 > cfg.time_limit_s
                signalled = stop is not None and stop.requested is not None
                if ctx.distributed:  # all ranks must stop together
                    over_time, signalled = (v > 0 for v in mean_over_ranks([float(over_time), float(signalled)], ctx))
                if step % cfg.ckpt_interval == 0 or step == stop_at or over_time or signalled:
                    checkpoint()
                if over_time or signalled:
                    stopped_by = "time_limit" if over_time else "signal"
                    why = f"time limit of {cfg.time_limit_s} s reached" if over_time else "SIGTERM received"
                    log.message(f"{why} at step {step}: checkpoint written, stopping (resume with resume=auto)")
                    break
            if hasattr(it, "close"):
                it.close()  # end this epoch's iteration (and its workers) before the next one starts
            if stopped_by in ("time_limit", "signal"):
                break
        if step >= total_steps:
            stopped_by = "completed"
        if step != last_ckpt_step:
            checkpoint()
    finally:
        log.close()

    data_stats = add_counts(data_base, sum_over_ranks(_loader_stats(loader), ctx))  # whole run, all segments
    wall = time.perf_counter() - t_start
    summary = {
        "steps": step,
        "total_steps": total_steps,
        "steps_this_run": steps_run,
        "stopped_by": stopped_by,
        "epochs_done": epoch + batch_idx / steps_per_epoch,
        "wall_s": wall,
        "train_s": tot_time,
        "images_per_s": global_batch * steps_run / max(tot_time, 1e-9),
        "data_wait_frac": tot_wait / max(tot_time, 1e-9),
        "final_loss": float(np.mean([h["loss"] for h in history[-cfg.log_interval :]])) if history else float("nan"),
        "skipped_steps": counters["skipped_steps"],
        "data": data_stats,
        "checkpoint": str(out_dir / LATEST),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
    }
    if ctx.is_main:
        (out_dir / "summary.json").write_text(json.dumps(rundir.json_safe(summary), indent=2, allow_nan=False))
        log.message(format_summary(summary))
    summary["history"] = history
    summary["model"] = unwrap(model)
    return summary


def _resume(
    path: Path,
    cfg: TrainConfig,
    ctx: DistContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stepper: LRStepper,
    scaler: torch.amp.GradScaler | None,
    counters: dict[str, Any],
) -> tuple[int, int, int]:
    """Restore model, optimizer, schedule, scaler, counters (in place) and this rank's RNG from the checkpoint at
    ``path``; warn where the run cannot repeat the original exactly. Returns ``(step, epoch, batch)``."""
    ck = load_training_checkpoint(path)
    unwrap(model).load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    stepper.load_state_dict(ck["scheduler"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    step, epoch, batch_idx = ck["step"], ck["epoch"], ck["batch"]
    saved = ck.get("train_config", {}).get("data", {})
    changed = [
        k
        for k in ("batch_size", "num_workers", "train_shards", "shuffle_buffer")
        if k in saved and saved[k] != getattr(cfg.data, k)
    ]
    if changed and ctx.is_main:
        warnings.warn(
            f"resuming with different data.{'/'.join(changed)} than the checkpoint: the data order "
            f"(and so the losses) will differ from an uninterrupted run"
        )
    if _micro(ck.get("train_config", {}).get("micro_batch"), cfg) != _micro(cfg.micro_batch, cfg) and ctx.is_main:
        warnings.warn(
            "resuming with a different micro_batch than the checkpoint: the same objective, but the "
            "Gumbel and drop-path draws are grouped differently, so the losses will differ from an "
            "uninterrupted run"
        )
    counters.update(ck.get("counters", {}))
    if ck["world_size"] == ctx.world_size:
        set_rng_state(ck["rng"][ctx.rank])
    else:
        warnings.warn(
            f"checkpoint was written by {ck['world_size']} processes, now {ctx.world_size}: RNG "
            f"streams are re-seeded, so the run will not repeat the original exactly"
        )
        seed_everything(cfg.seed + ctx.rank + 1_000_003 * step)
    return step, epoch, batch_idx


def _micro(micro_batch: int | None, cfg: TrainConfig) -> int | None:
    """The micro-batch a step really uses (None: the whole batch at once)."""
    return micro_batch if micro_batch and micro_batch < cfg.data.batch_size else None
