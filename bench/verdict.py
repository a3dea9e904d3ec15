"""The one-call GPU verdict: this device's ceilings, parity at the headline shapes, triton vs eager vs compile.

    python -m bench.verdict                      # on a CUDA machine: writes bench/results/verdict-<device>/
    python -m bench.verdict --dry-run            # CPU, tiny shapes, Triton interpreter: seconds (CI runs it)
                           [--out DIR] [--budget-s 170] [--providers triton,eager,compile]

One process, in order of value, each phase cut short by ``--budget-s`` (``timeout -s INT`` also stops it cleanly;
``verdict.csv`` and ``verdict.md`` are rewritten after every phase, so a cut run keeps what it measured):

1. **Ceilings of this device**: device-to-device copy (GB/s, bytes read + written) and a bf16 GEMM (TFLOP/s), so
   every "% of ceiling" is against the machine at hand, not a datasheet.
2. **Parity** (bf16) at the registry's ``headline`` cases (assign attention stage 1 and 2 in eval and train mode,
   contrastive loss B = 32768, K = 1 and 3): output and every input gradient of the Triton kernel against the fp64
   reference, with the project's rule (:mod:`kernels.tolerance`). Train mode runs the kernel's own in-kernel noise;
   the reference gets the same noise materialised (``gumbel_noise(draw_seed())``, the kernel's contract).
3. **Timings** (``triton.testing.do_bench`` medians with 20/80 percentiles, CUDA events) and peak memory of
   ``triton`` and ``eager``, then ``compile`` (``torch.compile`` of the eager reference; compiling is slow, so it
   comes last and is the first thing a short budget cuts).

Exit status: 0 when every parity check that ran passed, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# The interpreter mode is read when kernel modules are first imported (kernels.utils, via bench_ops below): a dry
# run must set it before those imports, not in main().
if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bench import bench_ops, common  # noqa: E402
from bench.common import Ceilings, read_ceilings  # noqa: E402, F401 (read_ceilings: read back what this CLI wrote)
from kernels.registry import OPS, Case, OpSpec  # noqa: E402

DTYPE = torch.bfloat16
PARITY_SEED, NOISE_SEED = 0, 1234
KEEP_MIN = 0.9  # hard assignment: at least this share of images must have no near-tie (else the check is moot)
CSV_NAME, MD_NAME = "verdict.csv", "verdict.md"
PROVIDERS = ("triton", "eager", "compile")  # timing order: a short budget cuts compile first, then eager
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: each item is built once per run
class Item:
    """One headline check: an op's registry case in one mode (assign: ``eval`` / ``train``; contrastive: ``train``)."""

    spec: OpSpec
    case: Case
    mode: str

    @property
    def kwargs(self) -> dict[str, Any]:
        kw = dict(self.case.kwargs)
        if self.spec.name == "assign_attention" and self.mode == "train":
            kw["gumbel"] = True
        return kw

    @property
    def timed_modes(self) -> tuple[str, ...]:
        return ("fwd",) if self.mode == "eval" else ("fwd", "fwd_bwd")

    @property
    def label(self) -> str:
        return f"{self.spec.name} {self.case.name} {self.mode}"


def headline_items(dry: bool) -> list[Item]:
    """The registry's ``headline`` cases (dry run: the first ``smoke`` case of the same ops)."""
    items = []
    for name in ("assign_attention", "contrastive_loss"):
        spec = OPS[name]
        cases = spec.select("smoke")[:1] if dry else spec.select("headline")
        modes = ("eval", "train") if name == "assign_attention" else ("train",)
        items += [Item(spec, c, m) for c in cases for m in modes]
    return items


