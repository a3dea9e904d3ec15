"""End-to-end training-step benchmark: images/s and peak memory of ``train.loop.train_step`` on GroupViT.

    python -m bench.bench_model --out DIR [--preset groupvit-s] [--batch 256]
                                [--configs eager,eager+compile,triton,triton+compile,eager-full,eager-full+compile]
                                [--autocast bf16]

One step = forward (image + caption + K prompts), both contrastive losses, backward, grad clip, AdamW step
(the project's own ``train_step`` and ``build_optimizer``). Per config: a few warm-up steps (compilation and
autotuning happen there), then ``--steps`` timed steps back to back; rows ``ms`` (per step), ``images_per_s`` and
``peak_mb`` (``max_memory_allocated`` over the timed steps: weights, optimizer state and activations). After all
configs, the largest per-GPU batch that fits, per config: B doubles from 2x ``--batch`` until OOM,
``--max-batch-cap`` or the time budget (compiled configs recompile at each size).

``correct``: ``fail`` if the first step's loss is not finite; else ``pass`` / ``warn`` as that loss (same initial
weights and batch) is within 5% of the eager config's or not -- a sanity check only, since the Gumbel noise and
drop-path draws differ between backends and under compile; exact parity lives in tests/.
Inputs are synthetic (normal images, random token ids framed by SOT/EOT, caption/prompt lengths of realistic size,
texts on the CPU as the loader gives them): the data pipeline is not timed here. Compiled configs compile the
forward + losses as ``compile=true`` training does (:func:`train.loop.compile_forward_loss`).

First, the counted FLOP and byte budget of one step (:func:`step_budget`: image tower, text tower, losses,
optimizer; ``budget.json``), so images/s turn into MFU: ``images/s * GFLOP/pair / peak GFLOP/s``. Only the
budget: ``--configs "" --no-max-batch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bench import common
from bench.bench_ops import _short
from kernels.registry import OPS
from kernels.utils import triton_can_launch

CONFIGS: dict[str, tuple[str, bool, bool]] = {  # name -> (ops backend, compile forward + losses, trim the texts)
    "eager": ("eager", False, True),
    "eager+compile": ("eager", True, True),
    "triton": ("triton", False, True),
    "triton+compile": ("triton", True, True),
    "eager-full": ("eager", False, False),  # the official-equivalent step: every text at the full context length
    "eager-full+compile": ("eager", True, False),  # ... under torch.compile
}
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
SOT, EOT = 49406, 49407
LOSS_RTOL = 0.05

StepFn = Callable[..., dict[str, Any]]


def load_train_step() -> StepFn | str:
    """``train.loop.train_step``, or why it cannot be imported."""
    try:
        from train.loop import train_step

        return train_step
    except Exception as e:
        return f"unavailable: train.loop.train_step: {_short(e)}"


def triton_unavailable(device: torch.device) -> str | None:
    """Why the ``triton`` backend cannot run here (``None`` if it can)."""
    if not triton_can_launch(device):
        return "unavailable: Triton kernels need CUDA or TRITON_INTERPRET=1"
    for op in ("assign_attention", "contrastive_loss"):
        try:
            OPS[op].triton_fn()
        except Exception as e:
            return f"unavailable: {op}: {_short(e)}"
    return None


CAPTION_TOKENS = (4, 24)  # tokens between SOT and EOT, uniform: captions (mean 14 + 2; CC3M's mean is about 13-14)
PROMPT_TOKENS = (4, 10)  # ... and prompts ("a photo of a {noun}." and the other CLIP templates: 5-10)


def make_batch(cfg: Any, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic batch: images ``[B,3,S,S]`` ~ N(0,1) on ``device``; texts ``[B,1+K,L]`` on the CPU, as the loader
    gives them (the step plans their trimming there): SOT, random ids, EOT, zero padding, with caption and prompt
    lengths of realistic size (:data:`CAPTION_TOKENS`, :data:`PROMPT_TOKENS`, capped by the context)."""
    g = torch.Generator().manual_seed(seed)
    s, k, ctx = cfg.vision.img_size, cfg.multi_label, cfg.text.context_length
    images = torch.randn(batch, 3, s, s, generator=g)
    texts = torch.zeros(batch, 1 + k, ctx, dtype=torch.long)
    lo = torch.tensor([CAPTION_TOKENS[0]] + [PROMPT_TOKENS[0]] * k)  # [1+K]
    hi = torch.tensor([CAPTION_TOKENS[1]] + [PROMPT_TOKENS[1]] * k)
    u = torch.rand(batch, 1 + k, generator=g)
    lengths = (lo + (u * (hi - lo + 1)).long()).clamp(1, ctx - 2)  # [B, 1+K] tokens between SOT and EOT
    ids = torch.randint(1, SOT, (batch, 1 + k, ctx), generator=g)
    pos = torch.arange(ctx)
    texts = torch.where(pos <= lengths[..., None], ids, texts)
    texts[..., 0] = SOT
    texts.scatter_(-1, (lengths + 1)[..., None], EOT)
    return {"images": images.to(device), "texts": texts}


