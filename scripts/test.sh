#!/usr/bin/env bash
# Set up .venv and run the test suite. Extra arguments go to pytest (e.g. -k recordio).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# System tools some tests drive: Debian's Chromium (Prefect UI test) and docker-compose (validates
# docker-compose.yml without an engine). Without them those tests are skipped with a reason.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "facepipe: installing ${missing[*]} from Debian"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "facepipe: could not install ${missing[*]}; the tests that need them will be skipped"
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "facepipe: pytest collected no tests (exit 5); nothing failed"
  rc=0
fi
exit "$rc"
