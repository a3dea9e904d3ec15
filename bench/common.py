"""Shared benchmark plumbing: timers, peak-memory probe, environment metadata and the tidy CSV store.

Timing follows docs/kernels.md §7: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs,
median and 20/80 percentiles); on CPU a ``perf_counter`` loop with the same signature, so every code path of the
benchmarks can run (and be tested) without a GPU. CPU numbers are only for testing the plumbing.

The CSV store holds one tidy row per measurement. Rows are keyed by :data:`KEY`; writing a row whose key already
exists replaces it, so re-running a benchmark overwrites its old numbers instead of duplicating them.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

COLUMNS: tuple[str, ...] = (
    "op",
    "case",
    "provider",
    "mode",
    "metric",
    "unit",
    "p50",
    "p20",
    "p80",
    "dtype",
    "dims_json",
    "correct",
    "gpu",
    "torch",
    "triton",
    "git_sha",
    "timestamp",
)
KEY: tuple[str, ...] = ("op", "case", "provider", "mode", "metric", "dtype", "gpu")

# Physical floors of the reference device (H100 SXM, docs/kernels.md §4): achieved, not datasheet, figures.
HBM_GBPS = 3000.0  # device-to-device copy, bytes read + written
DENSE_TFLOPS = 790.0  # bf16 dense matmul 8192^3

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def parse_dtypes(spec: str) -> list[torch.dtype]:
    """``"bf16,fp32"`` -> ``[torch.bfloat16, torch.float32]`` (ValueError naming the bad entry)."""
    out = []
    for name in filter(None, (s.strip() for s in spec.split(","))):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
        out.append(DTYPES[name])
    return out


# ---- timing -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles."""

    p50: float
    p20: float
    p80: float


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def quantiles(xs: Iterable[float]) -> Timing:
    s = sorted(xs)
    if not s:
        raise ValueError("quantiles: no samples")
    return Timing(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8))