# ---- FLOP and byte budget of one step ---------------------------------------------------------------------------

BUDGET_PARTS = ("image tower", "text tower", "losses", "optimizer")


class _ByteCounter(TorchDispatchMode):
    """Bytes of the inputs and outputs of every aten op that is not a view: the traffic of the unfused eager step
    (an upper bound of its memory traffic that fusion lowers)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func is not torch.ops.aten.detach.default:
            seen: set[int] = set()
            for t in pytree.tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    self.bytes += t.numel() * t.element_size()
        return out


def step_budget(
    preset: str, batch: int, texts: torch.Tensor | None = None, *, trim: bool = True
) -> dict[str, dict[str, float]]:
    """Counted FLOPs and bytes of one training step by part (:data:`BUDGET_PARTS`, forward + backward), fp32,
    eager ops (the spec), shapes only: the model runs on the meta device.

    FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention: the FLOPs of MFU;
    elementwise work, e.g. the whole optimizer, counts 0). Bytes: :class:`_ByteCounter`. ``texts`` ``[B, 1+K, L]``
    (CPU): the token batch whose trimming plan sets the text tower's shapes (default: :func:`make_batch`'s);
    ``trim=False``: every text at the full context length. Returns ``{part: {"flop", "bytes"}}``, ``"step"`` (their
    sum) and ``"text, untrimmed"`` (the text tower at the full context length, for comparison; not in the sum).
    """
    import dataclasses as dc

    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import groupvit
    from groupvit import ops
    from groupvit.config import get_config
    from groupvit.model import GroupViTOutput, TextPlan
    from train.optim import build_optimizer

    cfg = get_config(preset)
    if not trim:
        cfg = dc.replace(cfg, text=dc.replace(cfg.text, trim_multiple=0))
    texts = make_batch(cfg, batch, torch.device("cpu"))["texts"] if texts is None else texts
    model = groupvit.GroupViT(cfg).to("meta").train()
    loss_fn = groupvit.GroupViTLoss()
    meta = dict(device="meta")
    images = torch.empty(batch, 3, cfg.vision.img_size, cfg.vision.img_size, **meta)
    tokens, plan = texts.reshape(-1, texts.shape[-1]).to("meta"), model.plan_text(texts).to("meta")
    n_text, d = tokens.shape[0], cfg.output_dim

    def losses() -> None:
        img = torch.empty(batch, d, **meta, requires_grad=True)
        txt = torch.empty(n_text, d, **meta, requires_grad=True)
        t = F.normalize(txt, dim=-1).view(batch, -1, d)
        k = t.shape[1] - 1
        out = GroupViTOutput(
            F.normalize(img, dim=-1),
            t[:, 0],
            t[:, 1:].reshape(-1, d) if k else None,
            model.logit_scale,
            model.multi_label_logit_scale if k else None,
        )
        loss_fn(out)["loss"].backward()

    def optimizer() -> None:
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        build_optimizer(model, lr=1e-3, fused=False).step()

    full = TextPlan(((None, plan.groups[0][1].new_zeros(n_text), tokens.shape[1]),), None)  # no trimming
    parts = {
        "image tower": lambda: model.encode_image(images).sum().backward(),
        "text tower": lambda: model.text_projector(model.text_encoder(tokens, plan)).sum().backward(),
        "losses": losses,
        "optimizer": optimizer,
        "text, untrimmed": lambda: model.text_projector(model.text_encoder(tokens, full)).sum().backward(),
    }
    out: dict[str, dict[str, float]] = {}
    with ops.use_backend("eager"):
        for name, fn in parts.items():
            with FlopCounterMode(display=False) as fc, _ByteCounter() as bc:
                fn()
            out[name] = {"flop": float(fc.get_total_flops()), "bytes": float(bc.bytes)}
    out["step"] = {k: sum(out[p][k] for p in BUDGET_PARTS) for k in ("flop", "bytes")}
    return out


def format_budget(budget: dict[str, dict[str, float]], batch: int, title: str) -> str:
    """A table: GFLOP and GB per step and per image-text pair, and each part's share of the FLOPs."""
    lines = [
        f"# {title}",
        f"# {'part':15} {'GFLOP/step':>11} {'GFLOP/pair':>11} {'FLOP %':>7} {'GB/step':>9} {'MB/pair':>9}",
    ]
    total = budget["step"]["flop"] or 1.0
    for name in (*BUDGET_PARTS, "step", "text, untrimmed"):
        v = budget[name]
        lines.append(
            f"# {name:15} {v['flop'] / 1e9:11.1f} {v['flop'] / batch / 1e9:11.3f} "
            f"{100 * v['flop'] / total:7.1f} {v['bytes'] / 1e9:9.2f} {v['bytes'] / batch / 1e6:9.1f}"
        )
    return "\n".join(lines)


