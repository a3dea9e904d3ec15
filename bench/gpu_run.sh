#!/usr/bin/env bash
# The whole GPU run in one command, at most 7 minutes, most valuable first: the verdict (this device's ceilings,
# headline parity, triton vs eager vs compile), the GPU tests (pytest -m gpu: real shapes, determinism), the
# end-to-end groupvit-s step at 256/GPU, the broader op sweeps, the contrastive max-batch search if time is left;
# plots and the markdown report. All under OUTDIR.
#
#   bash bench/gpu_run.sh OUTDIR [--dry-run]        # from anywhere; the repository is found from this file
#
# Environment knobs:
#   GPU_RUN_DRY=1         same as --dry-run: every stage on CPU with tiny settings (what CI tests)
#   GPU_RUN_EXPORT=DIR    after every stage copy summary.txt, verdict.md, verdict.csv, bench.csv, results.md,
#                         bundle.tar.gz to DIR (e.g. the device tool's $OUT; a killed run still returns its stages)
#   GIT_SHA=abc123        commit recorded in the rows when the copy has no .git
#   GPU_RUN_PLOTS=0       markdown report only (no PNGs)
#   PYTHON=python3        interpreter (default: the checkout's .venv/bin/python if its torch fits the run, else
#                         python3; on a GPU run the torch must see CUDA)
#   T_TOTAL=420           whole-run budget (s): a stage never gets more than what is left of it
#   T_INSTALL T_VERDICT T_TESTS T_MODEL T_OPS_BF16 T_OPS_FP32 T_MAXB T_PLOT: stage budgets (s); the max-batch
#                         search runs only when T_MAXB + T_PLOT are still left
#   GPU_TESTS="tests/a.py ..."   where `pytest -m gpu` looks (default: tests/)
#   GPU_TESTS_K="not ieee"       its -k filter (default: leave out the fp32 "highest" cases; "" keeps all)
#
# Never changes GPU settings: nvidia-smi is only queried. Each stage runs under `timeout -s INT` (Python stops
# cleanly and keeps the rows written so far) with a hard kill 10 s later. Exit status: 0 when every stage passed,
# 1 when some failed, 2 when all failed or no usable Python was found.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR [--dry-run]}
DRY=${GPU_RUN_DRY:-0}
[[ "${2:-}" == "--dry-run" ]] && DRY=1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---- Python: one whose torch fits the run (dry: any torch; GPU: torch with CUDA) --------------------------------
CHECK='import torch, sys; sys.exit(not torch.cuda.is_available())'
[[ "$DRY" == 1 ]] && CHECK='import torch'
PY=""
for cand in ${PYTHON:-"$REPO/.venv/bin/python" python3}; do
  if "$cand" -c "$CHECK" >/dev/null 2>&1; then PY=$cand; break; fi
done
if [[ -z "$PY" ]]; then
  what=$([[ "$DRY" == 1 ]] && echo "torch" || echo "torch with a CUDA device")
  echo "gpu_run: no Python with $what (tried: ${PYTHON:-$REPO/.venv/bin/python python3})." >&2
  if [[ "$DRY" == 1 ]]; then
    echo "  Create the project's venv first (from the repository root: make setup, which makes ./.venv)," >&2
  else
    echo "  Use a Python with a CUDA build of torch and triton (README: \"Install on a GPU machine\")," >&2
  fi
  echo "  or set PYTHON=/path/to/python." >&2
  exit 2
fi

mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)  # absolute, relative to the caller's directory
[[ -n "${GPU_RUN_EXPORT:-}" ]] && { mkdir -p "$GPU_RUN_EXPORT" && GPU_RUN_EXPORT=$(cd "$GPU_RUN_EXPORT" && pwd); }
cd "$REPO" || exit 2
LOGS=$OUT/logs
SUMMARY=$OUT/summary.txt
SITE=${GPU_RUN_SITE:-/tmp/groupvit_bench_site}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_AUTOTUNING=1  # a second run right after reuses the autotuning results

if [[ "$DRY" == 1 ]]; then  # CPU, tiny: exercises every stage's command line in seconds
  unset TRITON_INTERPRET  # the verdict sets it for itself; bench_ops reports triton "unavailable" without it
  export OMP_NUM_THREADS=1  # tiny CPU ops: one thread avoids scheduler stalls on a busy machine
  T_TOTAL=${T_TOTAL:-900}
  T_INSTALL=${T_INSTALL:-60} T_VERDICT=${T_VERDICT:-120} T_TESTS=${T_TESTS:-120} T_MODEL=${T_MODEL:-120}
  T_OPS_BF16=${T_OPS_BF16:-120} T_OPS_FP32=${T_OPS_FP32:-120} T_MAXB=${T_MAXB:-60} T_PLOT=${T_PLOT:-60}
