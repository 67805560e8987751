#!/usr/bin/env bash
# The main job on the local embedded stack: the standard loss against the paper's defaults and a
# small search over alpha, on 5 seeds, on generated data, tracked in a local MLflow (sqlite) store.
# Extra arguments go to `hdet run` (e.g. ./demo.sh --resume).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
spec=${HDET_DEMO_SPEC:-configs/demo.yaml}
hdet run "$spec" "$@"
home=${HDET_HOME:-$PWD/.hdet}
echo
echo "Open the results in the MLflow UI:"
echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///$home/mlflow/mlflow.db --host 127.0.0.1 --port 5000"