def _build(preset: str, device: torch.device, compile_: bool, lr: float, trim: bool = True):
    """Fresh model (seed 0), its runner, loss and optimizer; ``compile_``: the runner carries the compiled forward +
    losses of ``compile=true`` training (:func:`train.loop.compile_forward_loss`) as ``runner.forward_loss``;
    ``trim=False``: every text at the full context length (``text.trim_multiple=0``), as the official code runs."""
    import groupvit

    torch.manual_seed(0)
    model = groupvit.create_model(preset, **({} if trim else {"text.trim_multiple": 0})).to(device).train()
    try:
        from train.optim import build_optimizer

        opt = build_optimizer(model, lr=lr)
    except ImportError:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss_fn = groupvit.GroupViTLoss().to(device)
    if compile_:
        from train.loop import compile_forward_loss

        model.forward_loss = compile_forward_loss()  # a plain attribute (not a module): train_step's forward=
    return model, model, loss_fn, opt


def _reset(device: torch.device) -> None:
    torch._dynamo.reset()
    common.free_memory(device)


def _ips(batch: int, ms: float) -> float:
    return batch / (ms * 1e-3) if ms > 0 else math.nan


@dataclasses.dataclass
class Job:
    """What every config of one run shares."""

    step_fn: StepFn | str
    preset: str
    batch: int
    device: torch.device
    autocast: str
    env: dict[str, str]
    micro_batch: int | None = None  # train_step's micro_batch (train.gradcache): towers this many samples at a time

    @property
    def cfg(self) -> Any:
        from groupvit.config import get_config

        return get_config(self.preset)

    def dims(self, **extra: Any) -> dict[str, Any]:
        c = self.cfg
        micro = {"micro": self.micro_batch} if self.micro_batch else {}
        return dict(
            preset=self.preset,
            B=self.batch,
            S=c.vision.img_size,
            K=c.multi_label,
            L=c.text.context_length,
            **micro,
            **extra,
        )

    def row(self, config: str, **kw: Any) -> dict[str, str]:
        return common.make_row(self.env, op="train_step", provider=config, mode="step", dtype=self.autocast, **kw)

    def unavailable(self, config: str) -> str | None:
        if isinstance(self.step_fn, str):
            return self.step_fn
        return triton_unavailable(self.device) if CONFIGS[config][0] == "triton" else None

    def step(self, runner, loss_fn, opt, data) -> dict[str, Any]:
        ac = AUTOCAST[self.autocast]
        scaler = self._scaler if ac == torch.float16 else None
        micro = {"micro_batch": self.micro_batch} if self.micro_batch else {}
        if getattr(runner, "forward_loss", None) is not None:
            micro["forward"] = runner.forward_loss
        return self.step_fn(runner, loss_fn, opt, data, autocast_dtype=ac, scaler=scaler, **micro)

    @functools.cached_property
    def _scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type)


