"""Op-level benchmarks: every registry op x case x provider x mode, correctness first, then time and memory.

    python -m bench.bench_ops --out DIR [--ops assign_attention contrastive_loss attention] [--tags model]
                              [--dtypes bf16,fp32] [--providers eager,compile,triton] [--quick] [--budget-s 180]

Providers: ``eager`` (the reference in kernels/reference.py), ``compile`` (``torch.compile`` of it), ``triton``
(our kernel, imported lazily through ``OpSpec.triton_fn``); for ``contrastive_loss`` also ``inf_cl`` (Inf-CL,
``pip install --no-deps inf-cl==1.2.1``, CUDA only, K = 1); for ``attention`` also ``sdpa`` and ``xformers``
(where installed). A provider that cannot load gets an ``unavailable`` row instead of stopping the run.

Modes (docs/kernels.md §7): ``fwd``; ``bwd`` (forward built once, ``y.backward(g, retain_graph=True)`` timed;
``compile`` therefore runs with AOTAutograd's donated buffers off); ``fwd_bwd``. Metrics per (op, case, provider,
mode, dtype): ``ms``, ``peak_mb`` (allocator peak above the pre-op allocation, CUDA only), ``gbps`` or ``tflops``
from the registry's byte/FLOP model, and ``pct_floor``
(assign_attention: GB/s vs 3.0 TB/s; contrastive_loss and attention: TFLOP/s vs 790). For contrastive_loss a
``max_batch`` search per provider doubles B until OOM, a cap or its time budget.

Correctness (column ``correct``): the provider's output and input gradients against the reference evaluated in
fp64 on the same inputs, allowed 2x the same-dtype eager error + atol (tests/helpers.py rule). ``pass``,
``fail: ...``, ``unchecked: ...`` (reference did not fit), ``oom``, ``error: ...``, ``unavailable: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from bench import common
from kernels import reference
from kernels.registry import OPS, Case, OpSpec
from kernels.tolerance import ATOL
from kernels.utils import triton_can_launch

MODES: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")
PROVIDERS: dict[str, tuple[str, ...]] = {
    "assign_attention": ("eager", "compile", "triton"),
    "contrastive_loss": ("eager", "compile", "triton", "inf_cl"),
    "attention": ("eager", "compile", "sdpa", "xformers"),
}
# Which byte/FLOP model gives the floor of each op (docs/kernels.md §4, §7).
FLOOR: dict[str, tuple[str, str, float]] = {  # op -> (metric, unit, floor in that unit)
    "assign_attention": ("gbps", "GB/s", common.HBM_GBPS),
    "contrastive_loss": ("tflops", "TFLOP/s", common.DENSE_TFLOPS),
    "attention": ("tflops", "TFLOP/s", common.DENSE_TFLOPS),
}
# Hard assignment is discontinuous at argmax near-ties: a flipped token moves two output rows. Allow that share.
MISMATCH_SHARE = {"assign_attention": 1e-3}
CSV_NAME = "bench.csv"

Provider = Callable[..., Tensor]


def _short(e: BaseException) -> str:
    """One-line, bounded description of an exception for the ``correct`` column."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:160]


# ---- providers ----------------------------------------------------------------------------------------------------


