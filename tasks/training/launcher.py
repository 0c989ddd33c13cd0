"""Training in a child process: ``run_training(cfg, nproc)`` runs the trainer (``python -m tasks.training``) and owns it.

The child is ``python -m tasks.training --config <output>/train_config.yaml`` for one process, or
``python -m torch.distributed.run --standalone --nproc-per-node N -m tasks.training ...`` (torchrun) for
several, started in its own session (``start_new_session=True``). Its output is streamed into the
run logger: warnings, errors and other lines as they come, progress lines (``step i/n ...``) at most
every ``log_every_s`` seconds.

Cleanup (prefect-notes section 7): whatever ends the call -- success, failure, timeout, a cancelled
flow run (Prefect turns the runner's SIGTERM into an exception in the flow process) or Ctrl-C -- the
``finally`` block stops the child's whole process tree: SIGTERM first (the trainer then saves a
checkpoint at its next log point), SIGKILL after ``grace_s`` seconds. The tree, not just the
process group: torchrun starts every worker in a *new session*, so killing torchrun's group alone
would leave the ranks running. Backstops for a parent that is killed outright (SIGKILL, so no
``finally``): the child is started with ``PR_SET_PDEATHSIG`` = SIGTERM (a two-line launcher sets it
and then execs the command), the ranks set it too against torchrun's death (``tasks.training.trainer``), and
``<output>/train.pid`` names the child while it runs.

``slot`` is a context manager held while the child runs (the train stage passes one slot of
Prefect's ``gpu`` concurrency limit on CUDA).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datasets.atomic import atomic_write_text
from datasets.locks import FolderLock, folder_lock
from tasks.runtime import Progress, in_run, logger, publish_markdown, publish_table
from tasks.training.config import TrainConfig
from tasks.training.record import read_metrics, read_status

__all__ = ["TrainingRun", "run_training", "training_command", "stop_process_tree", "CONFIG_FILE"]

CONFIG_FILE = "train_config.yaml"
PID_FILE = "train.pid"
_ROOT = Path(__file__).resolve().parents[2]
_PROGRESS = re.compile(r"rank\d+: step \d+/\d+ ")
_STEP = re.compile(r"step (\d+)/(\d+)")
_RESULT = "result: "


@dataclass
class TrainingRun:
    """What :func:`run_training` returns: the run folder, its checkpoints and best verification result."""

    output: Path
    command: list[str]
    returncode: int
    step: int
    state: str
    last_checkpoint: str | None
    best_checkpoint: str | None
    best: dict[str, Any] | None
    checkpoints: list[str] = field(default_factory=list)
    final_loss: float | None = None
    samples_per_s: float | None = None
    wall_s: float = 0.0


# Run argv[1:] after asking the kernel for SIGTERM when the parent (this Python process) dies; exit at once if
# it already has. Linux keeps the death signal across execve, so torchrun / tasks.training.trainer inherit it.
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(os.environ['FACEPIPE_TRAIN_PARENT']):\n"
    "    sys.exit('training launcher: the parent process is gone')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def training_command(config_path: str | os.PathLike, nproc: int, python: str = sys.executable) -> list[str]:
    """The child's argv: plain ``python -m tasks.training`` for one process, torchrun for several."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return [python, "-m", "tasks.training", "--config", str(config_path)]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "tasks.training", "--config", str(config_path)]


# --- process trees ------------------------------------------------------------------------------------------

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc``), parents first."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def _signal_all(pids: list[int], sig: int) -> None:
    groups = set()
    for p in pids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(p))
    for g in groups:
        if g > 1 and g != os.getpgrp():
            with contextlib.suppress(OSError):
                os.killpg(g, sig)
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, sig)


