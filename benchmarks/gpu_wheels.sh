#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs and a bare GPU machine (torch, transformers, PEFT;
# no network) may lack: longtune's config is pydantic. Run here, where PyPI is reachable; the
# wheels land in benchmarks/wheels/ (ignored by git, carried to the GPU machine), then there:
#   pip install --no-index --find-links benchmarks/wheels pydantic
set -euo pipefail
cd "$(dirname "$0")"
PY=${GPU_PYTHON_VERSION:-3.12}
python3 -m pip download --quiet --dest wheels --only-binary=:all: \
    --python-version "$PY" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "pydantic>=2.7,<3"
ls wheels
