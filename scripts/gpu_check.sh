#!/usr/bin/env bash
# On a GPU machine (no network; python3 with a CUDA build of torch preinstalled): builds and
# installs memattn into that python, runs the whole pytest suite including `-m cuda`, doctor and
# the quick benchmarks, and writes every log into OUTDIR. Keeps going after a failing step and
# exits non-zero if any step failed; OUTDIR/summary.txt lists each step's status.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Build requirements (scikit-build-core, nanobind) must be importable by python3 or lie as wheels
# in .whl/ (ignored by git; pass it along explicitly); the build runs with --no-build-isolation.
# OUTDIR holds about a dozen files: where only a few files can be brought back, pack them, e.g.
#   bash scripts/gpu_check.sh /tmp/gc; rc=$?; tar -czf "$OUT/gpu_check.tgz" -C /tmp gc; exit $rc
set -uo pipefail
OUTDIR="${1:?usage: scripts/gpu_check.sh OUTDIR}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-16}"
FAILED=0
: >"$OUTDIR/summary.txt"

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

{ nvidia-smi; "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'; } \
  >"$OUTDIR/env.log" 2>&1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  run wheels "$PY" -m pip install --no-index --no-deps --find-links .whl .whl/*.whl
fi
run install "$PY" -m pip install --no-build-isolation -v . || { echo "install failed" >&2; exit 1; }
run doctor "$PY" -m memattn.cli doctor
"$PY" -m memattn.cli doctor --json >"$OUTDIR/doctor.json" 2>>"$OUTDIR/doctor.log"
run pytest "$PY" -m pytest -p no:cacheprovider -m 'cuda or not cuda' -rs \
  --junitxml="$OUTDIR/pytest.xml" tests/python
run bench_cpu_quick "$PY" -m memattn.cli bench --device cpu --quick --no-progress \
  --out-json "$OUTDIR/bench_cpu_quick.json" --results "$OUTDIR/bench_cpu_quick.md"
if "$PY" -c 'import memattn, sys; sys.exit(0 if memattn.build_info()["cuda_built"] else 1)' 2>/dev/null; then
  run bench_cuda_quick "$PY" -m memattn.cli bench --device cuda --quick --no-progress \
    --out-json "$OUTDIR/bench_cuda_quick.json" --results "$OUTDIR/bench_cuda_quick.md"
else
  echo "==> bench_cuda_quick: skipped (memattn's CUDA backend is not built)" | tee -a "$OUTDIR/summary.txt"
fi
echo "overall: $([ $FAILED = 0 ] && echo PASS || echo FAIL)" | tee -a "$OUTDIR/summary.txt"
exit $FAILED
