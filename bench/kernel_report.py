"""Compiled-code report of every launchable kernel config, no GPU needed (issue 13 item 1).

    python -m bench.kernel_report [--out bench/results/kernel_report] [--ops contrastive_loss assign_attention]
                                  [--dtypes bf16,fp16,fp32-tf32,fp32-ieee,fp64] [--archs 90,80] [--subset ci]

For each op of kernels/registry.py at its ``model`` cases, each input dtype, each target (sm_90a, sm_80) and every
:class:`kernels.variants.Variant` that the kernel file's ``variants()`` lists (forward and backward, every mode and
autotune config), :func:`kernels.variants.analyze` compiles it and reads registers, spills, shared memory, tensor-core
and FMA dots, async copies, SASS counts, waves and the FLOP/byte floor. Writes ``PREFIX.csv`` (every row) and
``PREFIX.md`` (headline cases, the gate failures, and per-kernel ranges). Identical specialisations compile once per
run (the case only changes the grid); nothing is cached across runs when ``TRITON_CACHE_DIR`` points at a fresh
directory.

``--subset ci`` is the fast gate of tests/test_kernel_report.py: a few representative configs on sm_90a (listed in
:data:`CI_SUBSET`) and sm_80 (:data:`CI_SUBSET_SM80`). Exit status 1 when a row fails the gate
(:func:`kernels.variants.gate_failures`: spills, shared memory over the limit, a bf16/fp16/tf32 dot lowered to
FMA), unless ``--no-fail``.

This module compiles, so the kernels must be decorated in compiled mode: :func:`main` sets ``TRITON_INTERPRET=0``
before the kernel modules are imported (lazily, by :func:`op_variants`); in a process whose kernels were built for
the interpreter every row reports the error instead.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from kernels.registry import OPS
from kernels.variants import TARGETS, Variant, analyze, gate_failures

KERNEL_OPS = ("contrastive_loss", "assign_attention")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
DEFAULT_DTYPES = ("bf16", "fp16", "fp32-tf32", "fp32-tf32x3", "fp32-ieee", "fp64")
HEADLINE = {"contrastive_loss": ("b32768-k1", "b32768-k3"), "assign_attention": ("stage1", "stage2", "crop448")}
# The CI gate: (op, registry case, dtype label, kernel, config index into that kernel's variants) on sm_90a.
CI_SUBSET: tuple[tuple[str, str, str, str, int], ...] = (
    ("contrastive_loss", "b32768-k1", "bf16", "fwd", 0),
    ("contrastive_loss", "b32768-k1", "bf16", "fwd", -1),
    ("contrastive_loss", "b32768-k3", "bf16", "bwd_rows", 0),
    ("contrastive_loss", "b32768-k3", "bf16", "bwd_cols", 0),
    ("contrastive_loss", "b32768-k1", "fp32-tf32", "fwd", 0),
    ("contrastive_loss", "b32768-k3", "bf16", "fwd_fix", 0),
    ("assign_attention", "stage1", "bf16", "fwd", 0),
    ("assign_attention", "stage1", "bf16", "bwd", 0),
    ("assign_attention", "stage1", "fp32-tf32", "bwd", 0),
)
# ... and on sm_80 (A100: mma.sync, 163 KB), the configs that the sm_90 tiles do not cover.
CI_SUBSET_SM80: tuple[tuple[str, str, str, str, int], ...] = (
    ("contrastive_loss", "b32768-k3", "bf16", "fwd", 0),
    ("contrastive_loss", "b32768-k3", "fp32-tf32", "fwd", 0),
    ("assign_attention", "stage1", "bf16", "fwd", 0),
    ("assign_attention", "stage1", "bf16", "bwd", 0),
    ("assign_attention", "stage1", "fp32-tf32", "fwd", 0),
    ("assign_attention", "stage2", "bf16", "bwd", 0),
    ("assign_attention", "stage2", "fp32-tf32", "bwd", 0),
)
COLUMNS = (
    "op",
    "kernel",
    "case",
    "dtype",
    "mode",
    "config",
    "target",
    "num_warps",
    "num_stages",
    "regs",
    "spill_stores",
    "spill_loads",
    "stack",
    "shared",
    "smem_limit",
    "smem_ok",
    "dots",
    "fma_dots",
    "fma_tc_dots",
    "ptx_wgmma",
    "ptx_mma_sync",
    "ptx_cp_async",
    "ptx_tma",
    "sass",
    "sass_mma",
    "sass_ffma",
    "loops",
    "loop_static",
    "loop_instr",
    "inner_loop_instr",
    "loop_mma",
    "loop_ffma",
    "loop_mufu",
    "loop_i64",
    "instr_per_logit",
    "ldgsts",
    "tma",
    "grid",
    "programs",
    "blocks_per_sm",
    "waves",
    "gflop",
    "mbytes",
    "flop_per_byte",
    "floor_us",
    "compile_s",
    "gate",
)


def op_variants(op: str, case_name: str, dtype_label: str, arch: int) -> list[Variant]:
    """The op's ``variants()`` at a registry case for one dtype label (``fp32-tf32``: fp32 inputs, that precision)."""
    mod = importlib.import_module(f"kernels.{op}")
    if not hasattr(mod, "variants"):
        raise AttributeError(f"kernels.{op} has no variants(shape, dtype) function (see kernels/variants.py)")
    dtype = DTYPES[dtype_label.split("-")[0]]
    kw = dict(num_sms=TARGETS[arch]["sms"])
    if "smem" in inspect.signature(mod.variants).parameters:  # tiles that follow the shared memory of the target
        kw["smem"] = TARGETS[arch]["smem_block"]
    vs = mod.variants(dict(OPS[op].case(case_name).dims), dtype, **kw)
    return [v for v in vs if v.dtype == dtype_label]


