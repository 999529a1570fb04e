#!/usr/bin/env bash
# longtune's two set-up commands (README "Quickstart"):
#   bash dev.sh demo   # run the main job (finetune) on the embedded default
#   bash dev.sh test   # run the test suite
# Both create .venv and install what they need on first use. Without a GPU, PyTorch's CPU
# build is installed first (torch==2.13.0): an unpinned torch on a CPU box pulls gigabytes
# of CUDA packages. With nvidia-smi present: the regular wheels and the [gpu] extra.
# Extra arguments go to the job (demo) or to pytest (test).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${LONGTUNE_VENV:-.venv}
STAMP="$VENV/.installed"

# setuptools warns on every editable install that a folder named like the package may shadow
# it (the checkout is that folder, on purpose): noise in a user's first run
EDITABLE_QUIET=(env PYTHONWARNINGS=ignore)

install() {
    if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
        return
    fi
    echo "[dev.sh] setting up $VENV (first use or pyproject.toml changed)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install --quiet torch
        "${EDITABLE_QUIET[@]}" "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
        # flash-attn builds against the torch just installed
        "${EDITABLE_QUIET[@]}" "$VENV/bin/python" -m pip install --quiet --no-build-isolation -e ".[gpu]" ||
            echo "[dev.sh] flash-attn did not install; S2-Attn will use torch SDPA"
    else
        "$VENV/bin/python" -m pip install --quiet "torch==${LONGTUNE_TORCH_VERSION:-2.13.0}"
        "${EDITABLE_QUIET[@]}" "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    fi
    touch "$STAMP"
}

case "${1:-}" in
    demo)
        shift
        install
        exec "$VENV/bin/python" pipelines/finetune.py "$@"
        ;;
    test)
        shift
        install
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
