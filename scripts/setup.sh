#!/usr/bin/env bash
# Create .venv with facepipe and everything it needs. Idempotent: a second run with an unchanged
# pyproject.toml returns at once.
#   bash scripts/setup.sh            # project + test extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.facepipe-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "facepipe: installing into .venv (torch, prefect, facenet-pytorch, ...; a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" > "$stamp"
fi
.venv/bin/python - <<'PY'
import datasets, pathlib, sys
root = pathlib.Path.cwd().resolve()
if root not in pathlib.Path(datasets.__file__).resolve().parents:
    sys.exit(f"facepipe: 'import datasets' resolves to {datasets.__file__}, not this project; remove that package from .venv")
PY