def bench_config(
    job: Job, config: str, *, steps: int, warmup: int, ref_loss: float | None
) -> tuple[list[dict[str, str]], float | None]:
    """Throughput rows of one config at ``job.batch``; returns them and the first step's loss (None on failure)."""
    from groupvit import ops

    backend, compile_, trim = CONFIGS[config]
    case, dims, batch = (
        f"{job.preset}-b{job.batch}" + (f"-m{job.micro_batch}" if job.micro_batch else ""),
        job.dims(),
        job.batch,
    )
    if (why := job.unavailable(config)) is not None:
        print(f"train_step {config:15} {why}", flush=True)
        return [
            job.row(config, case=case, metric="images_per_s", unit="images/s", p50=None, dims=dims, correct=why)
        ], None
    first_loss, err = None, None
    with ops.use_backend(backend):
        try:
            model, runner, loss_fn, opt = _build(job.preset, job.device, compile_, 1e-4, trim)
            data = make_batch(job.cfg, batch, job.device)
            step = lambda: job.step(runner, loss_fn, opt, data)  # noqa: E731
            torch.manual_seed(1)
            first_loss = float(step()["loss"])
            for _ in range(max(warmup - 1, 0)):
                step()
            if job.device.type == "cuda":
                torch.cuda.synchronize(job.device)
                torch.cuda.reset_peak_memory_stats(job.device)
            t = common.time_steps(step, steps, job.device)
            peak = torch.cuda.max_memory_allocated(job.device) / 2**20 if job.device.type == "cuda" else None
        except Exception as e:
            err = "oom" if common.is_oom(e) else f"error: {_short(e)}"
    step = data = model = runner = loss_fn = opt = None  # noqa: F841 (drop the references: memory is freed)
    _reset(job.device)
    if err is not None:
        print(f"train_step {config:15} B={batch:<5} {err}", flush=True)
        return [
            job.row(config, case=case, metric="images_per_s", unit="images/s", p50=None, dims=dims, correct=err)
        ], None
    if not math.isfinite(first_loss):
        status = f"fail: first loss {first_loss}"
    elif ref_loss is None:
        status = "pass (finite; reference config)" if config == "eager" else "pass (finite; no eager loss)"
    else:
        rel = abs(first_loss - ref_loss) / max(abs(ref_loss), 1e-12)
        status = f"{'pass' if rel <= LOSS_RTOL else 'warn'} (loss {rel:.1%} from eager)"
    rows = [
        job.row(config, case=case, metric="ms", unit="ms", p50=t.p50, p20=t.p20, p80=t.p80, dims=dims, correct=status),
        job.row(
            config,
            case=case,
            metric="images_per_s",
            unit="images/s",
            p50=_ips(batch, t.p50),
            p20=_ips(batch, t.p80),
            p80=_ips(batch, t.p20),
            dims=dims,
            correct=status,
        ),
    ]
    if peak is not None:
        rows.append(job.row(config, case=case, metric="peak_mb", unit="MiB", p50=peak, dims=dims, correct=status))
    mem = f"  peak {peak:9.1f} MiB" if peak is not None else ""
    print(
        f"train_step {config:15} B={batch:<5} {t.p50:9.2f} ms [{t.p20:.2f}-{t.p80:.2f}] "
        f"{_ips(batch, t.p50):9.1f} images/s{mem}  {status}",
        flush=True,
    )
    return rows, first_loss


