#!/usr/bin/env bash
# Sets up memattn with its test tools and runs every check CI runs (this is .ci/run):
#   1. .venv with torch==2.13.0 (unless torch is importable) and `pip install '.[test]'`
#   2. ruff check + ruff format --check over python/ and tests/
#   3. clang-format --dry-run -Werror over include/ src/ tests/cpp (clang-format from the pinned
#      pip package); src/cuda/sm90/wgmma_ops.cuh is what scripts/gen_wgmma.py writes
#   4. the C++ core with GoogleTest (warnings are errors), run by ctest
#   5. pytest (CPU; `-m cuda` tests are deselected here and run on a GPU machine)
# Any argument is passed to pytest (e.g. -x, -k NAME).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh

JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
T_START=$SECONDS
declare -a TIMES=()
step_done() { TIMES+=("$(printf '%-28s %5ds' "$1" $((SECONDS - $2)))"); }

t=$SECONDS
setup_venv
log "pip install '.[test]' (builds the C++ extension)"
# Warnings are errors for the extension too (the ctest build below covers the core alone).
python -m pip install --quiet --config-settings=cmake.define.CMAKE_COMPILE_WARNING_AS_ERROR=ON \
  '.[test]'
step_done "setup + pip install" "$t"

t=$SECONDS
log "ruff"
ruff check python tests bench
ruff format --check python tests bench
step_done "ruff" "$t"

t=$SECONDS
log "clang-format (and the generated wgmma wrappers are current)"
python scripts/gen_wgmma.py --check
mapfile -t CXX_FILES < <(find include src tests/cpp -type f \
  \( -name '*.h' -o -name '*.hpp' -o -name '*.cpp' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' \) \
  2>/dev/null | sort)
if [ "${#CXX_FILES[@]}" -gt 0 ]; then
  clang-format --version
  clang-format --dry-run -Werror "${CXX_FILES[@]}"
fi
step_done "clang-format" "$t"

t=$SECONDS
log "C++ core + GoogleTest"
if [ ! -f /usr/include/gtest/gtest.h ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing GoogleTest (Debian's libgtest-dev)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
  else
    echo "GoogleTest is missing: install libgtest-dev (or run as root to let this script do it)" >&2
    exit 1
  fi
fi
if ! command -v cmake >/dev/null; then
  python -m pip install --quiet 'cmake>=3.24' ninja
fi
GEN=()
if command -v ninja >/dev/null; then GEN=(-G Ninja); fi
if [ -f build/cpp/CMakeCache.txt ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GEN[1]:-Unix Makefiles}" build/cpp/CMakeCache.txt; then
  rm -rf build/cpp
fi
cmake -S . -B build/cpp "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DMEMATTN_BUILD_TESTS=ON -DCMAKE_COMPILE_WARNING_AS_ERROR=ON >/dev/null
cmake --build build/cpp -j "$JOBS"
ctest --test-dir build/cpp --output-on-failure -j "$JOBS"
step_done "C++ build + ctest" "$t"

t=$SECONDS
log "pytest"
# `import memattn` finds the installed package (the source lives in python/, not on sys.path).
python -m pytest -p no:cacheprovider "$@"
step_done "pytest" "$t"

log "all checks passed in $((SECONDS - T_START)) s"
printf '  %s\n' "${TIMES[@]}" >&2