# ---- 1. ceilings --------------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, dry: bool, timing: dict[str, float]) -> tuple[Ceilings, list[dict]]:
    """Copy bandwidth (1 GiB, dry 4 MiB) and bf16 GEMM throughput (8192^3, dry 256^3) of ``device``."""
    c, rows = Ceilings(), []
    n = (4 << 20) if dry else (1 << 30)
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = common.time_fn(lambda: y.copy_(x), device, **timing)
    c.copy_gbps = 2 * n / 1e9 / (t.p50 * 1e-3)
    rows.append(
        dict(
            op="device",
            case=f"copy-{n >> 20}MiB",
            mode="copy",
            metric="gbps",
            unit="GB/s",
            p50=c.copy_gbps,
            p20=2 * n / 1e9 / (t.p80 * 1e-3),
            p80=2 * n / 1e9 / (t.p20 * 1e-3),
            dims=dict(bytes=n),
        )
    )
    x = y = None  # free the copy buffers before the GEMM
    m = 256 if dry else 8192
    a = torch.randn(m, m, device=device).to(torch.bfloat16)
    b = torch.randn(m, m, device=device).to(torch.bfloat16)
    t = common.time_fn(lambda: a @ b, device, **timing)
    flop = 2.0 * m**3 / 1e12
    c.gemm_tflops = flop / (t.p50 * 1e-3)
    rows.append(
        dict(
            op="device",
            case=f"gemm-bf16-{m}",
            mode="matmul",
            metric="tflops",
            unit="TFLOP/s",
            p50=c.gemm_tflops,
            p20=flop / (t.p80 * 1e-3),
            p80=flop / (t.p20 * 1e-3),
            dims=dict(M=m, N=m, K=m),
        )
    )
    return c, rows


# ---- 2. parity ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ParityResult:
    item: Item
    status: str  # pass / fail: ... / error: ...
    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> kernels.tolerance.Parity
    kept: float | None = None  # share of images compared (assignment attention's hard argmax only)


def _atol(ref: Tensor) -> float:
    """The dtype floor scaled by ``min(1, max|ref|)``: as absolute as the tests for O(1) tensors, and not a free
    pass for gradients whose entries are far below the floor (contrastive gradients are ~1/B)."""
    from kernels.tolerance import ATOL

    return ATOL[DTYPE] * min(1.0, ref.detach().abs().max().item() if ref.numel() else 1.0)


def _grads(
    fn: Callable[..., Tensor], args: Sequence[Tensor], kw: dict[str, Any], upstream: Tensor | None
) -> list[Tensor]:
    """Output and the gradients of every input, on fresh leaf copies."""
    xs = [a.detach().clone().requires_grad_(True) for a in args]
    y = fn(*xs, **kw)
    gs = torch.autograd.grad(y, xs, torch.ones_like(y) if upstream is None else upstream.to(y.dtype))
    return [y.detach(), *(g.detach() for g in gs)]


def _assign_parity(item: Item, device: torch.device) -> ParityResult:
    from kernels import assign_attention as aa
    from kernels import reference
    from kernels.tolerance import ARGMAX_MARGIN, top2_margin

    (q, k, v), kw = item.spec.make_inputs(item.case, DTYPE, device, PARITY_SEED)
    gen = torch.Generator(device=device).manual_seed(PARITY_SEED + 1)
    dout = torch.randn(q.shape, generator=gen, device=device).to(DTYPE)
    kw = item.kwargs
    ref_kw = dict(kw)
    noise = None
    if kw.get("gumbel"):  # the kernel draws its own noise; the reference gets the same noise materialised
        torch.manual_seed(NOISE_SEED)
        noise = aa.gumbel_noise(aa.draw_seed(device), 0, (q.shape[0], q.shape[1], k.shape[1]), device)
        ref_kw["noise"] = noise
        torch.manual_seed(NOISE_SEED)
    out = _grads(aa.assign_attention, (q, k, v), kw, dout)
    eager = _grads(reference.assign_attention, (q, k, v), ref_kw, dout)
    ref = _grads(reference.assign_attention, (q.double(), k.double(), v.double()), ref_kw, dout.double())
    keep = torch.ones(q.shape[0], dtype=torch.bool, device=device)
    if kw.get("hard", True):  # images with an argmax near-tie may legitimately flip: compare the others
        keep = top2_margin(q, k, noise, kw.get("scale")).amin(1) > ARGMAX_MARGIN
    res = ParityResult(item, "pass", kept=keep.float().mean().item())
    return _judge(
        res, ("out", "dq", "dk", "dv"), [t[keep] for t in out], [t[keep] for t in eager], [t[keep] for t in ref]
    )


