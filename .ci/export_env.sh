#!/usr/bin/env bash
# The export environments, apart from the main one (jax2onnx pins orbax-checkpoint<0.11.37):
#   export env  nxtp_jax[onnx,savedmodel,convert] + pytest: exporters, JAX references, torch fixtures
#   ort env     onnxruntime numpy pillow sentencepiece absl-py, and nxtp_jax installed without its
#               dependencies (so no JAX): convert/onnx_infer.py must run there
#
#   bash .ci/export_env.sh         # create or update both environments (pip check must be clean)
#   bash .ci/export_env.sh test    # ... then run tests/export in the export env
#
# NXTP_EXPORT_VENV / NXTP_ORT_VENV choose where they live (default /tmp/venv-export, /tmp/venv-ort),
# NXTP_TORCH the torch requirement of the export env (default torch==2.13.0, the CPU wheel).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXPORT_VENV="${NXTP_EXPORT_VENV:-/tmp/venv-export}"
ORT_VENV="${NXTP_ORT_VENV:-/tmp/venv-ort}"
PYTHON="${PYTHON:-python3}"

# The CPU build of torch first (the torch fixtures need no more): left to the resolver, the
# convert extra's torch>=2.1 picks the newest release, a CUDA build of several GB.
TORCH="${NXTP_TORCH:-torch==2.13.0}"

[ -x "$EXPORT_VENV/bin/python" ] || "$PYTHON" -m venv "$EXPORT_VENV"
"$EXPORT_VENV/bin/pip" install -q "$TORCH"
"$EXPORT_VENV/bin/pip" install -q -e "$ROOT[onnx,savedmodel,convert]" pytest pytest-xdist
"$EXPORT_VENV/bin/pip" check

[ -x "$ORT_VENV/bin/python" ] || "$PYTHON" -m venv "$ORT_VENV"
"$ORT_VENV/bin/pip" install -q onnxruntime numpy pillow sentencepiece absl-py
# An earlier run's nxtp_jax (installed without its dependencies) would fail the check: out first.
"$ORT_VENV/bin/pip" uninstall -q -y nxtp_jax
"$ORT_VENV/bin/pip" check
# After the check, which would list nxtp_jax's dependencies as missing: the runner needs none of them.
"$ORT_VENV/bin/pip" install -q --no-deps -e "$ROOT"

if [ "${1:-}" = "test" ]; then
    cd "$ROOT"
    NXTP_ORT_PYTHON="$ORT_VENV/bin/python" JAX_PLATFORMS=cpu \
        "$EXPORT_VENV/bin/python" -m pytest -q -p no:cacheprovider -n 0 tests/export
fi