def _row(v: Variant, arch: int, case_name: str) -> dict[str, Any]:
    try:
        r = analyze(v, arch)
        r["gate"] = "; ".join(gate_failures(r)) or "ok"
    except Exception as e:  # a config that does not compile is a finding, not a crash of the report
        r = dict(
            op=v.op,
            kernel=v.kernel,
            dtype=v.dtype,
            config=v.config,
            target=TARGETS[arch]["name"],
            num_warps=v.num_warps,
            num_stages=v.num_stages,
            gate=f"compile error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
        )
    r["case"] = case_name
    r.setdefault("mode", v.meta.get("mode", ""))
    return r


def _limited(vs: list[Variant], n: int | None) -> list[Variant]:
    """At most ``n`` configs of each (kernel, mode)."""
    if n is None:
        return vs
    seen: dict[tuple, int] = {}
    out = []
    for v in vs:
        key = (v.kernel, v.meta.get("mode"))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= n:
            out.append(v)
    return out


def collect(
    ops: Iterable[str],
    dtypes: Iterable[str],
    archs: Iterable[int],
    subset: str | None = None,
    limits: dict[str, int] | None = None,
    cases: list[str] | None = None,
    log=print,
) -> list[dict[str, Any]]:
    rows = []
    t0 = time.perf_counter()
    if subset == "ci":
        for (op, case, dt, kernel, idx), arch in [(e, 90) for e in CI_SUBSET] + [(e, 80) for e in CI_SUBSET_SM80]:
            vs = [v for v in op_variants(op, case, dt, arch) if v.kernel == kernel]
            if not vs:
                raise ValueError(f"CI subset: {op} {case} {dt} has no {kernel!r} variants")
            rows.append(_row(vs[idx], arch, case))
            log(f"[{time.perf_counter() - t0:6.1f}s] {rows[-1]['gate']:>4}  {vs[idx].name} {TARGETS[arch]['name']}")
        return rows
    for op in ops:
        for dt in dtypes:
            for arch in archs:
                for case in [c for c in OPS[op].select("model") if not cases or c.name in cases]:
                    for v in _limited(op_variants(op, case.name, dt, arch), (limits or {}).get(dt)):
                        rows.append(_row(v, arch, case.name))
                    log(
                        f"[{time.perf_counter() - t0:6.1f}s] {op} {dt} {TARGETS[arch]['name']} {case.name}: "
                        f"{len(rows)} rows"
                    )
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    cols = (
        "kernel",
        "dtype",
        "mode",
        "config",
        "target",
        "regs",
        "spill_stores",
        "shared",
        "dots",
        "loop_instr",
        "instr_per_logit",
        "grid",
        "blocks_per_sm",
        "waves",
        "floor_us",
        "compile_s",
        "gate",
    )
    out = [
        f"# {title}",
        "",
        "Compiled with triton " + _triton_version() + " for sm_90a / sm_80 on a CPU-only machine "
        "(`python -m bench.kernel_report`); `instr_per_logit` = SASS instructions of the main loop x threads / "
        "logits per iteration; `floor_us` from the FLOP/byte model (sm_90a: H100 achieved figures, sm_80: A100 "
        "datasheet). Full data: the CSV beside this file.",
        "",
    ]
    fails = {}
    for r in rows:
        if r.get("gate", "ok") != "ok":
            fails.setdefault(
                (r["op"], r["kernel"], r["dtype"], r.get("mode", ""), r["config"], r["target"], r["gate"]), []
            ).append(r["case"])
    out += [f"## Gate failures ({len(fails)} distinct configs)", ""]
    if fails:
        out += ["| op | kernel | dtype | mode | config | target | why | cases |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {' | '.join(map(str, k[:6]))} | {k[6]} | {', '.join(sorted(set(v)))} |" for k, v in fails.items()]
    else:
        out.append("None: every listed config is spill-free, within shared memory and on tensor cores.")
    for op, cases in HEADLINE.items():
        for case in cases:
            sel = [r for r in rows if r["op"] == op and r["case"] == case]
            if not sel:
                continue
            out += [
                "",
                f"## {op} `{case}` {OPS[op].case(case).dims}",
                "",
                "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols),
            ]
            out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in sel]
    return "\n".join(out) + "\n"


