#!/usr/bin/env bash
# On a GPU machine (no network; python3 with a CUDA build of torch preinstalled): builds and
# installs memattn (with its CUDA backend) into that python, checks that the CUDA backend was
# built, runs the CUDA tests first (`pytest -m cuda`, a fast fail), then the rest of the suite,
# compute-sanitizer memcheck and racecheck on tests/python/cuda_sanitize_cases.py, doctor and
# the benchmarks, and writes every log into OUTDIR. Keeps going after a failing step and exits
# non-zero if any step failed; OUTDIR/summary.txt lists each step's status and time.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Settings (environment variables, all optional):
#   PYTHON        interpreter to install into and test with (default: python3)
#   JOBS          parallel build jobs, CMAKE_BUILD_PARALLEL_LEVEL (default: 16)
#   MEMATTN_CUDA  passed to CMake as -DMEMATTN_CUDA (ON / OFF / AUTO); unset: the build's default
#   STEPS         the steps to run, any of: install sass pytest_cuda pytest sanitize bench
#                 (default: all, in that order; sass: per-kernel HGMMA / HMMA / local-memory
#                 instruction counts of the sm_90a machine code, from cuobjdump; e.g. STEPS="pytest_cuda" on a machine where
#                 memattn is already installed, to fit a per-command time limit)
#   BENCH         quick (default): `memattn bench --quick` on CPU and CUDA (seconds);
#                 full: the whole DESIGN.md §5 CUDA sweep as well (minutes of GPU time;
#                 results, markdown and plot in OUTDIR, bench/ is not touched); none: no bench
#   SANITIZER_KERNELS  restrict compute-sanitizer to kernels whose name contains this
#                 (--kernel-name kns=...); default: every kernel (memattn's and torch's)
#   SANITIZE_TIMEOUT   seconds allowed per sanitizer run (default: 1200)
#   RACECHECK_DTYPES   dtypes of the racecheck run (default: "bf16 fp32"; memcheck runs all)
#
# Build requirements (scikit-build-core, nanobind) must be importable by python3 or lie as wheels
# in .whl/ (ignored by git; pass it along explicitly); the build runs with --no-build-isolation.
# OUTDIR holds about twenty files: where only a few files can be brought back, pack them, e.g.
#   bash scripts/gpu_check.sh /tmp/gc; rc=$?; tar -czf "$OUT/gpu_check.tgz" -C /tmp gc; exit $rc
set -uo pipefail
OUTDIR="${1:?usage: scripts/gpu_check.sh OUTDIR}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-16}"
STEPS="${STEPS:-install sass pytest_cuda pytest sanitize bench}"
BENCH="${BENCH:-quick}"
FAILED=0
: >"$OUTDIR/summary.txt"

case "$BENCH" in
  quick | full | none) ;;
  *) echo "BENCH must be quick, full or none (got '$BENCH')" >&2; exit 2 ;;
esac

run() {  # run NAME CMD...: log to OUTDIR/NAME.log, record status and time
  local name="$1"; shift
  local t=$SECONDS rc=0
  echo "==> $name: $*" | tee -a "$OUTDIR/summary.txt"
  "$@" >"$OUTDIR/$name.log" 2>&1 || rc=$?
  printf '    %s: exit %d in %ds\n' "$name" "$rc" $((SECONDS - t)) | tee -a "$OUTDIR/summary.txt"
  tail -n 5 "$OUTDIR/$name.log" | sed 's/^/    | /'
  [ "$rc" = 0 ] || FAILED=1
  return "$rc"
}

note() {  # note TEXT: a line in the summary (a skipped step and why)
  echo "==> $*" | tee -a "$OUTDIR/summary.txt"
}

