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


import socket  # noqa: E402

import pytest  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real ``prefect server start`` (SQLite, loopback, free port) for this test session.

    Yields the :class:`flows.local.LocalStack`; inside the fixture this process's Prefect client
    points at it. Stopped (and its process group killed) at the end of the session.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.local import LocalStack, down, start_server

    stack = LocalStack(tmp_path_factory.mktemp("prefect-data"), free_port())
    start_server(stack, timeout_s=240)
    old = os.environ["PREFECT_API_URL"]
    os.environ["PREFECT_API_URL"] = stack.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
            yield stack
            _drain_prefect_clients()
    finally:
        os.environ["PREFECT_API_URL"] = old
        down(stack)


def _drain_prefect_clients() -> None:
    """Send the queued run logs and events while the server still answers; otherwise the client
    retries them against the stopped server at interpreter exit (measured: over a minute)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
