#!/usr/bin/env bash
# Creates/updates the project-local .venv; a no-op when pyproject.toml has not changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.hdet-install-stamp
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "bootstrap: installing HarmonicDet and its dependencies into .venv (first run takes a few minutes)" >&2
# torch/torchvision first and alone, so pip takes the pinned builds rather than resolving a newer one.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2
.venv/bin/python -m pip install -q -e ".[service,test]" >&2
echo "$want" > "$stamp"