def _triton_version() -> str:
    import triton

    return triton.__version__


def write(rows: list[dict[str, Any]], prefix: Path, title: str) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS)))
        w.writeheader()
        w.writerows(rows)
    prefix.with_suffix(".md").write_text(markdown(rows, title))


def main(argv: list[str] | None = None) -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # before the kernel modules are imported (see the module docstring)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/kernel_report"), help="output prefix")
    p.add_argument("--ops", nargs="+", default=list(KERNEL_OPS), choices=KERNEL_OPS)
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="comma list of " + ",".join(DEFAULT_DTYPES))
    p.add_argument("--archs", default="90,80", help="comma list of 90 (sm_90a) and 80 (sm_80)")
    p.add_argument("--subset", choices=("ci",), help="the fast CI gate subset instead of everything")
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="DTYPE=N",
        help="at most N configs per kernel and mode for that dtype label (fp32-ieee=1: its FMA builds "
        "take up to a minute each)",
    )
    p.add_argument("--cases", nargs="+", help="only these registry cases (default: every 'model' case)")
    p.add_argument("--title", default="Kernel report")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when rows fail the gate")
    a = p.parse_args(argv)
    dtypes = [d for d in a.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DEFAULT_DTYPES]
    if bad:
        p.error(f"unknown dtype label(s) {bad}; choose from {','.join(DEFAULT_DTYPES)}")
    archs = [int(x) for x in a.archs.split(",") if x]
    if any(x not in TARGETS for x in archs):
        p.error(f"--archs: choose from {sorted(TARGETS)}")
    try:
        limits = {k: int(v) for k, v in (x.split("=") for x in a.limit)}
    except ValueError:
        p.error(f"--limit takes DTYPE=N, got {a.limit}")
    rows = collect(a.ops, dtypes, archs, a.subset, limits, a.cases)
    write(rows, a.out, a.title)
    n_bad = sum(r["gate"] != "ok" for r in rows)
    print(f"{len(rows)} rows, {n_bad} failing the gate -> {a.out.with_suffix('.csv')}, {a.out.with_suffix('.md')}")
    return 1 if n_bad and not a.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
