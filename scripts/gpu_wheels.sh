#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine's stock CUDA image lacks, for CPython 3.12
# manylinux x86-64, so that bench/gpu_session.sh can install them there with --no-deps (that machine
# reaches no package registry; carry them with the device tool: run(carry=[".whl"])).
#
#   bash scripts/gpu_wheels.sh            # download (PyPI must be reachable from here), list, print the total
#   PIP="python3 -m pip" bash scripts/gpu_wheels.sh
#
# The image has: python3 3.12, torch 2.11 + cu130, torchvision 0.26, triton, opencv-python-headless,
# numpy, pandas, pyarrow, onnx, onnxruntime, tensorboard, pyyaml, scipy, scikit-learn, pytest (and
# pillow, a torchvision requirement). What our engine imports besides those:
#   pydantic + pydantic-core + annotated-types + typing-inspection + typing-extensions (config models),
#   facenet-pytorch (MTCNN weights and the plain loop of bench/align.py; installed --no-deps: its
#   metadata pins an old torch), requests + urllib3 + idna + charset-normalizer + certifi (imported by
#   facenet_pytorch at import time, never used to download here).
# Versions are those of the development venv (keep them in step with it). Total: well under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-"$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3) -m pip"}  # the project venv (scripts/setup.sh) when there is one
OUT=.whl
WHEELS=(
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "facenet-pytorch==2.5.3"
  "requests==2.34.2" "urllib3==2.8.0" "idna==3.20" "charset-normalizer==3.5.3" "certifi==2026.10.19.post1"
)
mkdir -p "$OUT"
$PIP download --quiet --disable-pip-version-check --dest "$OUT" --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# anything else lying in .whl (an older version) would be installed too: keep exactly the listed ones
python3 - "$OUT" "${WHEELS[@]}" <<'PY'
import re, sys
from pathlib import Path
out, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
keep = {(norm(w.split("==")[0]), w.split("==")[1]) for w in wanted}
for whl in sorted(out.glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    if (norm(name), version) not in keep:
        print(f"removing {whl.name} (not in the list)")
        whl.unlink()
missing = keep - {(norm(w.name.split("-")[0]), w.name.split("-")[1]) for w in out.glob("*.whl")}
if missing:
    sys.exit(f"missing wheels: {sorted(missing)}")
PY
ls -l "$OUT"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($(python3 -c "print(round($total / 2**20, 2))") MiB) in $(ls "$OUT"/*.whl | wc -l) wheels"
if [ "$total" -gt $((48 * 1024 * 1024)) ]; then echo "error: more than 48 MiB of wheels" >&2; exit 1; fi
