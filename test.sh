#!/usr/bin/env bash
# The test command: installs into .venv when needed, then lint, type check and the test suite.
# Extra arguments go to pytest (e.g. ./test.sh tests/test_losses.py -x).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy harmonic workers service benchmarks
echo "== pytest"
pytest -q --durations=30 "$@"