else                        # 15+170+75+90+40+15+15 = 420 s (+ max_batch only when time is left): a second run fits
  T_TOTAL=${T_TOTAL:-420}
  T_INSTALL=${T_INSTALL:-15} T_VERDICT=${T_VERDICT:-170} T_TESTS=${T_TESTS:-75} T_MODEL=${T_MODEL:-90}
  T_OPS_BF16=${T_OPS_BF16:-40} T_OPS_FP32=${T_OPS_FP32:-15} T_MAXB=${T_MAXB:-40} T_PLOT=${T_PLOT:-15}
fi

: >"$SUMMARY"
T0=$(date +%s)
N_OK=0 N_FAIL=0

export_results() {  # bundle logs + plots; copy the few result files to GPU_RUN_EXPORT
  tar -czf "$OUT/bundle.tar.gz" -C "$OUT" logs $(cd "$OUT" && ls *.png *.md *.csv verdict 2>/dev/null) \
    2>/dev/null || true
  if [[ -n "${GPU_RUN_EXPORT:-}" ]]; then
    mkdir -p "$GPU_RUN_EXPORT"
    for f in summary.txt verdict/verdict.md verdict/verdict.csv bench.csv results.md bundle.tar.gz; do
      [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$GPU_RUN_EXPORT/"
    done
  fi
  return 0
}

stage() {  # stage NAME BUDGET_S CMD...: run within min(budget, what is left of T_TOTAL), log, one summary line
  local name=$1 budget=$2 start rc left
  shift 2
  start=$(date +%s)
  left=$(( T_TOTAL - (start - T0) ))
  if (( left < 10 )); then
    echo "$name skipped (total budget of ${T_TOTAL}s spent)" | tee -a "$SUMMARY"
    N_FAIL=$((N_FAIL + 1))
    return 0
  fi
  (( budget > left )) && budget=$left
  echo "== $name (budget ${budget}s): $*"
  timeout -s INT -k 10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local msg="$name rc=$rc $(( $(date +%s) - start ))s/${budget}s"
  [[ $rc == 124 || $rc == 130 ]] && msg+=" (budget reached; partial results kept)"
  echo "$msg" | tee -a "$SUMMARY"
  tail -n 8 "$LOGS/$name.log" | sed 's/^/   | /'
  if [[ $rc == 0 ]]; then N_OK=$((N_OK + 1)); else N_FAIL=$((N_FAIL + 1)); fi
  export_results
  return 0
}

# ---- 0. environment (read-only queries) -------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry: $DRY  repo: $REPO  python: $PY"
  echo "git: ${GIT_SHA:-$(git -C "$REPO" rev-parse --short=10 HEAD 2>/dev/null || echo unknown)}"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>&1
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --format=csv 2>&1 \
      --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw
  fi
} >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log"