def max_batch_config(job: Job, config: str, *, cap: int, budget_s: float, start_ok: bool | str) -> list[dict[str, str]]:
    """Largest batch that fits: a fresh model, B doubled from 2x ``job.batch``, two steps per size (the first
    compiles when the config compiles -- static shapes, since the model's Gumbel sampling does not trace with a
    symbolic batch -- the second is timed) until OOM, ``cap`` or the time budget (the next size is predicted to
    cost 2.2x this one's two steps). ``start_ok``: True if ``job.batch`` itself ran, else why it did not."""
    from groupvit import ops

    backend, compile_, trim = CONFIGS[config]
    mcase = f"{job.preset}-max-batch"
    if start_ok is not True:
        why = start_ok if isinstance(start_ok, str) else "not run"
        return [
            job.row(
                config,
                case=mcase,
                metric="max_batch",
                unit="images",
                p50=None,
                dims=job.dims(cap=cap),
                correct=f"unchecked; stop: B={job.batch} did not run ({why})",
            )
        ]
    budget = common.Budget(budget_s)
    best, best_ms, best_peak, b, stop, cost_s = job.batch, None, None, 2 * job.batch, f"cap {cap}", 0.0
    with ops.use_backend(backend), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        model, runner, loss_fn, opt = _build(job.preset, job.device, compile_, 1e-4, trim)
        while b <= cap:
            if 2.2 * cost_s > budget.left():
                stop = f"time budget at B={b}"
                break
            err = None
            try:
                data = make_batch(job.cfg, b, job.device, seed=b)
                t0 = time.perf_counter()
                job.step(runner, loss_fn, opt, data)
                if job.device.type == "cuda":
                    torch.cuda.synchronize(job.device)
                    torch.cuda.reset_peak_memory_stats(job.device)
                t = common.time_steps(lambda: job.step(runner, loss_fn, opt, data), 1, job.device)
                cost_s = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated(job.device) / 2**20 if job.device.type == "cuda" else None
            except Exception as e:
                err = f"oom at B={b}" if common.is_oom(e) else f"error at B={b}: {_short(e)}"
            data = None
            opt.zero_grad(set_to_none=True)
            common.free_memory(job.device, err is not None)
            if err is not None:
                stop = err
                break
            best, best_ms, best_peak = b, t.p50, peak
            b *= 2
    model = runner = loss_fn = opt = None  # noqa: F841 (drop the references: memory is freed)
    _reset(job.device)
    status = f"unchecked; stop: {stop}"
    print(f"train_step {config:15} max batch {best} ({stop})", flush=True)
    d = job.dims(cap=cap) | {"B": best}
    rows = [job.row(config, case=mcase, metric="max_batch", unit="images", p50=best, dims=d, correct=status)]
    if best_ms is not None:
        rows.append(
            job.row(
                config,
                case=mcase,
                metric="images_per_s",
                unit="images/s",
                p50=_ips(best, best_ms),
                dims=d,
                correct=status,
            )
        )
    if best_peak is not None:
        rows.append(job.row(config, case=mcase, metric="peak_mb", unit="MiB", p50=best_peak, dims=d, correct=status))
    return rows


