"""A separate virtual environment with real MXNet 1.9.1, used as an interoperability oracle.

MXNet 1.9.1 needs ``numpy<1.24``, so it can never live in the project's own environment. This
module builds ``${XDG_CACHE_HOME:-~/.cache}/facepipe/mxnet-1.9.1-py<major><minor>/`` once with
``pip install numpy==1.23.5 mxnet==1.9.1`` (from the package index), guarded by a lock file so that
parallel pytest runs do not race, and runs helper scripts in it.

If the environment cannot be built (no index, no wheel for this Python), :func:`mxnet_python`
raises :class:`MXNetUnavailable` carrying pip's error; the pytest fixture turns that into a SKIP
with the reason, never a silent pass. A failed build is remembered for an hour (``FAILED`` file in
the cache folder) so a test session does not retry pip for every test module.

Usable from tests (``mxnet_python`` fixture) and from ``bench/`` scripts (:func:`run_script`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

MXNET_VERSION = "1.9.1"
REQUIREMENTS = ("numpy==1.23.5", f"mxnet=={MXNET_VERSION}")
FAILURE_TTL_S = 3600
READY = "READY"
FAILED = "FAILED"


class MXNetUnavailable(RuntimeError):
    """The MXNet environment could not be built or imported; the message says why."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "facepipe" / f"mxnet-{MXNET_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _base_python() -> str:
    """The interpreter to build the venv from: the base of the running venv, same version."""
    base = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return base if os.path.exists(base) else sys.executable


def _build(venv: Path) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    steps = [
        [_base_python(), "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-input", *REQUIREMENTS],
        [str(venv / "bin" / "python"), "-c", "import mxnet, numpy; print(mxnet.__version__, numpy.__version__)"],
    ]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
            raise MXNetUnavailable(f"`{' '.join(cmd[-4:])}` failed (exit {proc.returncode}): " + "\n".join(tail))


def mxnet_python() -> Path:
    """Path of the python executable of the MXNet venv, building the venv on first use."""
    venv = cache_dir()
    python = venv / "bin" / "python"
    lock = venv.with_name(venv.name + ".lock")
    failed = venv.with_name(venv.name + "." + FAILED)
    with _locked(lock):
        if (venv / READY).exists() and python.exists():
            return python
        if failed.exists() and time.time() - failed.stat().st_mtime < FAILURE_TTL_S:
            raise MXNetUnavailable(failed.read_text(encoding="utf-8"))
        try:
            _build(venv)
        except (MXNetUnavailable, OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            failed.write_text(
                f"MXNet {MXNET_VERSION} environment could not be built (remembered for {FAILURE_TTL_S // 60} min; "
                f"delete {failed} to retry now): {exc}", encoding="utf-8")
            raise MXNetUnavailable(failed.read_text(encoding="utf-8")) from exc
        failed.unlink(missing_ok=True)
        (venv / READY).write_text(json.dumps({"requirements": REQUIREMENTS, "built": time.time()}))
        return python


def run_script(code: str, *args: str, timeout: float = 600, python: Path | None = None) -> str:
    """Run ``code`` with the MXNet venv's python (arguments in ``sys.argv[1:]``); return stdout.

    Raises ``RuntimeError`` with the script's stderr if it exits non-zero. ``PYTHONPATH`` is cleared
    so the script cannot import this project's packages by accident (they need numpy 2).
    """
    python = python or mxnet_python()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("MXNET_ENGINE_TYPE", "NaiveEngine")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [str(python), "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"MXNet helper script failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def pytest_fixture():
    """Session fixture factory: ``mxnet_python = mxnet_env.pytest_fixture()`` in a test module."""
    import pytest

    @pytest.fixture(scope="session")
    def mxnet_python_fixture() -> Path:
        try:
            return mxnet_python()
        except MXNetUnavailable as exc:
            pytest.skip(str(exc))

    return mxnet_python_fixture


if __name__ == "__main__":  # python tests/mxnet_env.py: build (or find) the venv and print its python
    print(mxnet_python())