def _contrastive_parity(item: Item, device: torch.device) -> ParityResult:
    from kernels import contrastive_loss as cl
    from kernels import reference

    (img, txt, theta), kw = item.spec.make_inputs(item.case, DTYPE, device, PARITY_SEED)
    k = kw.get("num_prompts", 1)
    out = _grads(cl.contrastive_loss, (img, txt, theta), kw, None)
    e = reference.contrastive_loss_chunked(img, txt, theta, k, torch.float32)  # the reference's fp32 math
    eager = [e[0], e[1].to(DTYPE), e[2].to(DTYPE), e[3]]  # ... returning input-dtype feature gradients
    ref = list(reference.contrastive_loss_chunked(img, txt, theta, k, torch.float64))
    return _judge(ParityResult(item, "pass"), ("loss", "d_image", "d_text", "d_theta"), out, eager, ref)


def _judge(
    res: ParityResult, names: Sequence[str], out: Sequence[Tensor], eager: Sequence[Tensor], ref: Sequence[Tensor]
) -> ParityResult:
    from kernels.tolerance import parity

    fails = []
    for name, o, e, r in zip(names, out, eager, ref):
        p = parity(o, e, r, atol=_atol(r))
        res.tensors[name] = p
        if not p.ok:
            fails.append(f"{name}: {p.detail}")
    if res.kept is not None and res.kept < KEEP_MIN:
        fails.insert(0, f"only {100 * res.kept:.1f}% of images without an argmax near-tie (need {100 * KEEP_MIN:g}%)")
    res.status = "pass" if not fails else "fail: " + "; ".join(fails)
    return res


def check_parity(item: Item, device: torch.device) -> ParityResult:
    try:
        fn = _assign_parity if item.spec.name == "assign_attention" else _contrastive_parity
        res = fn(item, device)
    except Exception as e:
        res = ParityResult(item, "oom" if common.is_oom(e) else f"error: {bench_ops._short(e)}")
    common.free_memory(device, not res.status.startswith("pass"))
    return res


# ---- 3. timings ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TimingResult:
    item: Item
    provider: str
    mode: str
    status: str  # ok / oom / error: ... / unavailable: ... / skipped: ...
    t: common.Timing | None = None
    peak_mb: float | None = None


def _provider(item: Item, name: str, device: torch.device, dry: bool) -> Callable[..., Tensor] | str:
    if name == "compile" and dry:
        return "skipped: dry run (torch.compile takes minutes on a CPU)"
    return bench_ops.load_provider(item.spec, name, device)


def time_item(
    item: Item,
    provider: str,
    fn: Callable[..., Tensor] | str,
    mode: str,
    device: torch.device,
    timing: dict[str, float],
) -> TimingResult:
    """``fwd`` (eval: under no_grad) or ``fwd_bwd`` of ``fn`` at the item's case: median ms and peak MiB."""
    if isinstance(fn, str):
        return TimingResult(item, provider, mode, fn)
    err = None
    try:
        args, kw, leaves = bench_ops._inputs(item.spec, item.case, DTYPE, device)
        kw = {**kw, **item.kwargs}
        if item.mode == "eval":
            args, leaves = [a.detach() for a in args], []

            def run() -> Tensor:
                with torch.no_grad():
                    return fn(*args, **kw)
        else:
            run = bench_ops._runner(fn, args, kw, leaves, mode)
        t = common.time_fn(run, device, grad_to_none=leaves, **timing)
        for leaf in leaves:
            leaf.grad = None  # the peak of one call, not of one more accumulation
        peak = common.peak_memory_mb(run, device)
    except Exception as e:
        err = "oom" if common.is_oom(e) else f"error: {bench_ops._short(e)}"
    args = leaves = run = None  # noqa: F841
    common.free_memory(device, err is not None)
    if err:
        return TimingResult(item, provider, mode, err)
    return TimingResult(item, provider, mode, "ok", t, peak)


def pct_ceiling(item: Item, mode: str, ms: float, ceil: Ceilings) -> tuple[float | None, str]:
    """% of this device's measured ceiling: bytes vs copy GB/s (assign), FLOP vs GEMM TFLOP/s (contrastive)."""
    d = item.case.dims
    if item.spec.name == "assign_attention":
        if not ceil.copy_gbps:
            return None, ""
        rate = item.spec.bytes(d, mode, torch.empty((), dtype=DTYPE).element_size()) / 1e9 / (ms * 1e-3)
        return 100 * rate / ceil.copy_gbps, f"% of {ceil.copy_gbps:.4g} GB/s copy"
    if not ceil.gemm_tflops:
        return None, ""
    rate = item.spec.flops(d, mode) / 1e12 / (ms * 1e-3)
    return 100 * rate / ceil.gemm_tflops, f"% of {ceil.gemm_tflops:.4g} TFLOP/s GEMM"


