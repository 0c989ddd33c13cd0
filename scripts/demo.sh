#!/usr/bin/env bash
# The main job on the local embedded default: set up .venv, start a Prefect server (SQLite,
# 127.0.0.1:4200) and the process serving the deployments build-dataset/default and
# train-and-eval/default, then run both on the bundled sample. A second run is fast (all cached).
#   bash scripts/demo.sh         # run it; open http://127.0.0.1:4200 to watch
#   bash scripts/demo.sh stop    # stop the server and the deployment process
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "stop" ]; then
  exec .venv/bin/python -m flows.demo --stop
fi
bash scripts/setup.sh
exec .venv/bin/python -m flows.demo "$@"
