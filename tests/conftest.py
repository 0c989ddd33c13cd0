"""Test-wide settings: every test runs against throw-away Prefect state and a temporary data root."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Real photos bundled with the repo (copy of the workplace's shared/data/faces, licences inside).
FACES = Path(os.environ.get("FACEPIPE_FACES", ROOT / "sample" / "faces"))

# Isolate Prefect before anything imports it: no writes to ~/.prefect, no implicit ephemeral server
# sharing state with a user's, no analytics (no network here).
_prefect_home = Path(tempfile.mkdtemp(prefix="facepipe-test-prefect-"))
os.environ["PREFECT_HOME"] = str(_prefect_home)
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_prefect_home / "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")
# prefect.toml points `prefect` commands at the demo server; tests must never reach it. A test that
# needs a server uses the `prefect_server` fixture, which sets the address of its own server.
os.environ["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
# Subprocesses started by tests (torchrun, prefect workers, mxnet venv scripts) import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
# Keep the 2-core CI machine responsive: torch intra-op threads per process.
os.environ.setdefault("OMP_NUM_THREADS", "2")