# ---- report -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    env: dict[str, str]
    device_info: str
    dry: bool
    n_items: int = 0
    ceilings: Ceilings = dataclasses.field(default_factory=Ceilings)
    ceiling_rows: list[dict] = dataclasses.field(default_factory=list)
    parity: list[ParityResult] = dataclasses.field(default_factory=list)
    timings: list[TimingResult] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def ok(self) -> bool:
        """Every headline parity check ran and passed."""
        return len(self.parity) == self.n_items and all(p.status == "pass" for p in self.parity)

    def timing(self, item: Item, provider: str, mode: str) -> TimingResult | None:
        for t in self.timings:
            if t.item == item and t.provider == provider and t.mode == mode:
                return t
        return None


def _dims(item: Item) -> dict[str, Any]:
    return {**item.case.dims, **item.kwargs, "verdict_mode": item.mode}


def csv_rows(v: Verdict) -> list[dict[str, str]]:
    dt = common.DTYPE_NAMES[DTYPE]
    rows = [common.make_row(v.env, provider="torch", correct="measured", dtype="bf16", **r) for r in v.ceiling_rows]
    for p in v.parity:
        it = p.item
        for name, t in p.tensors.items():
            rows.append(
                common.make_row(
                    v.env,
                    op=it.spec.name,
                    case=it.case.name,
                    provider="triton",
                    mode=it.mode,
                    metric=f"parity_{name}",
                    unit="worst err / allowed",
                    dtype=dt,
                    p50=t.worst / t.tol if t.tol > 0 else None,
                    dims=_dims(it),
                    correct="pass" if t.ok else "fail",
                )
            )
        rows.append(
            common.make_row(
                v.env,
                op=it.spec.name,
                case=it.case.name,
                provider="triton",
                mode=it.mode,
                metric="parity",
                unit="share of images compared",
                p50=p.kept,
                dtype=dt,
                dims=_dims(it),
                correct=p.status[:300],
            )
        )
    for t in v.timings:
        it, mode = t.item, f"{t.item.mode}-{t.mode}"
        row = dict(
            op=it.spec.name,
            case=it.case.name,
            provider=t.provider,
            mode=mode,
            dtype=dt,
            dims=_dims(it),
            correct=t.status,
        )
        if t.t is None:
            rows.append(common.make_row(v.env, metric="ms", unit="ms", p50=None, **row))
            continue
        rows.append(common.make_row(v.env, metric="ms", unit="ms", p50=t.t.p50, p20=t.t.p20, p80=t.t.p80, **row))
        pct, unit = pct_ceiling(it, t.mode, t.t.p50, v.ceilings)
        if pct is not None:
            rows.append(common.make_row(v.env, metric="pct_ceiling", unit=unit, p50=pct, **row))
        if t.peak_mb is not None:
            rows.append(common.make_row(v.env, metric="peak_mb", unit="MiB", p50=t.peak_mb, **row))
        for other in ("eager", "compile"):
            base = v.timing(it, other, t.mode)
            if t.provider == "triton" and base is not None and base.t is not None:
                rows.append(
                    common.make_row(v.env, metric=f"speedup_vs_{other}", unit="x", p50=base.t.p50 / t.t.p50, **row)
                )
    return rows


def _ms(t: TimingResult | None) -> str:
    if t is None:
        return "not run"
    if t.t is None:
        return t.status.split(":")[0] if not t.status.startswith("unavailable") else "n/a"
    return f"{t.t.p50:.4g}"


def _ratio(a: TimingResult | None, b: TimingResult | None) -> str:
    if a is None or b is None or a.t is None or b.t is None:
        return ""
    return f"{b.t.p50 / a.t.p50:.2f}x"