def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def cpu_timer(
    fn: Callable[[], Any],
    *,
    warmup: float = 25,
    rep: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    min_runs: int = 3,
    max_runs: int = 1000,
) -> Timing:
    """``do_bench`` look-alike for CPU: ``warmup`` / ``rep`` are budgets in ms (at least one warm-up call and
    ``min_runs`` timed calls)."""
    t_end = time.perf_counter() + warmup / 1e3
    while True:
        _clear_grads(grad_to_none)
        fn()
        if time.perf_counter() >= t_end:
            break
    times: list[float] = []
    t_end = time.perf_counter() + rep / 1e3
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < max_runs):
        _clear_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: float = 25,
    rep: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> Timing:
    """Time ``fn`` in ms: CUDA events via ``triton.testing.do_bench`` on CUDA, :func:`cpu_timer` elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(
            fn,
            warmup=warmup,
            rep=rep,
            quantiles=[0.5, 0.2, 0.8],
            grad_to_none=list(grad_to_none) if grad_to_none else None,
        )
        return Timing(float(p50), float(p20), float(p80))
    return cpu_timer(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none)


def time_steps(step: Callable[[], Any], n: int, device: torch.device) -> Timing:
    """Time ``n`` consecutive calls of a long-running ``step`` (a training step) one by one, in ms. CUDA events
    bracket each step; the clock is read once at the end so the steps stay back to back."""
    if n < 1:
        raise ValueError(f"time_steps: n must be >= 1, got {n}")
    if device.type == "cuda":
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        torch.cuda.synchronize(device)
        ev[0].record()
        for i in range(n):
            step()
            ev[i + 1].record()
        torch.cuda.synchronize(device)
        return quantiles(ev[i].elapsed_time(ev[i + 1]) for i in range(n))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


# ---- memory -------------------------------------------------------------------------------------------------------


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocator memory of one call of ``fn`` above what was allocated before it, in MiB (CCE's
    ``op_mem_mb``); ``None`` off CUDA, where the caching allocator's statistics do not exist."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.memory_stats(device)["allocated_bytes.all.peak"]
    return (peak - before) / 2**20


def is_oom(err: BaseException) -> bool:
    """True for CUDA out-of-memory (and the CPU allocator's equivalent)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "DefaultCPUAllocator: can't allocate" in msg)


def free_memory(device: torch.device, after_error: bool = True) -> None:
    """Release memory after an exception (OOM): collect the reference cycles a traceback leaves and return the
    allocator's cached blocks. Call outside the ``except`` block, after dropping references. On the normal path
    (``after_error=False``) nothing is needed (reference counting frees tensors) and nothing is done: a full
    ``gc.collect`` costs ~0.2 s with torch loaded."""
    if not after_error:
        return
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ---- environment --------------------------------------------------------------------------------------------------


def git_sha(repo: Path | None = None) -> str:
    """Commit of the checkout (``+dirty`` when tracked files differ); ``$GIT_SHA`` wins (copies without .git)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}c"


def env_info(device: torch.device) -> dict[str, str]:
    """Columns shared by every row of one run: device, versions, commit, UTC timestamp."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton missing or broken: the eager benchmarks still run
        triton_version = "none"
    return {
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def pick_device(name: str | None = None) -> torch.device:
    """``--device`` argument or CUDA when present, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- rows and the CSV store ---------------------------------------------------------------------------------------


def fmt(x: float | None) -> str:
    """Number -> CSV cell: empty for missing / NaN, integers exact, 6 significant digits otherwise."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6g}"


def make_row(
    env: dict[str, str],
    *,
    op: str,
    case: str,
    provider: str,
    mode: str,
    metric: str,
    unit: str,
    p50: float | None,
    p20: float | None = None,
    p80: float | None = None,
    dtype: str,
    dims: dict[str, Any],
    correct: str,
) -> dict[str, str]:
    """One tidy row (all values as CSV strings)."""
    row = dict(
        op=op,
        case=case,
        provider=provider,
        mode=mode,
        metric=metric,
        unit=unit,
        p50=fmt(p50),
        p20=fmt(p20),
        p80=fmt(p80),
        dtype=dtype,
        dims_json=json.dumps(dims, sort_keys=True),
        correct=correct,
    )
    row.update({k: env[k] for k in ("gpu", "torch", "triton", "git_sha", "timestamp")})
    return row


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[k] for k in KEY)


def read_rows(path: Path | str) -> list[dict[str, str]]:
    """Rows of a results CSV (empty list if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if tuple(reader.fieldnames) != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames} differ from the expected {list(COLUMNS)}")
        return list(reader)


@dataclass
class Ceilings:
    """A device's measured ceilings (``python -m bench.verdict``): copy GB/s and bf16 GEMM TFLOP/s."""

    copy_gbps: float | None = None
    gemm_tflops: float | None = None


def read_ceilings(path: Path) -> Ceilings:
    """The ceilings a verdict measured, from its ``verdict.csv`` (ValueError naming the file if it has none)."""
    rows = {(r["op"], r["metric"]): r["p50"] for r in read_rows(path)}
    copy, gemm = rows.get(("device", "gbps")), rows.get(("device", "tflops"))
    if not copy or not gemm:
        raise ValueError(
            f"{path}: no measured ceilings (rows op=device, metric gbps and tflops); run "
            f"`python -m bench.verdict` on this device first"
        )
    return Ceilings(float(copy), float(gemm))


def write_rows(path: Path | str, rows: Iterable[dict[str, str]]) -> int:
    """Merge ``rows`` into the CSV at ``path``: rows with an existing key replace it in place, new keys are
    appended. Written atomically (temp file + rename). Returns the number of rows in the file."""
    path = Path(path)
    merged = {row_key(r): r for r in read_rows(path)}
    for r in rows:
        if set(r) != set(COLUMNS):
            raise ValueError(f"row has columns {sorted(r)}, expected {list(COLUMNS)}")
        merged[row_key(r)] = r
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(merged.values())
    os.replace(tmp, path)
    return len(merged)


class Budget:
    """Wall-clock budget in seconds (``None`` = unlimited), so a run stops starting new work in time."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.left() <= 0