# ---- 1. offline installs: only the distributions the machine lacks (the dry run checks all wheels) ---------------
WHEELS=""
for w in "$REPO"/bench/wheels/*.whl; do
  [[ -f $w ]] || continue
  dist=$(basename "$w" | cut -d- -f1)
  if [[ "$DRY" != 1 ]] && "$PY" -c "import importlib.metadata as m; m.version('$dist')" >/dev/null 2>&1; then
    echo "install: $dist already installed, wheel not used" >>"$LOGS/env.log"
  else
    WHEELS+=" $w"
  fi
done
if [[ -z "$WHEELS" ]]; then
  echo "install rc=0 (nothing missing)" | tee -a "$SUMMARY"
  N_OK=$((N_OK + 1))
elif [[ "$DRY" == 1 ]]; then
  stage install "$T_INSTALL" "$PY" -m pip install --dry-run --no-index --no-deps --ignore-installed \
    --target "$(mktemp -d)" --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    --only-binary=:all: $WHEELS
else
  stage install "$T_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $WHEELS
  export PYTHONPATH="$PYTHONPATH:$SITE"  # holds only what the machine lacked, so it shadows nothing
fi

# ---- 2. the verdict: ceilings, headline parity, triton vs eager vs compile (one process) -------------------------
VERDICT=(-m bench.verdict --out "$OUT/verdict" --budget-s $((T_VERDICT - 20)))
[[ "$DRY" == 1 ]] && VERDICT+=(--dry-run)
stage verdict "$T_VERDICT" "$PY" "${VERDICT[@]}"
[[ -f "$OUT/verdict/verdict.md" ]] && cat "$OUT/verdict/verdict.md"

# ---- 3. GPU tests: only those marked gpu (real shapes, determinism; the CPU suite covers the rest) ---------------
# fp32 at torch's default precision ("highest") lowers tl.dot to FMA: minutes of compilation per autotune config, so
# those cases (ids with "ieee") are left out here (GPU_TESTS_K=""  runs them all).
GPU_TESTS=${GPU_TESTS:-tests}
GPU_TESTS_K=${GPU_TESTS_K-not ieee}
# a file that cannot be collected there (a missing optional package) must not stop the other files' GPU tests
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra --continue-on-collection-errors -m gpu)
[[ -n "$GPU_TESTS_K" ]] && PYTEST+=(-k "$GPU_TESTS_K")
if [[ "$DRY" == 1 ]]; then
  stage tests "$T_TESTS" "${PYTEST[@]}" --collect-only $GPU_TESTS
else
  stage tests "$T_TESTS" "${PYTEST[@]}" --junitxml="$LOGS/tests_gpu.xml" $GPU_TESTS
fi

# ---- 4. end-to-end training step at 256/GPU: eager, then triton, then the compiled configs (no max-batch search) --
if [[ "$DRY" == 1 ]]; then
  stage model "$T_MODEL" "$PY" -m bench.bench_model --out "$OUT" --device cpu --preset groupvit-tiny --batch 2 \
    --configs eager --autocast none --quick --no-max-batch --budget-s $((T_MODEL - 20))
else
  stage model "$T_MODEL" "$PY" -m bench.bench_model --out "$OUT" --preset groupvit-s --batch 256 --autocast bf16 \
    --configs eager,triton,triton+compile,eager+compile --no-max-batch --budget-s $((T_MODEL - 30))
fi

# ---- 5. broader op sweeps (model shapes, bf16), then fp32 with TF32 at one shape per op -------------------------
OPS=(-m bench.bench_ops --out "$OUT" --no-max-batch)
V_CSV=$OUT/verdict/verdict.csv  # "% of floor" against this device's measured ceilings when the verdict got them
[[ -f "$V_CSV" ]] && grep -q '^device,' "$V_CSV" && OPS+=(--ceilings "$V_CSV")
if [[ "$DRY" == 1 ]]; then
  QUICK=(--device cpu --tags smoke --cases odd-7x13x24,b5-d16,cross-odd --providers eager,triton,sdpa --quick)
  stage ops_bf16 "$T_OPS_BF16" "$PY" "${OPS[@]}" "${QUICK[@]}" --dtypes bf16 --budget-s $((T_OPS_BF16 - 20))
  stage ops_fp32 "$T_OPS_FP32" "$PY" "${OPS[@]}" "${QUICK[@]}" --dtypes fp32 --tf32 --budget-s $((T_OPS_FP32 - 20))
else
  stage ops_bf16 "$T_OPS_BF16" "$PY" "${OPS[@]}" --tags model --dtypes bf16 --providers eager,triton,sdpa \
    --budget-s $((T_OPS_BF16 - 10))
  stage ops_fp32 "$T_OPS_FP32" "$PY" "${OPS[@]}" --cases stage1,b4096-k1 --dtypes fp32 --tf32 \
    --providers eager,triton --modes fwd_bwd --budget-s $((T_OPS_FP32 - 5))
fi

# ---- 6. only if time is left: the largest contrastive batch that fits, per provider (bf16, K = 1) -------------------
LEFT=$(( T_TOTAL - ($(date +%s) - T0) - T_PLOT ))
if (( LEFT >= T_MAXB )); then
  MB=(-m bench.bench_ops --out "$OUT" --ops contrastive_loss --cases none --dtypes bf16 --providers eager,triton)
  if [[ "$DRY" == 1 ]]; then
    MB+=(--device cpu --quick --max-batch-start 5 --max-batch-cap 20)
  else
    MB+=(--max-batch-budget-s $(( (T_MAXB - 10) / 2 )))
  fi
  stage max_batch "$T_MAXB" "$PY" "${MB[@]}"
else
  echo "max_batch not run (${LEFT}s left before the report, needs ${T_MAXB}s)" | tee -a "$SUMMARY"
fi

# ---- 7. report ----------------------------------------------------------------------------------------------------
if [[ -f "$OUT/bench.csv" ]]; then
  PLOT_ARGS=()
  [[ "${GPU_RUN_PLOTS:-1}" == 0 ]] && PLOT_ARGS=(--no-plots)
  stage plot "$T_PLOT" "$PY" -m bench.plot "$OUT/bench.csv" --out "$OUT" ${PLOT_ARGS[@]+"${PLOT_ARGS[@]}"}
else
  echo "plot skipped: no bench.csv" | tee -a "$SUMMARY"
fi
echo "total $(( $(date +%s) - T0 ))s; stages ok $N_OK, failed $N_FAIL" | tee -a "$SUMMARY"
export_results
echo "== results: $OUT (summary.txt, verdict/, bench.csv, results.md, *.png, logs/, bundle.tar.gz)"
[[ -f "$OUT/results.md" ]] && head -c 4000 "$OUT/results.md"
(( N_FAIL == 0 )) && exit 0
(( N_OK == 0 )) && exit 2
exit 1
