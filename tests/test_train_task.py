"""The Prefect-side wrapper: the training child's output, result, failure, timeout, and cancellation of the
parent (Prefect's own SIGTERM bridge) leaving no training process alive, torchrun's ranks included."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from tasks.training.record import read_status
from tasks.training.launcher import PID_FILE, alive, process_tree, run_training, stop_process_tree, training_command
from train_data import tiny_config


def test_training_command():
    assert training_command("c.yaml", 1, "py") == ["py", "-m", "tasks.training", "--config", "c.yaml"]
    assert training_command("c.yaml", 4, "py") == ["py", "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", "4", "-m", "tasks.training", "--config", "c.yaml"]
    with pytest.raises(ValueError, match="nproc must be >= 1"):
        training_command("c.yaml", 0)


def test_a_run_streams_its_log_and_returns_its_checkpoints(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="facepipe")
    run = run_training(tiny_config(tmp_path, max_steps=4, verbose=4, frequent=1, ckpt=1), log_every_s=3600)
    assert run.returncode == 0 and run.state == "finished" and run.step == 4
    assert run.last_checkpoint == str(tmp_path / "checkpoints" / "last.pt") and Path(run.last_checkpoint).exists()
    assert run.best["target"] == "tiny_val" and run.best_checkpoint == str(tmp_path / "checkpoints" / "best.pt")
    messages = [r.getMessage() for r in caplog.records]
    assert any("Accuracy-Flip" in m for m in messages) and any("checkpoint" in m for m in messages)
    progress = [m for m in messages if "rank0: step " in m and "/4 epoch" in m]
    assert 1 <= len(progress) <= 2  # throttled: the first progress line, and the last one at the end
    assert not (tmp_path / PID_FILE).exists()
    assert yaml.safe_load((tmp_path / "train_config.yaml").read_text())["max_steps"] == 4


def test_a_failing_child_raises_with_its_error(tmp_path: Path):
    with pytest.raises(RuntimeError, match=r"failed \(exit code 2\): error: .*images are 32x32 \(property\), but the run's "
                                           r"image size is 40,40 .*pass --image-size 32,32"):
        run_training(tiny_config(tmp_path, image_size="40,40"))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def test_timeout_stops_the_child(tmp_path: Path):
    seen: set[int] = set()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="ran longer than 12 s and was stopped"):
        run_training(tiny_config(tmp_path, max_steps=100000, epochs=100000, val_targets=[]), timeout_s=12, grace_s=3)
    assert time.monotonic() - started < 60
    leader = None
    status = read_status(tmp_path)
    if status:  # the child got as far as training: its pid is recorded
        leader = status["pid"]
        seen.add(leader)
    assert not [p for p in seen if alive(p)]
    assert not (tmp_path / PID_FILE).exists()


def test_cancelling_the_parent_kills_every_rank(tmp_path: Path):
    """The flow-run process gets SIGTERM (what a Prefect worker sends on cancel); Prefect's bridge turns it into an
    exception, and run_training's finally must take down torchrun *and* its ranks (each in its own session)."""
    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=100000, epochs=100000, verbose=100000, val_targets=[], per_batch_size=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = textwrap.dedent(f"""
        from prefect.utilities.engine import capture_sigterm
        from tasks.training.config import load_config
        from tasks.training.launcher import run_training
        with capture_sigterm():
            run_training(load_config({str(tmp_path / 'cfg.yaml')!r}), nproc=2, grace_s=120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    tree: list[int] = []
    try:
        _wait_for(lambda: (read_status(out) or {}).get("step", 0) >= 2 or parent.poll() is not None, 240,
                  "both ranks to train")
        assert parent.poll() is None, parent.stderr.read().decode()[-2000:]
        tree = process_tree(parent.pid)
        launcher = int((out / PID_FILE).read_text())
        ranks = [p for p in tree if p not in (parent.pid, launcher) and b"tasks.training" in Path(f"/proc/{p}/cmdline").read_bytes()
                 and b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert launcher in tree and len(ranks) == 2, tree
        assert {os.getsid(p) for p in ranks}.isdisjoint({os.getsid(launcher)})  # torchrun's own sessions
        # The ranks stop at their next step and save; under load that can take longer than a few seconds,
        # so the grace before SIGKILL is generous (the test waits only as long as the ranks need).
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=240)
    finally:
        stop_process_tree(parent.pid, grace_s=5, popen=parent)  # a failing test must not leave ranks behind
    survivors = [p for p in tree if alive(p)]
    assert not survivors, survivors
    status = read_status(out)
    assert status["state"] == "stopped"  # the ranks saw SIGTERM first and saved a checkpoint
    assert (out / "checkpoints" / "last.pt").exists() and not (out / PID_FILE).exists()


def test_a_parent_killed_outright_takes_its_child_along(tmp_path: Path):
    """SIGKILL leaves no ``finally``: the child was started with a parent-death signal, so it stops by itself."""
    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=100000, epochs=100000, verbose=100000, val_targets=[])
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    script = ("from tasks.training.config import load_config\nfrom tasks.training.launcher import run_training\n"
              f"run_training(load_config({str(tmp_path / 'cfg.yaml')!r}))\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    child = None
    try:
        _wait_for(lambda: (read_status(out) or {}).get("step", 0) >= 1 or parent.poll() is not None, 240, "training")
        assert parent.poll() is None, parent.stderr.read().decode()[-2000:]
        child = int((out / PID_FILE).read_text())
        assert os.getsid(child) != os.getsid(parent.pid)  # its own session: killing the parent's group misses it
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _wait_for(lambda: not alive(child), 60, "the orphaned child to stop")
    finally:
        if child is not None and alive(child):
            stop_process_tree(child, grace_s=2)
    assert read_status(out)["state"] == "stopped"  # SIGTERM from the kernel: a clean stop with a checkpoint
