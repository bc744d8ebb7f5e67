#!/usr/bin/env bash
# The torch-free environment: `pip install nxtp_jax` without the convert extra, as a new user has it.
# `nxtp-tag --model=...` must convert the released .pth (read as data) and tag there.
#
#   bash .ci/notorch_env.sh         # create or update it (pip check must be clean, torch must be absent)
#   bash .ci/notorch_env.sh test    # ... then run tests/pretrained/test_notorch.py: the tiny release is written
#                                   # and served by the current environment (which has torch: the reference),
#                                   # and tagged by the torch-free one
#
# NXTP_NOTORCH_VENV chooses where it lives (default /tmp/venv-notorch).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NXTP_NOTORCH_VENV:-/tmp/venv-notorch}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q -e "$ROOT"
"$VENV/bin/pip" check
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "error: torch is importable in $VENV; this environment must not have it" >&2
    exit 1
fi

if [ "${1:-}" = "test" ]; then
    cd "$ROOT"
    NXTP_NOTORCH_PYTHON="$VENV/bin/python" JAX_PLATFORMS=cpu python -m pytest -q -p no:cacheprovider -n 0 tests/pretrained/test_notorch.py
fi