def run(
    *,
    out: Path,
    preset: str,
    batch: int,
    configs: Sequence[str],
    device: torch.device,
    steps: int,
    warmup: int,
    autocast: str,
    max_batch: bool,
    max_batch_cap: int,
    max_batch_budget_s: float,
    budget_s: float | None = None,
    step_fn: StepFn | str | None = None,
    micro_batch: int | None = None,
    flop_budget: bool = True,
) -> Path:
    """Phase 1: throughput of every config (eager first: its loss is the sanity reference). Phase 2: the max-batch
    searches, uncompiled configs first (compiled ones recompile at every size, and a stage cut short should lose
    the least). Rows are merged into ``out/bench.csv`` after every config."""
    for c in configs:
        if c not in CONFIGS:
            raise ValueError(f"unknown config {c!r}; choose from {list(CONFIGS)}")
    if autocast not in AUTOCAST:
        raise ValueError(f"unknown autocast {autocast!r}; choose from {list(AUTOCAST)}")
    job = Job(
        step_fn=load_train_step() if step_fn is None else step_fn,
        preset=preset,
        batch=batch,
        device=device,
        autocast=autocast,
        env=common.env_info(device),
        micro_batch=micro_batch,
    )
    csv_path = Path(out) / "bench.csv"
    budget = common.Budget(budget_s)
    print(
        f"# bench_model {preset} B={batch} autocast={autocast} on {job.env['gpu']} commit {job.env['git_sha']} "
        f"-> {csv_path}",
        flush=True,
    )
    if flop_budget:
        bud = step_budget(preset, batch, make_batch(job.cfg, batch, torch.device("cpu"))["texts"])
        print(
            format_budget(
                bud,
                batch,
                f"counted budget of one step at B={batch} (fwd+bwd, fp32, eager ops; "
                f"FLOPs: FlopCounterMode, bytes: unfused op inputs+outputs)",
            ),
            flush=True,
        )
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "budget.json").write_text(
            json.dumps({"preset": preset, "batch": batch, "commit": job.env["git_sha"], "parts": bud}, indent=2)
        )
    ref_loss, ran = None, {}
    for c in sorted(configs, key=lambda c: c != "eager"):
        if budget.exhausted():
            print(f"# time budget exhausted: {c} skipped", flush=True)
            continue
        rows, loss = bench_config(job, c, steps=steps, warmup=warmup, ref_loss=ref_loss)
        if c == "eager" and loss is not None:
            ref_loss = loss
        ran[c] = True if loss is not None else rows[-1]["correct"]
        common.write_rows(csv_path, rows)
    if max_batch:
        for c in sorted(configs, key=lambda c: (CONFIGS[c][1], c != "eager")):
            if budget.exhausted():
                print(f"# time budget exhausted: max-batch search of {c} skipped", flush=True)
                continue
            per = min(max_batch_budget_s, budget.left())
            common.write_rows(
                csv_path, max_batch_config(job, c, cap=max_batch_cap, budget_s=per, start_ok=ran.get(c, "skipped"))
            )
    print(f"# done in {budget.elapsed():.1f} s", flush=True)
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (bench.csv is merged there)")
    p.add_argument("--preset", default="groupvit-s")
    p.add_argument("--batch", type=int, default=256, help="per-GPU batch (the recipe's 256)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="run the towers this many samples at a time (train.gradcache; contrastive batch = --batch)",
    )
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (compilation happens here)")
    p.add_argument("--autocast", default="bf16", choices=list(AUTOCAST))
    p.add_argument("--no-max-batch", action="store_true")
    p.add_argument("--max-batch-cap", type=int, default=8192)
    p.add_argument("--max-batch-budget-s", type=float, default=60.0, help="time budget of each config's search")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new configs after this many seconds")
    p.add_argument("--quick", action="store_true", help="2 warm-up and 3 timed steps")
    p.add_argument("--device", default=None)
    p.add_argument("--no-flop-budget", action="store_true", help="skip the counted FLOP/byte budget (budget.json)")
    a = p.parse_args(argv)
    steps, warmup = (3, 2) if a.quick else (a.steps, a.warmup)
    try:
        run(
            out=a.out,
            preset=a.preset,
            batch=a.batch,
            configs=[c for c in a.configs.split(",") if c],
            device=common.pick_device(a.device),
            steps=steps,
            warmup=warmup,
            autocast=a.autocast,
            max_batch=not a.no_max_batch,
            max_batch_cap=a.max_batch_cap,
            max_batch_budget_s=a.max_batch_budget_s,
            budget_s=a.budget_s,
            micro_batch=a.micro_batch,
            flop_budget=not a.no_flop_budget,
        )
    except KeyboardInterrupt:
        print("# interrupted; partial results kept", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
