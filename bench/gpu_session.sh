#!/usr/bin/env bash
# ONE command for a lent GPU machine (stock CUDA PyTorch image, no registry, no prefect/pydantic):
#   device tool: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#   on the CPU:  bash bench/gpu_session.sh --smoke
# Fill .whl/ first, here: bash scripts/gpu_wheels.sh. The image's own python3 is used (PYTHON=... to
# override); the wheels are installed with --no-deps into a target folder put first on PYTHONPATH
# (nothing in the image is changed). Every part's JSON lands in $OUT (else bench/results/gpu_session);
# see bench/gpu_session.py for the parts, their time caps and the verdicts. FACEPIPE_NO_WHEELS=1: skip the
# install (a python that has the packages already, e.g. the development venv for --smoke).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SITE=${FACEPIPE_SITE:-${TMPDIR:-/tmp}/facepipe-site}
if [ -z "${FACEPIPE_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  started=$(date +%s)
  if ! $PY -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile \
       --target "$SITE" --upgrade .whl/*.whl; then
    # no pip in the image: a wheel is a zip laid out for site-packages
    echo "gpu_session: pip install failed; unpacking the wheels into $SITE instead" >&2
    $PY -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .whl/*.whl \
      || { echo "gpu_session: cannot install .whl/*.whl into $SITE" >&2; exit 2; }
  fi
  echo "gpu_session: $(ls .whl/*.whl | wc -l) wheels installed into $SITE in $(( $(date +%s) - started )) s"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_session: no .whl/ here (bash scripts/gpu_wheels.sh makes it); using the python as it is"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import pydantic, torch; print(f'gpu_session: python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__}, pydantic {pydantic.VERSION}')" || exit 2
exec $PY -u bench/gpu_session.py "$@"
