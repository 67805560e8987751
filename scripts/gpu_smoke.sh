#!/usr/bin/env bash
# GPU smoke test of this node, at most 5 minutes on one GPU: environment, half-precision geometry,
# every arch x {standard, harmonicdet} trained 20 AMP steps at 320 px, a 2-GPU DDP step, one table.
# Without a GPU it says so and exits 0. Options: scripts/gpu_smoke.sh --help (scripts/gpu_smoke.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$root/.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3)"
# the hard stop of the 5 minutes; the script itself starts no training after --budget-s (230 s)
exec timeout --kill-after=10 300 "$python" "$root/scripts/gpu_smoke.py" "$@"
