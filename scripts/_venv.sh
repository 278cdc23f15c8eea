# Sourced by scripts/demo.sh and scripts/test.sh: makes the virtual environment and installs a
# pinned PyTorch into it. Not meant to be run on its own.
#
# Settings (environment variables, all optional):
#   PYTHON             the interpreter to build the venv from (default: python3)
#   MEMATTN_VENV       where the venv lives (default: .venv in the repository root)
#   MEMATTN_TORCH      the torch requirement to install (default: torch==2.13.0)
#   TORCH_PIP_ARGS     extra pip arguments for that install, e.g. an --index-url of PyTorch's
#                      CPU-only wheels on a machine where PyPI's torch is the large CUDA build

MEMATTN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
MEMATTN_VENV="${MEMATTN_VENV:-$MEMATTN_ROOT/.venv}"
MEMATTN_TORCH="${MEMATTN_TORCH:-torch==2.13.0}"

log() {
  if [ -t 2 ]; then printf '\033[1m==> %s\033[0m\n' "$*" >&2; else printf '==> %s\n' "$*" >&2; fi
}

# setup_venv: create (or reuse) the venv, activate it, and make sure torch imports.
# When the base interpreter already imports torch, the venv sees it (--system-site-packages)
# instead of installing a second copy of PyTorch.
setup_venv() {
  if [ -x "$MEMATTN_VENV/bin/python" ] && ! "$MEMATTN_VENV/bin/python" -c '' 2>/dev/null; then
    log "removing broken venv $MEMATTN_VENV"
    rm -rf "$MEMATTN_VENV"
  fi
  if [ ! -x "$MEMATTN_VENV/bin/python" ]; then
    if "$PYTHON" -c 'import torch' 2>/dev/null; then
      log "creating $MEMATTN_VENV (reusing the torch that $PYTHON already has)"
      "$PYTHON" -m venv --system-site-packages "$MEMATTN_VENV"
    else
      log "creating $MEMATTN_VENV"
      "$PYTHON" -m venv "$MEMATTN_VENV"
    fi
  fi
  # shellcheck disable=SC1091
  . "$MEMATTN_VENV/bin/activate"
  if python -c 'import torch' 2>/dev/null; then
    log "torch $(python -c 'import torch; print(torch.__version__)') is already importable"
  else
    log "installing $MEMATTN_TORCH"
    # shellcheck disable=SC2086
    python -m pip install --quiet ${TORCH_PIP_ARGS:-} "$MEMATTN_TORCH"
  fi
}