def render_markdown(v: Verdict) -> str:
    e = v.env
    n_pass = sum(p.status == "pass" for p in v.parity)
    head = "DRY RUN (CPU, tiny shapes, Triton interpreter: plumbing only, no performance meaning)\n\n" if v.dry else ""
    verdict = f"**{'PASS' if v.ok() else 'FAIL'}**: {n_pass}/{v.n_items} parity checks pass" + (
        "" if len(v.parity) == v.n_items else f" ({v.n_items - len(v.parity)} not run)"
    )
    lines = [
        f"# GroupViT Triton verdict: {e['gpu']}",
        "",
        head + verdict,
        "",
        f"{v.device_info}; torch {e['torch']}, triton {e['triton']}; commit {e['git_sha']}; {e['timestamp']}.",
        "",
        "## Ceilings of this device",
        "",
        "| measure | median | 20-80% |",
        "|---|---|---|",
    ]
    for r in v.ceiling_rows:
        lines.append(f"| {r['case']} | {r['p50']:.4g} {r['unit']} | {r['p20']:.4g}-{r['p80']:.4g} |")
    lines += [
        "",
        "## Parity (bf16 vs fp64 reference; allowed = 2 x same-dtype eager error + atol)",
        "",
        "| op | case | mode | verdict | worst/allowed per tensor | images compared |",
        "|---|---|---|---|---|---|",
    ]
    for p in v.parity:
        per = ", ".join(f"{n} {t.worst / t.tol:.2g}" if t.tol > 0 else n for n, t in p.tensors.items())
        status = p.status if len(p.status) < 200 else p.status[:200] + " ..."
        kept = "-" if p.kept is None else f"{100 * p.kept:.1f}%"
        lines.append(f"| {p.item.spec.name} | {p.item.case.name} | {p.item.mode} | {status} | {per} | {kept} |")
    timer = "perf_counter loop (CPU)" if v.dry else "do_bench, CUDA events"
    lines += [
        "",
        f"## Timings (ms, median of {timer}; peak MiB above the inputs)",
        "",
        "| op | case | mode | eager | compile | triton | triton vs eager | triton vs compile | "
        "triton % of ceiling | peak MiB eager / compile / triton |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    items = list(dict.fromkeys(t.item for t in v.timings))
    for it in items:
        for mode in it.timed_modes:
            ea, co, tr = (v.timing(it, p, mode) for p in ("eager", "compile", "triton"))
            pct = ""
            if tr is not None and tr.t is not None:
                val, unit = pct_ceiling(it, mode, tr.t.p50, v.ceilings)
                pct = f"{val:.1f} {unit}" if val is not None else ""
            peaks = " / ".join(
                f"{t.peak_mb:,.0f}" if t is not None and t.peak_mb is not None else "-" for t in (ea, co, tr)
            )
            lines.append(
                f"| {it.spec.name} | {it.case.name} | {it.mode}-{mode} | {_ms(ea)} | {_ms(co)} | {_ms(tr)} "
                f"| {_ratio(tr, ea)} | {_ratio(tr, co)} | {pct} | {peaks} |"
            )
    problems = [t for t in v.timings if t.status not in ("ok",) and not t.status.startswith("skipped")]
    if problems:
        lines += ["", "Timing problems:", ""] + [
            f"* {t.item.label} {t.provider} {t.mode}: {t.status}" for t in problems
        ]
    if v.notes:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in v.notes]
    lines += ["", "Columns: see bench/README.md (verdict section)."]
    return "\n".join(lines) + "\n"


def write(v: Verdict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / CSV_NAME
    if csv_path.exists():
        csv_path.unlink()  # one run, one file: no stale rows of an earlier run
    common.write_rows(csv_path, csv_rows(v))
    tmp = out / (MD_NAME + ".tmp")
    tmp.write_text(render_markdown(v))
    os.replace(tmp, out / MD_NAME)


def device_info(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({os.cpu_count()} cores)"
    p = torch.cuda.get_device_properties(device)
    info = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}"
    try:
        drv = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            .stdout.strip()
            .splitlines()
        )
        if drv:
            info += f", driver {drv[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---- driver -------------------------------------------------------------------------------------------------------