want() {  # want STEP: is STEP in $STEPS?
  case " ${STEPS//,/ } " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

gpu_present() {
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

cuda_built() {
  "$PY" -c 'import memattn, sys; sys.exit(0 if memattn.build_info()["cuda_built"] else 1)' \
    2>/dev/null
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
  echo "STEPS=$STEPS BENCH=$BENCH JOBS=$CMAKE_BUILD_PARALLEL_LEVEL MEMATTN_CUDA=${MEMATTN_CUDA:-<default>}"
  nvidia-smi
  "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  command -v nvcc && nvcc --version
  command -v compute-sanitizer && compute-sanitizer --version
} >"$OUTDIR/env.log" 2>&1

# ---- build and install -----------------------------------------------------------------------
if want install; then
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    run wheels "$PY" -m pip install --no-index --no-deps --find-links .whl .whl/*.whl
  fi
  CONFIG=()
  if [ -n "${MEMATTN_CUDA:-}" ]; then
    CONFIG=(--config-settings="cmake.define.MEMATTN_CUDA=$MEMATTN_CUDA")
  fi
  run install "$PY" -m pip install --no-build-isolation -v ${CONFIG[@]+"${CONFIG[@]}"} . \
    || { echo "install failed" >&2; exit 1; }
fi

# On a GPU machine the CUDA backend must have been built: fail the step (and say why) if not.
check_cuda_build() {
  "$PY" - <<'EOF'
import json, sys
import torch
import memattn
info = memattn.build_info()
print(json.dumps(info, indent=1))
if not torch.cuda.is_available():
    print("no CUDA GPU here: the CUDA backend is not required")
    sys.exit(0)
if not info["cuda_built"]:
    print(f"FAIL: a CUDA GPU is present but memattn was built without CUDA: {info['cuda_reason']}")
    sys.exit(1)
print(f"CUDA backend built; GPU: {torch.cuda.get_device_name()} "
      f"(sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
EOF
  local rc=$?
  if [ -f "$OUTDIR/install.log" ]; then
    echo "--- CUDA lines of install.log:"
    grep -i -E 'cuda|nvcc|sm_[0-9]+' "$OUTDIR/install.log" | head -n 40
  fi
  return $rc
}
run cuda_build check_cuda_build
run doctor "$PY" -m memattn.cli doctor
"$PY" -m memattn.cli doctor --json >"$OUTDIR/doctor.json" 2>>"$OUTDIR/doctor.log"

# ---- machine code: did the Hopper kernels get wgmma, and no local memory? --------------------
sass_report() {
  local so dump
  so="$("$PY" -c 'import memattn._memattn as m; print(m.__file__)')" || return 1
  dump="$(command -v cuobjdump || echo /usr/local/cuda/bin/cuobjdump)"
  "$dump" --dump-resource-usage "$so" >"$OUTDIR/sass_resources.txt" || return 1
  # One line per sm_90a function: instruction counts that tell the path it is on.
  "$dump" -sass -arch sm_90a "$so" | awk '
    /Function : / { if (name) print name, hgmma, hmma, ldl, stl; name = $3; hgmma = hmma = ldl = stl = 0 }
    /HGMMA/ { hgmma++ } / HMMA/ { hmma++ } /LDL/ { ldl++ } /STL/ { stl++ }
    END { if (name) print name, hgmma, hmma, ldl, stl }' |
    { echo "function HGMMA HMMA LDL STL"; cat; }
  # ptxas serializes wgmmas it cannot prove independent ("Potential Performance Loss").
  if grep -h "Potential Performance Loss" "$OUTDIR"/install.log 2>/dev/null; then
    echo "FAIL: ptxas serialized wgmma instructions (see above)"
    return 1
  fi
}
if want sass; then
  if cuda_built; then run sass sass_report; else note "sass: skipped (no CUDA build)"; fi
fi

# ---- tests: the CUDA ones first, then the rest ----------------------------------------------
if want pytest_cuda; then
  if gpu_present; then
    run pytest_cuda "$PY" -m pytest -p no:cacheprovider -m cuda -rs --maxfail=25 \
      --durations=25 --junitxml="$OUTDIR/pytest_cuda.xml" tests/python
  else
    note "pytest_cuda: skipped (no CUDA GPU)"
  fi
fi
if want pytest; then
  run pytest "$PY" -m pytest -p no:cacheprovider -m 'not cuda' -rs \
    --junitxml="$OUTDIR/pytest.xml" tests/python
fi

# ---- compute-sanitizer -----------------------------------------------------------------------
if want sanitize; then
  SANITIZER="$(command -v compute-sanitizer || true)"
  if [ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ]; then
    SANITIZER=/usr/local/cuda/bin/compute-sanitizer
  fi
  if ! gpu_present || ! cuda_built; then
    note "sanitize: skipped (no CUDA GPU, or memattn's CUDA backend is not built)"
  elif [ -z "$SANITIZER" ]; then
    note "sanitize: FAILED, compute-sanitizer not found (PATH, /usr/local/cuda/bin)"
    FAILED=1
  else
    FILTER=()
    if [ -n "${SANITIZER_KERNELS:-}" ]; then
      FILTER=(--kernel-name "kns=$SANITIZER_KERNELS")
    fi
    CASES=tests/python/cuda_sanitize_cases.py
    LIMIT="${SANITIZE_TIMEOUT:-1200}"
    # memcheck without torch's caching allocator: every tensor is its own allocation, so a read
    # or write past a tensor's end is out of bounds instead of landing in a cached neighbour.
    run sanitize_memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$LIMIT" "$SANITIZER" \
      --tool memcheck --error-exitcode 1 --print-limit 50 ${FILTER[@]+"${FILTER[@]}"} "$PY" "$CASES"
    # racecheck (shared-memory hazards) is the slow one: fp16 and bf16 instantiate the same
    # kernel code, so bf16 (tensor cores) and fp32 (SIMT) cover every kernel.
    run sanitize_racecheck timeout "$LIMIT" "$SANITIZER" \
      --tool racecheck --error-exitcode 1 --print-limit 50 ${FILTER[@]+"${FILTER[@]}"} "$PY" "$CASES" \
      --dtypes ${RACECHECK_DTYPES:-bf16 fp32}
  fi
fi

# ---- benchmarks ------------------------------------------------------------------------------
if want bench && [ "$BENCH" != none ]; then
  run bench_cpu_quick "$PY" -m memattn.cli bench --device cpu --quick --no-progress \
    --out-json "$OUTDIR/bench_cpu_quick.json" --results "$OUTDIR/bench_cpu_quick.md"
  if gpu_present && cuda_built; then
    run bench_cuda_quick "$PY" -m memattn.cli bench --device cuda --quick --no-progress \
      --out-json "$OUTDIR/bench_cuda_quick.json" --results "$OUTDIR/bench_cuda_quick.md"
    if [ "$BENCH" = full ]; then
      run bench_cuda "$PY" -m memattn.cli bench --device cuda --no-progress \
        --out-json "$OUTDIR/bench_cuda.json" --results "$OUTDIR/bench_cuda.md" \
        --plot "$OUTDIR/bench_cuda.png"
    fi
  else
    note "bench_cuda: skipped (no CUDA GPU, or memattn's CUDA backend is not built)"
  fi
fi
echo "overall: $([ $FAILED = 0 ] && echo PASS || echo FAIL)" | tee -a "$OUTDIR/summary.txt"
exit $FAILED
