#!/usr/bin/env bash
# The whole GPU run in one command (fits one 10-minute call): offline installs, GPU tests, op benchmarks (bf16,
# fp32), the end-to-end training step, plots and the markdown report, all written under OUTDIR.
#
#   bash bench/gpu_run.sh OUTDIR [--dry-run]        # from the repository root
#
# Environment knobs:
#   GPU_RUN_DRY=1         same as --dry-run: every stage on CPU with tiny settings (what CI tests)
#   GPU_RUN_EXPORT=DIR    after every stage copy summary.txt, bench.csv, results.md, bundle.tar.gz to DIR (e.g. the
#                         device tool's $OUT, which returns at most 8 files; a killed run still returns its stages)
#   GIT_SHA=abc123        commit recorded in the rows when the copy has no .git
#   GPU_RUN_PLOTS=0       markdown report only (no PNGs)
#   PYTHON=python3        interpreter;  T_INSTALL T_TESTS T_OPS_BF16 T_OPS_FP32 T_MODEL T_PLOT: stage budgets (s)
#   GPU_TESTS="tests/a.py ..."   kernel test files run in full (default: the kernel/ops/backends files present)
#   GPU_OTHER_TESTS="..."        files searched for tests marked gpu (default: every other tests/test_*.py)
#
# Never changes GPU settings: nvidia-smi is only queried. Each stage runs under `timeout -s INT` (Python stops
# cleanly and keeps the rows written so far) with a hard kill 10 s later.
set -uo pipefail

OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR [--dry-run]}
DRY=${GPU_RUN_DRY:-0}
[[ "${2:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT/logs" || exit 1
OUT=$(cd "$OUT" && pwd)  # absolute, relative to the caller's directory
[[ -n "${GPU_RUN_EXPORT:-}" ]] && { mkdir -p "$GPU_RUN_EXPORT" && GPU_RUN_EXPORT=$(cd "$GPU_RUN_EXPORT" && pwd); }
cd "$REPO" || exit 1
LOGS=$OUT/logs
SUMMARY=$OUT/summary.txt
SITE=${GPU_RUN_SITE:-/tmp/groupvit_bench_site}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY" == 1 ]]; then  # CPU, tiny: exercises every stage's command line in seconds
  unset TRITON_INTERPRET  # triton provider reports "unavailable" on CPU instead of crawling in the interpreter
  export OMP_NUM_THREADS=1  # tiny CPU ops: one thread avoids scheduler stalls on a busy machine
  T_INSTALL=${T_INSTALL:-60} T_TESTS=${T_TESTS:-120} T_OPS_BF16=${T_OPS_BF16:-120} T_OPS_FP32=${T_OPS_FP32:-120}
  T_MODEL=${T_MODEL:-120} T_PLOT=${T_PLOT:-60}
else                        # sum 510 s: leaves ~90 s of a 600 s call for start-up and copying
  T_INSTALL=${T_INSTALL:-20} T_TESTS=${T_TESTS:-120} T_OPS_BF16=${T_OPS_BF16:-140} T_OPS_FP32=${T_OPS_FP32:-60}
  T_MODEL=${T_MODEL:-150} T_PLOT=${T_PLOT:-20}
fi

: >"$SUMMARY"
T0=$(date +%s)

export_results() {  # bundle logs + plots; copy the few result files to GPU_RUN_EXPORT
  tar -czf "$OUT/bundle.tar.gz" -C "$OUT" logs $(cd "$OUT" && ls *.png results.md bench.csv 2>/dev/null) \
    2>/dev/null || true
  if [[ -n "${GPU_RUN_EXPORT:-}" ]]; then
    mkdir -p "$GPU_RUN_EXPORT"
    for f in summary.txt bench.csv results.md bundle.tar.gz; do
      [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$GPU_RUN_EXPORT/"
    done
  fi
  return 0
}

stage() {  # stage NAME BUDGET_S CMD...: run with a budget, log to logs/NAME.log, one summary line
  local name=$1 budget=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (budget ${budget}s): $*"
  timeout -s INT -k 10 "$budget" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local msg="$name rc=$rc $(( $(date +%s) - start ))s/${budget}s"
  [[ $rc == 124 || $rc == 130 ]] && msg+=" (budget reached; partial results kept)"
  echo "$msg" | tee -a "$SUMMARY"
  tail -n 8 "$LOGS/$name.log" | sed 's/^/   | /'
  export_results
  return 0
}

# ---- 0. environment (read-only queries) -------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry: $DRY  repo: $REPO"
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
elif [[ "$DRY" == 1 ]]; then
  stage install "$T_INSTALL" "$PY" -m pip install --dry-run --no-index --no-deps --ignore-installed \
    --target "$(mktemp -d)" --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    --only-binary=:all: $WHEELS
else
  stage install "$T_INSTALL" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $WHEELS
  export PYTHONPATH="$PYTHONPATH:$SITE"  # holds only what the machine lacked, so it shadows nothing
fi

# ---- 2. GPU tests: kernel/ops test files in full (real compilation on CUDA) + everything marked gpu -------------
if [[ -z "${GPU_TESTS:-}" ]]; then
  GPU_TESTS=""
  for f in tests/test_assign_attention.py tests/test_contrastive_loss.py tests/test_philox.py tests/test_ops.py \
           tests/test_model_backends.py; do
    [[ -f $f ]] && GPU_TESTS+=" $f"
  done
fi
OTHER_TESTS=${GPU_OTHER_TESTS:-}
if [[ -z "$OTHER_TESTS" ]]; then
  for f in tests/test_*.py; do
    [[ " $GPU_TESTS " == *" $f "* ]] || OTHER_TESTS+=" $f"
  done
fi
# pytest exit 5 = nothing selected (no gpu-marked test in those files): not a failure
PYTEST="$PY -m pytest -q -p no:cacheprovider -o addopts='-ra --benchmark-disable'"
if [[ "$DRY" == 1 ]]; then
  ARGS1="--collect-only" ARGS2="--collect-only"
else
  ARGS1="--junitxml=$LOGS/tests_kernels.xml" ARGS2="--junitxml=$LOGS/tests_gpu.xml"
fi
stage tests "$T_TESTS" bash -c "r1=0; if [ -n '$GPU_TESTS' ]; then $PYTEST $ARGS1 $GPU_TESTS; r1=\$?; fi; \
  $PYTEST $ARGS2 -m gpu $OTHER_TESTS; r2=\$?; [ \$r2 = 5 ] && r2=0; echo \"pytest rc: kernels \$r1, gpu-marked \$r2\"; \
  [ \$r1 = 0 ] && [ \$r2 = 0 ]"

# ---- 3. op benchmarks ---------------------------------------------------------------------------------------------
OPS=(-m bench.bench_ops --out "$OUT")
if [[ "$DRY" == 1 ]]; then
  QUICK=(--device cpu --tags smoke --cases odd-7x13x24,b5-d16,cross-odd --providers eager,triton,sdpa --quick)
  stage ops_bf16 "$T_OPS_BF16" "$PY" "${OPS[@]}" "${QUICK[@]}" --dtypes bf16 --budget-s $((T_OPS_BF16 - 20))
  stage ops_fp32 "$T_OPS_FP32" "$PY" "${OPS[@]}" "${QUICK[@]}" --dtypes fp32 --no-max-batch \
    --budget-s $((T_OPS_FP32 - 20))
else
  stage ops_bf16 "$T_OPS_BF16" "$PY" "${OPS[@]}" --tags model --dtypes bf16 --max-batch-budget-s 20 \
    --budget-s $((T_OPS_BF16 - 25))
  stage ops_fp32 "$T_OPS_FP32" "$PY" "${OPS[@]}" --tags model --dtypes fp32 --no-max-batch \
    --budget-s $((T_OPS_FP32 - 15))
fi

# ---- 4. end-to-end training step ----------------------------------------------------------------------------------
if [[ "$DRY" == 1 ]]; then
  stage model "$T_MODEL" "$PY" -m bench.bench_model --out "$OUT" --device cpu --preset groupvit-tiny --batch 2 \
    --configs eager --autocast none --quick --max-batch-cap 4 --budget-s $((T_MODEL - 20))
else
  stage model "$T_MODEL" "$PY" -m bench.bench_model --out "$OUT" --preset groupvit-s --batch 256 --autocast bf16 \
    --max-batch-budget-s 25 --budget-s $((T_MODEL - 40))
fi

# ---- 5. report ----------------------------------------------------------------------------------------------------
if [[ -f "$OUT/bench.csv" ]]; then
  PLOT_ARGS=()
  [[ "${GPU_RUN_PLOTS:-1}" == 0 ]] && PLOT_ARGS=(--no-plots)
  stage plot "$T_PLOT" "$PY" -m bench.plot "$OUT/bench.csv" --out "$OUT" ${PLOT_ARGS[@]+"${PLOT_ARGS[@]}"}
else
  echo "plot skipped: no bench.csv" | tee -a "$SUMMARY"
fi
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$SUMMARY"
export_results
echo "== results: $OUT (summary.txt, bench.csv, results.md, *.png, logs/, bundle.tar.gz)"
[[ -f "$OUT/results.md" ]] && head -c 6000 "$OUT/results.md"
exit 0