def run(out: Path, *, dry: bool, budget_s: float, providers: Sequence[str] = PROVIDERS) -> Verdict:
    device = torch.device("cpu") if dry else torch.device("cuda")
    timing = dict(warmup=1, rep=1) if dry else dict(warmup=25, rep=100)
    budget = common.Budget(budget_s)
    v = Verdict(common.env_info(device), device_info(device), dry)
    items = headline_items(dry)
    v.n_items = len(items)
    print(f"# verdict on {v.device_info}, commit {v.env['git_sha']}, budget {budget_s:g} s -> {out}", flush=True)

    try:
        v.ceilings, v.ceiling_rows = measure_ceilings(device, dry, timing)
        print(
            f"# ceilings: copy {v.ceilings.copy_gbps:.4g} GB/s, bf16 GEMM {v.ceilings.gemm_tflops:.4g} TFLOP/s",
            flush=True,
        )
    except Exception as e:  # the parity checks matter more: go on without "% of ceiling"
        v.notes.append(f"ceilings not measured: {bench_ops._short(e)}")
        common.free_memory(device)
    write(v, out)

    for it in items:
        if budget.exhausted():
            v.notes.append(f"parity of {it.label} not run: budget of {budget_s:g} s spent")
            continue
        t0 = time.monotonic()
        v.parity.append(check_parity(it, device))
        print(f"parity {it.label:42} {time.monotonic() - t0:6.1f} s  {v.parity[-1].status[:300]}", flush=True)
        write(v, out)

    for prov in [p for p in PROVIDERS if p in providers]:  # whole passes: a short budget cuts compile first
        for it in items:
            fn = _provider(it, prov, device, dry)
            for mode in it.timed_modes:
                if budget.exhausted():
                    v.timings.append(TimingResult(it, prov, mode, f"skipped: budget of {budget_s:g} s spent"))
                    continue
                r = time_item(it, prov, fn, mode, device, timing)
                v.timings.append(r)
                ms = f"{r.t.p50:9.4f} ms" if r.t else f"{'-':>12}"
                peak = f"  peak {r.peak_mb:,.0f} MiB" if r.peak_mb is not None else ""
                print(f"time   {it.label:42} {prov:8} {mode:8} {ms}{peak}  {r.status}", flush=True)
            write(v, out)
    print(f"# verdict: {'PASS' if v.ok() else 'FAIL'} in {budget.elapsed():.1f} s; {out / MD_NAME}", flush=True)
    return v


def default_out(dry: bool) -> Path:
    if dry:
        return Path(tempfile.gettempdir()) / "groupvit_verdict_dry"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
    return ROOT / "bench" / "results" / f"verdict-{slug}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory for verdict.csv and verdict.md (default bench/results/verdict-<device>; "
        "dry run: a temporary directory)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, no torch.compile")
    p.add_argument("--budget-s", type=float, default=170.0, help="stop starting new work after this many seconds")
    p.add_argument(
        "--providers",
        default=",".join(PROVIDERS),
        help="timed providers, comma-separated, timed in this order: triton,eager,compile (empty: none)",
    )
    a = p.parse_args(argv)
    providers = [x for x in a.providers.split(",") if x]
    if bad := sorted(set(providers) - set(PROVIDERS)):
        p.error(f"unknown provider(s) {bad}; choose from {','.join(PROVIDERS)}")
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # a rerun reuses the autotuning results on disk
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are first imported
        if os.environ["TRITON_INTERPRET"] != "1":
            p.error("--dry-run runs the kernels under the Triton interpreter: unset TRITON_INTERPRET or set it to 1")
    elif not torch.cuda.is_available():
        p.error(
            "no CUDA device: the verdict measures a GPU. On a CPU machine run `python -m bench.verdict "
            "--dry-run` (tiny shapes under the Triton interpreter)"
        )
    elif os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 is set: the verdict times compiled kernels; unset it")
    if a.dry_run:
        torch.set_num_threads(1)  # tiny ops: one thread is steadier on a shared CPU
    out = a.out or default_out(a.dry_run)
    try:
        v = run(out, dry=a.dry_run, budget_s=a.budget_s, providers=providers)
    except KeyboardInterrupt:  # `timeout -s INT`: verdict.md / verdict.csv hold every finished phase
        print("# interrupted; the files hold the phases that finished", flush=True)
        return 130
    return 0 if v.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