def stop_process_tree(pid: int, grace_s: float = 30.0, popen: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM ``pid``'s whole tree (and the process groups its members lead), SIGKILL what is left after
    ``grace_s`` seconds. Returns the pids that were signalled. ``popen`` is reaped if given."""
    pids = [p for p in process_tree(pid) if alive(p)]
    if not pids:
        if popen is not None:
            popen.poll()
        return []
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.1)
    survivors = [p for p in set(pids) | set(process_tree(pid)) if alive(p)]
    if survivors:
        _signal_all(survivors, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)
    return pids


def _reader(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line.rstrip("\n"))
    lines.put(None)


class _LogForwarder:
    """Child output -> run logger; progress lines throttled, everything else forwarded at its level."""

    def __init__(self, log_every_s: float, progress_key: str = "train-progress"):
        self.log = logger()
        self.progress_key = progress_key
        self.progress: Progress | None = None
        self.every = log_every_s
        self.last_progress = 0.0
        self.pending: str | None = None
        self.tail: list[str] = []
        self.result: dict[str, Any] | None = None

    def __call__(self, line: str) -> None:
        if line.startswith(_RESULT):
            with contextlib.suppress(json.JSONDecodeError):
                self.result = json.loads(line[len(_RESULT):])
            return
        self.tail = (self.tail + [line])[-40:]
        if _PROGRESS.search(line) and " WARNING " not in line:
            now = time.monotonic()
            if now - self.last_progress < self.every:
                self.pending = line
                return
            self.last_progress, self.pending = now, None
            self._show_progress(line)
        if " ERROR " in line or line.startswith(("error:", "Traceback")) or "Error:" in line:
            self.log.error("%s", line)
        elif " WARNING " in line or "Warning" in line:
            self.log.warning("%s", line)
        else:
            self.log.info("%s", line)

    def _show_progress(self, line: str) -> None:
        """Training steps as a progress artifact in the UI (inside a Prefect run)."""
        step, total = (int(v) for v in _STEP.search(line).groups())  # type: ignore[union-attr]
        if self.progress is None:
            if not in_run():
                return
            self.progress = Progress(self.progress_key, total, description="training steps", log_every_s=float("inf"))
        self.progress.update(step)

    def flush(self) -> None:
        if self.pending:
            self.log.info("%s", self.pending)
            self._show_progress(self.pending)
            self.pending = None


def run_training(cfg: TrainConfig, nproc: int = 1, *, timeout_s: float | None = None, grace_s: float = 30.0,
                 log_every_s: float = 5.0, slot: contextlib.AbstractContextManager | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> TrainingRun:
    """Train ``cfg`` in a child process (``nproc`` ranks via torchrun when > 1) and wait for it.

    Raises ``TimeoutError`` after ``timeout_s`` seconds and ``RuntimeError`` (with the child's last
    error lines) when it exits non-zero; in every case the child's process tree is gone on return.
    Publishes a metrics table artifact when run inside Prefect.
    """
    if not cfg.output:
        raise ValueError("option 'output' is empty: run_training needs a run folder")
    output = Path(cfg.output).resolve()
    # The run folder's lock, held until the child is gone and handed to it (a second launcher or
    # trainer on this folder fails at once with FolderBusy, before touching config.yaml or the pid file).
    with folder_lock(output, "training") as lock:
        return _run_training_locked(cfg, output, lock, nproc, timeout_s=timeout_s, grace_s=grace_s,
                                    log_every_s=log_every_s, slot=slot, env=env, python=python)


def _run_training_locked(cfg: TrainConfig, output: Path, lock: FolderLock, nproc: int, *, timeout_s: float | None,
                         grace_s: float, log_every_s: float, slot: contextlib.AbstractContextManager | None,
                         env: dict[str, str] | None, python: str) -> TrainingRun:
    config_path = output / CONFIG_FILE
    atomic_write_text(config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    device = cfg.resolve_device()
    command = training_command(config_path, nproc, python)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    child_env["PYTHONUNBUFFERED"] = "1"
    lock_env, lock_fds = lock.child_env()
    child_env.update(lock_env)
    if nproc > 1 and device == "cpu":
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log = logger()
    forward = _LogForwarder(log_every_s, f"train-progress-{output.name}")
    started = time.monotonic()
    with slot if slot is not None else contextlib.nullcontext():
        log.info("training: %s", " ".join(command))
        argv = command
        if sys.platform.startswith("linux"):  # backstop: the child gets SIGTERM if this process is killed outright
            argv = [python, "-c", _EXEC_WITH_PDEATHSIG, *command]
            child_env["FACEPIPE_TRAIN_PARENT"] = str(os.getpid())
        proc = subprocess.Popen(argv, cwd=str(_ROOT), env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True, pass_fds=lock_fds)
        pid_file = output / PID_FILE
        atomic_write_text(pid_file, str(proc.pid))
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_reader, args=(proc.stdout, lines), name="train-output", daemon=True)
        reader.start()
        try:
            while True:
                if timeout_s is not None and time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"training in {output} ran longer than {timeout_s:g} s and was stopped")
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    break
                forward(line)
            proc.wait()
        finally:
            stop_process_tree(proc.pid, grace_s, popen=proc)
            reader.join(timeout=5)
            while not lines.empty():
                line = lines.get_nowait()
                if line is not None:
                    forward(line)
            forward.flush()
            with contextlib.suppress(FileNotFoundError):
                pid_file.unlink()
    if proc.returncode != 0:
        errors = [l for l in forward.tail if "error" in l.lower() or "Error" in l or "Traceback" in l] or forward.tail[-5:]
        raise RuntimeError(f"training in {output} failed (exit code {proc.returncode}): " + " | ".join(errors[-6:]))
    status = read_status(output) or {}
    result = forward.result or {}
    run = TrainingRun(output=output, command=command, returncode=proc.returncode,
                      step=int(result.get("step", status.get("step", 0))), state=result.get("state", status.get("state", "")),
                      last_checkpoint=result.get("last_checkpoint", status.get("last_checkpoint")),
                      best_checkpoint=result.get("best_checkpoint"), best=result.get("best", status.get("best")),
                      checkpoints=result.get("checkpoints", status.get("checkpoints", [])),
                      final_loss=result.get("final_loss"), samples_per_s=result.get("samples_per_s"),
                      wall_s=time.monotonic() - started)
    _publish(run)
    return run


def _publish(run: TrainingRun) -> None:
    """Metrics table (verification rows, else the last training rows) and a summary as Prefect artifacts."""
    if not in_run():
        return
    frame = read_metrics(run.output)
    if len(frame):
        rows = frame[frame["kind"] == "val"] if (frame["kind"] == "val").any() else frame.tail(50)
        rows = rows.dropna(axis=1, how="all")
        publish_table(f"train-metrics-{run.output.name}", rows.to_dict("records"),
                      description=f"training metrics of {run.output}")
    best = run.best or {}
    publish_markdown(f"train-summary-{run.output.name}",
                     f"**{run.state}** at step {run.step} in {run.wall_s:.0f} s  \n"
                     f"best: {best.get('target', '-')} accuracy {best.get('accuracy', float('nan')):.5f} "
                     f"at step {best.get('step', '-')}  \nlast checkpoint: `{run.last_checkpoint}`",
                     description="training run")

