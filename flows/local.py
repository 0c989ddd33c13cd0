"""The local embedded default: a Prefect server on SQLite plus the process that serves both deployments.

    python -m flows.local up        # start server (127.0.0.1:4200) and deployment server, idempotent
    python -m flows.local status
    python -m flows.local down      # stop both cleanly

State lives under ``<data root>/prefect`` (database, results, logs, pid files); nothing is written to
``~/.prefect``. The API address for ``prefect ...`` commands run from the repository root comes from
``prefect.toml``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 4200


@dataclass(frozen=True)
class LocalStack:
    """Paths and address of one local Prefect stack."""

    data_root: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"

    @property
    def home(self) -> Path:
        return self.data_root / "prefect"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for the server, the deployment server and ``prefect`` CLI calls."""
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(self.home / "storage"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_API_HOST=self.host,
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_UI_API_URL=self.api_url,
            FACEPIPE_DATA_ROOT=str(self.data_root),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        )
        return env

    def pid_file(self, name: str) -> Path:
        return self.home / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"


def api_healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200 and json.loads(resp.read() or b"false") is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def _spawn(stack: LocalStack, name: str, argv: list[str]) -> subprocess.Popen:
    log = stack.log_file(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=stack.env(), stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    stack.pid_file(name).write_text(str(proc.pid))
    return proc


def _stop_pid(pid: int, grace_s: float = 20.0) -> None:
    """SIGINT the process group (Prefect stops cleanly on it), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            try:  # reap if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)


def start_server(stack: LocalStack, timeout_s: float = 180.0) -> None:
    """Start ``prefect server start`` on SQLite unless one already answers on the port."""
    if api_healthy(stack.api_url):
        return
    stack.home.mkdir(parents=True, exist_ok=True)
    proc = _spawn(stack, "server", [sys.executable, "-m", "prefect", "server", "start",
                                    "--host", stack.host, "--port", str(stack.port)])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if api_healthy(stack.api_url):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {proc.returncode}; see {stack.log_file('server')}")
        time.sleep(1.0)
    raise TimeoutError(f"Prefect server not healthy after {timeout_s:.0f}s; see {stack.log_file('server')}")


def deployments_registered(stack: LocalStack, names: list[str]) -> bool:
    for name in names:
        flow, dep = name.split("/")
        req = urllib.request.Request(f"{stack.api_url}/deployments/name/{flow}/{dep}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
    return True


DEPLOYMENTS = ["build-dataset/default", "train-and-eval/default"]


def start_serve(stack: LocalStack, timeout_s: float = 180.0) -> None:
    """Start ``python -m flows.serve`` (both deployments) unless ours is already running."""
    if _read_pid(stack.pid_file("serve")) and deployments_registered(stack, DEPLOYMENTS):
        return
    proc = _spawn(stack, "serve", [sys.executable, "-m", "flows.serve"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if deployments_registered(stack, DEPLOYMENTS):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"deployment server exited with code {proc.returncode}; see {stack.log_file('serve')}")
        time.sleep(1.0)
    raise TimeoutError(f"deployments not registered after {timeout_s:.0f}s; see {stack.log_file('serve')}")


def up(stack: LocalStack) -> None:
    start_server(stack)
    start_serve(stack)


def stop(stack: LocalStack, name: str) -> None:
    """Stop one of the stack's processes (``"serve"`` or ``"server"``) if it runs."""
    pid = _read_pid(stack.pid_file(name))
    if pid:
        _stop_pid(pid)
    stack.pid_file(name).unlink(missing_ok=True)


def down(stack: LocalStack) -> None:
    for name in ("serve", "server"):
        stop(stack, name)


def status(stack: LocalStack) -> dict[str, object]:
    return {
        "api": stack.api_url,
        "server_healthy": api_healthy(stack.api_url),
        "server_pid": _read_pid(stack.pid_file("server")),
        "serve_pid": _read_pid(stack.pid_file("serve")),
        "deployments": deployments_registered(stack, DEPLOYMENTS),
        "home": str(stack.home),
    }


def default_data_root() -> Path:
    return Path(os.environ.get("FACEPIPE_DATA_ROOT", REPO / "data")).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    stack = LocalStack(args.data_root.resolve(), args.port)
    if args.command == "up":
        up(stack)
        print(f"Prefect UI: {stack.ui_url}   (API {stack.api_url}; logs in {stack.home / 'logs'})")
    elif args.command == "down":
        down(stack)
        print("stopped")
    else:
        print(json.dumps(status(stack), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
