#!/usr/bin/env bash
# The main job on the local embedded stack, through the REST service: `hdet serve` starts a Ray head,
# an MLflow server and the API on 127.0.0.1; `hdet submit --follow` sends configs/demo.yaml (the
# standard loss against the paper's defaults and a small search over alpha, on 5 seeds, on generated
# data) and streams its log; `hdet results` prints its evidence; then what was started stops.
# --keep leaves the service running and prints how to stop it; HDET_DEMO_SPEC names another spec.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
spec=${HDET_DEMO_SPEC:-configs/demo.yaml}
keep=0
[ "${1:-}" = "--keep" ] && keep=1
export HDET_HOME=${HDET_HOME:-$PWD/.hdet}
mkdir -p "$HDET_HOME"
port=$(python -c 'from service.stack import free_port; print(free_port())')
export HDET_API_URL=http://127.0.0.1:$port
log=$HDET_HOME/demo-serve.log
hdet serve --port "$port" >"$log" 2>&1 &
serve=$!
stop() { kill -INT "$serve" 2>/dev/null && wait "$serve" 2>/dev/null || true; }
[ "$keep" = 1 ] || trap stop EXIT
echo "Starting the service (Ray head, MLflow server, API on $HDET_API_URL; log $log)"
until hdet status --limit 1 >/dev/null 2>&1; do
  kill -0 "$serve" 2>/dev/null || { cat "$log"; echo "demo: hdet serve did not start" >&2; exit 1; }
  sleep 2
done
out=$HDET_HOME/demo-submit.log
rc=0
hdet submit "$spec" --follow | tee "$out" || rc=$?
id=$(sed -n "s/^Experiment '\(exp-[0-9a-f]*\)' submitted.*/\1/p" "$out" | head -n 1)
if [ -n "$id" ]; then
  echo
  hdet results "$id" || true
fi
mlflow=$(sed -n 's/^MLflow *\(http[^ ]*\).*/\1/p' "$log" | head -n 1)
echo
echo "Open the results in the MLflow UI: $mlflow (while the service runs), or afterwards"
echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///$HDET_HOME/mlflow/mlflow.db --host 127.0.0.1 --port 5000"
if [ "$keep" = 1 ]; then
  echo "The service keeps running (pid $serve, API $HDET_API_URL); stop it with: kill -INT $serve"
fi
exit "$rc"