@functools.cache
def _compiled(op: str) -> Provider:
    # AOTAutograd's donated buffers (on by default) forbid backward(retain_graph=True), which the bwd mode needs.
    # A long run compiles one graph per shape family and dtype; a low recompile limit would fall back to eager
    # silently and the rows would time eager under the name "compile".
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(OPS[op].reference)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _xformers(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    from groupvit import ops

    with ops.use_attention("xformers"):
        return ops.attention(q, k, v, causal=causal)


def _inf_cl(image: Tensor, text: Tensor, logit_scale: Tensor, *, num_prompts: int = 1) -> Tensor:
    """GroupViT's symmetric loss through Inf-CL (``inf-cl`` 1.2.1, DAMO-NLP-SG/Inf-CLIP; docs/kernels.md §5.1).

    Inf-CL computes one direction per call (row LSE minus the positive logit, fp32, TF32 backward), so the
    symmetric loss is two calls. The scale multiplies the features here: its ``GradientGather`` would call
    ``all_reduce`` in the backward of a single process. Hard single positives only (K = 1)."""
    if num_prompts != 1:
        raise ValueError(f"inf-cl supports one positive per row only; this case has K = {num_prompts}")
    d = image.shape[1]
    head = min(d, 256)
    if head not in (16, 32, 64, 128, 256) or d % head:
        raise ValueError(f"inf-cl needs D = 16, 32, 64, 128 or a multiple of 256; got D = {d}")
    from inf_cl import cal_inf_loss

    s = reference.clamped_scale(logit_scale.float())
    img, txt = image.float(), text.float()
    return 0.5 * (cal_inf_loss(s * img, txt, head_dim=head) + cal_inf_loss(s * txt, img, head_dim=head))


def load_provider(spec: OpSpec, name: str, device: torch.device) -> Provider | str:
    """The callable for ``name``, or a string saying why it is unavailable here."""
    if name == "eager":
        return spec.reference
    if name == "compile":
        return _compiled(spec.name)
    if name == "triton":
        if not triton_can_launch(device):
            return "unavailable: Triton kernels need CUDA or TRITON_INTERPRET=1"
        try:
            return spec.triton_fn()
        except Exception as e:  # module not written yet, triton broken, ...
            return f"unavailable: {type(e).__name__}: {e}"
    if name == "sdpa":
        return _sdpa
    if name == "xformers":
        from groupvit import ops

        if device.type != "cuda" or not ops._xformers_ok():
            return "unavailable: xformers with CUDA not installed"
        return _xformers
    if name == "inf_cl":
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            return "unavailable: inf-cl not installed (pip install --no-deps inf-cl==1.2.1)"
        if device.type != "cuda":
            return "unavailable: inf-cl needs CUDA (inline PTX; no Triton interpreter)"
        return _inf_cl
    raise ValueError(f"{spec.name}: unknown provider {name!r}; known: {PROVIDERS[spec.name]}")


# ---- inputs and one call ------------------------------------------------------------------------------------------


def _inputs(
    spec: OpSpec, case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[list[Tensor], dict[str, Any], list[Tensor]]:
    """Fresh leaf inputs; the ones in ``spec.grad_inputs`` require grad. Returns (args, kwargs, grad leaves)."""
    args, kw = spec.make_inputs(case, dtype, device, seed)
    args = [a.detach().clone() for a in args]
    leaves = []
    for i in spec.grad_inputs:
        args[i].requires_grad_(True)
        leaves.append(args[i])
    return args, kw, leaves


def _upstream(y: Tensor, like: torch.dtype | None = None, seed: int = 1) -> Tensor:
    """Upstream gradient dY: ones for a scalar loss, fixed-seed normal otherwise, rounded through ``like`` (the
    benchmark dtype) so that the fp64 reference sees exactly the low-precision run's dY."""
    if y.dim() == 0:
        return torch.ones_like(y)
    g = torch.Generator(device=y.device).manual_seed(seed)
    g = torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float32)
    return g.to(like or y.dtype).to(y.dtype)


def _forward_backward(
    fn: Provider, args: Sequence[Tensor], kw: dict[str, Any], leaves: Sequence[Tensor], like: torch.dtype | None = None
) -> list[Tensor]:
    """Output followed by the gradients of ``leaves`` (all detached)."""
    y = fn(*args, **kw)
    if not leaves:
        return [y.detach()]
    grads = torch.autograd.grad(y, leaves, _upstream(y, like), allow_unused=True)
    return [y.detach()] + [torch.zeros_like(l) if g is None else g.detach() for g, l in zip(grads, leaves)]


@dataclasses.dataclass
class Reference:
    """fp64 reference outputs/gradients and the same-dtype eager error per tensor (the tolerance baseline)."""

    ref64: list[Tensor]
    base_err: list[float]


def reference_for(spec: OpSpec, case: Case, dtype: torch.dtype, device: torch.device) -> Reference | str:
    """Evaluate the reference in fp64 and in ``dtype`` on the same inputs; a string if that is impossible."""
    result: Reference | str
    failed = False
    try:
        args, kw, leaves = _inputs(spec, case, dtype, device)
        low = _forward_backward(spec.reference, args, kw, leaves)
        args64 = [a.detach().to(torch.float64) if a.is_floating_point() else a for a in args]
        for i in spec.grad_inputs:
            args64[i].requires_grad_(True)
        ref64 = _forward_backward(spec.reference, args64, kw, [args64[i] for i in spec.grad_inputs], like=dtype)
        base = [(lo.double() - r).abs().max().item() if r.numel() else 0.0 for lo, r in zip(low, ref64)]
        result = Reference(ref64, base)
    except Exception as e:
        failed = True
        result = (
            "unchecked: reference out of memory" if common.is_oom(e) else f"unchecked: reference failed: {_short(e)}"
        )
    args = args64 = low = leaves = None  # noqa: F841  (drop references before freeing)
    common.free_memory(device, failed)
    return result


def check(spec: OpSpec, out: Sequence[Tensor], ref: Reference, dtype: torch.dtype) -> str:
    """``pass`` if every tensor is within 2x the same-dtype eager error + atol of the fp64 reference (a share
    :data:`MISMATCH_SHARE` of elements may miss for discontinuous ops), else ``fail: <first bad tensor>``."""
    names = ["out"] + [f"grad{i}" for i in spec.grad_inputs]
    share = MISMATCH_SHARE.get(spec.name, 0.0)
    atol = ATOL[dtype]
    notes = []
    for name, o, r, base in zip(names, out, ref.ref64, ref.base_err):
        if o.shape != r.shape:
            return f"fail: {name} shape {tuple(o.shape)} != {tuple(r.shape)}"
        tol = 2.0 * base + atol
        err = (o.double() - r).abs()
        bad = int((~(err <= tol)).sum())  # NaN counts as bad
        if bad > share * err.numel():
            worst = torch.nan_to_num(err, nan=math.inf).max().item()
            return f"fail: {name} {bad}/{err.numel()} off by > {tol:.3g} (worst {worst:.3g})"
        if bad:
            notes.append(f"{name} {bad} near-tie flips")
    return "pass" + (f" ({'; '.join(notes)})" if notes else "")


def _runner(fn: Provider, args: list[Tensor], kw: dict[str, Any], leaves: list[Tensor], mode: str) -> Callable[[], Any]:
    """The callable that is timed for ``mode`` (bwd builds the forward graph once and retains it)."""
    if mode == "fwd":
        return lambda: fn(*args, **kw)
    if not leaves:
        raise ValueError(f"mode {mode!r} needs inputs that take gradients")
    if mode == "bwd":
        y = fn(*args, **kw)
        g = _upstream(y)
        return lambda: y.backward(g, retain_graph=True)
    if mode == "fwd_bwd":
        g = _upstream(fn(*args, **kw))  # built once, outside the timed region

        def step() -> None:
            fn(*args, **kw).backward(g)

        return step
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


# ---- one (op, case, dtype, provider) ------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    device: torch.device
    warmup_ms: float = 25
    rep_ms: float = 100
    modes: tuple[str, ...] = MODES
    dtype_label: Callable[[torch.dtype], str] = lambda d: common.DTYPE_NAMES.get(d, str(d))
    floors: dict[str, tuple[str, str, float]] = dataclasses.field(default_factory=lambda: dict(FLOOR))


def bench_provider(
    spec: OpSpec,
    case: Case,
    dtype: torch.dtype,
    provider: str,
    fn: Provider | str,
    ref: Reference | str | None,
    st: Settings,
    env: dict[str, str],
) -> list[dict[str, str]]:
    """Rows for one provider on one case: correctness once, then ms / peak / throughput / % floor per mode."""
    dlabel = st.dtype_label(dtype)
    dims = {**case.dims, **case.kwargs}
    modes = [m for m in st.modes if m == "fwd" or spec.grad_inputs]
    row = functools.partial(
        common.make_row, env, op=spec.name, case=case.name, provider=provider, dtype=dlabel, dims=dims
    )
    if isinstance(fn, str):
        _print(spec.name, case.name, dlabel, provider, "all", None, None, None, fn)
        return [row(mode=m, metric="ms", unit="ms", p50=None, correct=fn) for m in modes]

    # correctness first
    status, failed = "pass", False
    try:
        args, kw, leaves = _inputs(spec, case, dtype, st.device)
        out = _forward_backward(fn, args, kw, leaves, like=dtype)
        status = ref if isinstance(ref, str) else check(spec, out, ref, dtype) if ref is not None else "unchecked"
    except Exception as e:
        status, failed = ("oom" if common.is_oom(e) else f"error: {_short(e)}"), True
    out = args = leaves = None
    common.free_memory(st.device, failed)
    if failed:
        _print(spec.name, case.name, dlabel, provider, "all", None, None, None, status)
        return [row(mode=m, metric="ms", unit="ms", p50=None, correct=status) for m in modes]

    rows = []
    metric, unit, floor = st.floors[spec.name]
    es = torch.empty((), dtype=dtype).element_size()
    for mode in modes:
        err: str | None = None
        try:
            args, kw, leaves = _inputs(spec, case, dtype, st.device)
            run = _runner(fn, args, kw, leaves, mode)
            t = common.time_fn(run, st.device, warmup=st.warmup_ms, rep=st.rep_ms, grad_to_none=leaves)
            for l in leaves:
                l.grad = None
            peak = common.peak_memory_mb(run, st.device)
        except Exception as e:
            err = "oom" if common.is_oom(e) else f"error: {_short(e)}"
        args = leaves = run = None
        common.free_memory(st.device, err is not None)
        if err is not None:
            _print(spec.name, case.name, dlabel, provider, mode, None, None, None, err)
            rows.append(row(mode=mode, metric="ms", unit="ms", p50=None, correct=err))
            continue
        work = spec.bytes(case.dims, mode, es) / 1e9 if metric == "gbps" else spec.flops(case.dims, mode) / 1e12
        rate = lambda ms: work / (ms * 1e-3) if ms > 0 else math.nan  # noqa: E731  GB/s or TFLOP/s
        rows += [
            row(mode=mode, metric="ms", unit="ms", p50=t.p50, p20=t.p20, p80=t.p80, correct=status),
            row(mode=mode, metric=metric, unit=unit, p50=rate(t.p50), p20=rate(t.p80), p80=rate(t.p20), correct=status),
            row(
                mode=mode,
                metric="pct_floor",
                unit=f"% of {floor:g} {unit}",
                p50=100 * rate(t.p50) / floor,
                correct=status,
            ),
        ]
        if peak is not None:
            rows.append(row(mode=mode, metric="peak_mb", unit="MiB", p50=peak, correct=status))
        _print(
            spec.name,
            case.name,
            dlabel,
            provider,
            mode,
            t,
            f"{rate(t.p50):.4g} {unit}",
            100 * rate(t.p50) / floor,
            status,
            peak,
        )
    return rows


def _print(
    op: str,
    case: str,
    dtype: str,
    provider: str,
    mode: str,
    t: common.Timing | None,
    rate: str | None,
    pct: float | None,
    status: str,
    peak: float | None = None,
) -> None:
    timing = f"{t.p50:9.4f} ms [{t.p20:.4f}-{t.p80:.4f}]" if t else f"{'-':>9}"
    extra = f"{rate:>16} {pct:6.1f}% floor" if rate is not None and pct is not None else ""
    mem = f" peak {peak:9.1f} MiB" if peak is not None else ""
    print(f"{op:17} {case:18} {dtype:5} {provider:9} {mode:8} {timing} {extra}{mem}  {status}", flush=True)


# ---- contrastive: largest batch that fits -------------------------------------------------------------------------


def max_batch_search(
    spec: OpSpec,
    base: Case,
    provider: str,
    fn: Provider | str,
    dtype: torch.dtype,
    st: Settings,
    env: dict[str, str],
    *,
    start: int,
    cap: int,
    budget_s: float,
) -> list[dict[str, str]]:
    """Double B from ``start`` (one fwd+bwd per size, after one warm-up at ``start``) until OOM, ``cap`` or the
    time budget (stops when the next size, predicted 4x slower, would not fit in what is left)."""
    dlabel = st.dtype_label(dtype)
    name = f"max-batch-{base.name.split('-', 1)[-1]}"  # e.g. max-batch-k1
    dims = {k: v for k, v in base.dims.items() if k != "B"}
    row = functools.partial(
        common.make_row,
        env,
        op=spec.name,
        case=name,
        provider=provider,
        mode="fwd_bwd",
        dtype=dlabel,
        dims={**dims, "start": start, "cap": cap},
    )
    if isinstance(fn, str):
        return [row(metric="max_batch", unit="rows", p50=None, correct=fn)]
    budget = common.Budget(budget_s)
    best, best_peak, b, stop, step_s = None, None, start, f"cap {cap}", 0.0
    while b <= cap:
        if best is not None and 4.2 * step_s > budget.left():
            stop = f"time budget at B={b}"
            break
        err = None
        try:
            case = dataclasses.replace(base, name=f"{name}-b{b}", dims={**base.dims, "B": b})
            args, kw, leaves = _inputs(spec, case, dtype, st.device)
            run = _runner(fn, args, kw, leaves, "fwd_bwd")
            if best is None:
                run()  # warm-up: compilation / autotuning stay out of the prediction
            if st.device.type == "cuda":
                torch.cuda.synchronize(st.device)
            t0 = time.perf_counter()
            peak = common.peak_memory_mb(run, st.device) if st.device.type == "cuda" else (run(), None)[1]
            step_s = time.perf_counter() - t0
        except Exception as e:
            if not common.is_oom(e):
                err = f"error at B={b}: {_short(e)}"
            else:
                err = f"oom at B={b}"
        args = leaves = run = None
        common.free_memory(st.device, err is not None)
        if err is not None:
            stop = err
            break
        best, best_peak = b, peak
        b *= 2
    status = f"unchecked; stop: {stop}"
    print(f"{spec.name:17} {name:18} {dlabel:5} {provider:9} max batch {best} ({stop})", flush=True)
    rows = [row(metric="max_batch", unit="rows", p50=best, correct=status)]
    if best_peak is not None:
        rows.append(row(metric="peak_mb", unit="MiB", p50=best_peak, correct=status))
    return rows


# ---- driver -------------------------------------------------------------------------------------------------------


def run(
    *,
    out: Path,
    ops: Sequence[str],
    tags: Sequence[str],
    dtypes: Sequence[torch.dtype],
    providers: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    st: Settings,
    budget_s: float | None = None,
    max_batch: bool = True,
    max_batch_start: int = 4096,
    max_batch_cap: int = 1 << 21,
    max_batch_budget_s: float = 30.0,
    max_batch_ks: Sequence[int] = (1,),
    specs: dict[str, OpSpec] | None = None,
) -> Path:
    """Run the benchmarks and merge the rows into ``out/bench.csv`` (written after every provider)."""
    specs = specs or OPS
    for op in ops:
        if op not in specs:
            raise ValueError(f"unknown op {op!r}; known: {sorted(specs)}")
    csv_path = Path(out) / CSV_NAME
    env = common.env_info(st.device)
    budget = common.Budget(budget_s)
    print(
        f"# bench_ops on {env['gpu']} torch {env['torch']} triton {env['triton']} commit {env['git_sha']} "
        f"-> {csv_path}",
        flush=True,
    )
    skipped = 0
    for dtype in dtypes:
        loaded: dict[str, dict[str, Provider | str]] = {}
        for op in ops:
            spec = specs[op]
            names = [p for p in PROVIDERS.get(op, ("eager",)) if providers is None or p in providers]
            fns = loaded[op] = {p: load_provider(spec, p, st.device) for p in names}
            for case in [c for c in spec.select(*tags) if cases is None or c.name in cases]:
                if budget.exhausted():
                    skipped += 1
                    continue
                ref = reference_for(spec, case, dtype, st.device)
                for p in names:
                    common.write_rows(csv_path, bench_provider(spec, case, dtype, p, fns[p], ref, st, env))
                ref = None
        if max_batch and "contrastive_loss" in loaded:  # after every op's cases: a short budget cuts this first
            spec = specs["contrastive_loss"]
            base_cases = [
                c for c in spec.cases if c.dims.get("B") == max_batch_start and c.dims.get("K", 1) in max_batch_ks
            ]
            if not base_cases:
                print(
                    f"# max-batch search skipped: no contrastive_loss case with B={max_batch_start}, K in "
                    f"{tuple(max_batch_ks)} in the registry",
                    flush=True,
                )
            for base in base_cases:
                for p, fn in loaded["contrastive_loss"].items():
                    if budget.exhausted():
                        skipped += 1
                        continue
                    common.write_rows(
                        csv_path,
                        max_batch_search(
                            spec,
                            base,
                            p,
                            fn,
                            dtype,
                            st,
                            env,
                            start=max_batch_start,
                            cap=max_batch_cap,
                            budget_s=min(max_batch_budget_s, budget.left()),
                        ),
                    )
    if skipped:
        print(f"# time budget of {budget_s:g} s exhausted: {skipped} case(s) skipped", flush=True)
    print(f"# done in {budget.elapsed():.1f} s", flush=True)
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output directory (bench.csv is merged there)")
    p.add_argument("--ops", nargs="+", default=list(OPS), help=f"ops (default all: {' '.join(OPS)})")
    p.add_argument("--tags", default="model", help="registry case tags, comma-separated (smoke, model, sweep)")
    p.add_argument("--cases", default=None, help="only these case names, comma-separated")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    p.add_argument(
        "--providers", default=None, help="comma-separated subset of eager,compile,triton,inf_cl,sdpa,xformers"
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fwd,bwd,fwd_bwd")
    p.add_argument(
        "--quick", action="store_true", help="short timing (warm-up 5 ms, 20 ms of repeats) and a tiny max-batch search"
    )
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    p.add_argument("--no-max-batch", action="store_true", help="skip the contrastive max-batch search")
    p.add_argument("--max-batch-budget-s", type=float, default=30.0, help="time budget per provider of the search")
    p.add_argument(
        "--max-batch-start",
        type=int,
        default=None,
        help="first B of the search (a registry contrastive case with this B supplies D and K; "
        "default 4096, --quick on CPU: 5)",
    )
    p.add_argument("--max-batch-cap", type=int, default=None, help="largest B tried (default 2^21; quick CPU 20)")
    p.add_argument("--max-batch-k", default="1", help="prompts per image K of the searches, comma-separated")
    p.add_argument(
        "--ceilings",
        type=Path,
        default=None,
        help="verdict.csv of this device (python -m bench.verdict): %% of its measured copy GB/s and "
        "GEMM TFLOP/s instead of the H100 constants",
    )
    p.add_argument("--tf32", action="store_true", help="fp32 matmuls in TF32 for every provider (rows say tf32)")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    a = p.parse_args(argv)

    device = common.pick_device(a.device)
    dtypes = common.parse_dtypes(a.dtypes)
    modes = tuple(m for m in a.modes.split(",") if m)
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    label = lambda d: common.DTYPE_NAMES.get(d, str(d))  # noqa: E731
    if a.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        label = lambda d: "tf32" if d == torch.float32 else common.DTYPE_NAMES.get(d, str(d))  # noqa: E731
    quick_cpu = a.quick and device.type != "cuda"
    warmup_ms, rep_ms = ((1, 1) if quick_cpu else (5, 20)) if a.quick else (25, 100)
    st = Settings(device=device, modes=modes, dtype_label=label, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if a.ceilings:  # this device's measured ceilings replace the constants
        ceil = common.read_ceilings(a.ceilings)
        st.floors = {op: (m, u, ceil.copy_gbps if m == "gbps" else ceil.gemm_tflops) for op, (m, u, _) in FLOOR.items()}
    start = a.max_batch_start or (5 if quick_cpu else 4096)
    cap = a.max_batch_cap or (20 if quick_cpu else 1 << 21)
    mb_budget = min(a.max_batch_budget_s, 10.0) if a.quick else a.max_batch_budget_s
    try:
        run(
            out=a.out,
            ops=a.ops,
            tags=[t for t in a.tags.split(",") if t],
            dtypes=dtypes,
            providers=a.providers.split(",") if a.providers else None,
            cases=a.cases.split(",") if a.cases else None,
            st=st,
            budget_s=a.budget_s,
            max_batch=not a.no_max_batch,
            max_batch_start=start,
            max_batch_cap=cap,
            max_batch_budget_s=mb_budget,
            max_batch_ks=[int(k) for k in a.max_batch_k.split(",") if k],
        )
    except KeyboardInterrupt:  # `timeout -s INT`: rows written so far are already in the CSV
        print("# interrupted; partial results kept", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
