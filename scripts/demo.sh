#!/usr/bin/env bash
# Sets up memattn on a fresh machine and runs its demo:
#   1. a virtual environment at .venv (see scripts/_venv.sh for the settings),
#   2. torch==2.13.0 unless torch is already importable,
#   3. `pip install .` (builds the C++ core; a few minutes on 2 cores),
#   4. `memattn demo` with any arguments given to this script (e.g. --device cpu, --json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/_venv.sh
. scripts/_venv.sh

setup_venv
log "pip install . (builds the C++ extension)"
python -m pip install --quiet .
log "memattn demo $*"
memattn demo "$@"
