"""The trainer on real packed bytes: records, checkpoint policies, the NaN guard, exact resume after a kill,
resume on two gloo ranks with the classifier re-sharded, triplet fine-tuning, bad input."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import ROOT
from tasks.checkpoint import read_checkpoint
from tasks.training.trainer import EvaluationFailed, train
from tasks.training.record import read_metrics, read_status
from train_data import tiny_config, tiny_dataset


def _losses(output: Path) -> pd.Series:
    frame = read_metrics(output)
    train_rows = frame[frame["kind"] == "train"]
    return train_rows.set_index("step")["loss"]


def test_a_run_records_metrics_status_tensorboard_and_checkpoints(tmp_path: Path):
    result = train(tiny_config(tmp_path, max_steps=6, verbose=3, ckpt=1))
    assert result.state == "finished" and result.step == 6
    assert result.last_checkpoint == tmp_path / "checkpoints" / "last.pt"
    assert result.best_checkpoint == tmp_path / "checkpoints" / "best.pt" and result.best["target"] == "tiny_val"
    assert result.samples_per_s > 0 and 0 <= result.data_wait < 1
    frame = read_metrics(tmp_path)
    assert frame[frame["kind"] == "train"]["step"].tolist() == [1, 2, 3, 4, 5, 6]
    val = frame[frame["kind"] == "val"]
    assert val["step"].tolist() == [3, 6] and set(val["target"]) == {"tiny_val"}
    assert val["accuracy"].between(0, 1).all() and frame["lr"].dropna().eq(0.05).all()
    status = read_status(tmp_path)
    assert status["state"] == "finished" and status["step"] == 6 and status["best"]["target"] == "tiny_val"
    assert status["last_checkpoint"] == str(result.last_checkpoint)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    state = read_checkpoint(result.last_checkpoint)
    assert state["progress"]["step"] == 6 and state["meta"]["val"]["tiny_val"]["n_pairs"] == 20
    assert state["scheduler"]["last_epoch"] == 6 and len(state["rng"]) == 1


@pytest.mark.parametrize("policy, files", [(0, []), (2, ["last.pt", "model-0001.pt", "model-0002.pt"])])
def test_checkpoint_policies(tmp_path: Path, policy, files):
    result = train(tiny_config(tmp_path, max_steps=4, verbose=2, ckpt=policy))
    found = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) if (tmp_path / "checkpoints").exists() else []
    assert found == files
    if policy == 2:
        assert [p.name for p in result.checkpoints] == ["model-0001.pt", "model-0002.pt"]
        assert result.best_checkpoint.name in ("model-0001.pt", "model-0002.pt")
        assert read_checkpoint(tmp_path / "checkpoints" / "model-0001.pt")["progress"]["step"] == 2
    else:
        assert result.last_checkpoint is None and result.best_checkpoint is None


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="facepipe")
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps had a non-finite loss or gradient "
                                                 r"\(nan_max_consecutive=3\)"):
        train(tiny_config(tmp_path, lr=1e30, max_steps=20, nan_max_consecutive=3, val_targets=[]))
    skipped = [r.getMessage() for r in caplog.records if "optimiser step skipped" in r.getMessage()]
    assert len(skipped) == 3 and "(3 in a row)" in skipped[-1]
    status = read_status(tmp_path)
    assert status["state"] == "failed" and "FloatingPointError" in status["message"]


def test_a_failing_record_write_does_not_hide_the_runs_own_error(tmp_path: Path, caplog):
    (tmp_path / "metrics.parquet" / "in-the-way").mkdir(parents=True)  # the record's final write must fail (resume
    # auto: a folder without a checkpoint starts a new run without reading it)
    caplog.set_level(logging.ERROR, logger="facepipe")
    with pytest.raises(FloatingPointError):
        train(tiny_config(tmp_path, lr=1e30, max_steps=20, nan_max_consecutive=2, val_targets=[], resume="auto"))
    assert any("writing the run record failed too" in r.getMessage() and "metrics.parquet" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_the_trainer_imports_the_record_writers_before_any_signal_handler(tmp_path: Path):
    """A second Ctrl-C inside a first-time import of pyarrow (or of pandas, which pyarrow imports on its first
    conversion) left a half-built module, and the record written on the way out failed with an AttributeError."""
    code = ("import sys, tasks.training.trainer; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'pyarrow.parquet') if m not in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_a_killed_run_resumes_with_the_same_losses(tmp_path: Path):
    common = dict(max_steps=14, verbose=5, frequent=1, deterministic=True, num_workers=1, sample_rate=0.5,
                  ckpt=3, val_targets=[])
    reference = train(tiny_config(tmp_path / "a", **common))
    assert reference.step == 14
    cfg = tiny_config(tmp_path / "b", **common)
    proc = subprocess.Popen([sys.executable, "-m", "tasks.training", "--config", str(_write_config(cfg, tmp_path / "b.yaml"))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            status = read_status(tmp_path / "b") if (tmp_path / "b" / "status.json").exists() else None
            if status and status.get("step", 0) >= 6:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["progress"]["step"]
    assert killed_at in (5, 10), killed_at
    assert read_status(tmp_path / "b")["step"] < 14, "the run finished before it could be killed"
    resumed = train(cfg.model_copy(update={"resume": "auto"}))
    assert resumed.step == 14
    want, got = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert got.index.tolist() == list(range(1, 15))  # rows of the killed run after its checkpoint were dropped
    after = want.index > killed_at
    assert (got[after] - want[after]).abs().max() <= 1e-6, pd.DataFrame({"uninterrupted": want, "resumed": got})
    assert got[after].tolist() == want[after].tolist()  # bitwise, in fact
    a = read_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = read_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])
    assert torch.equal(a["head"]["weight"], b["head"]["weight"])


def test_resume_on_two_gloo_ranks_reshards_the_classifier(tmp_path: Path):
    out = tmp_path / "run"
    first = train(tiny_config(out, max_steps=4, verbose=4, sample_rate=0.5, val_targets=[]))
    saved = read_checkpoint(first.last_checkpoint)
    cfg = tiny_config(out, max_steps=8, verbose=2, sample_rate=0.5, resume="auto", per_batch_size=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "tasks.training", "--config", str(_write_config(cfg, tmp_path / "two.yaml"))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "saved by 1 rank(s), now 2; classifier re-sharded" in proc.stdout
    state = read_checkpoint(out / "checkpoints" / "last.pt")
    assert state["meta"]["world_size"] == 2 and state["progress"]["step"] == 8 and len(state["rng"]) == 2
    assert state["head"]["weight"].shape == saved["head"]["weight"].shape == (16, 32)
    marks = state["optimizer"]["sharded"]
    (index,) = marks
    assert state["optimizer"]["state"][index]["momentum_buffer"].shape == (16, 32)
    assert not torch.equal(state["head"]["weight"], saved["head"]["weight"])  # it trained on
    losses = _losses(out)
    assert losses.index.tolist() == list(range(1, 9)) and losses.notna().all()
    # 4 steps x 8 images on one rank, then 4 steps x 4 images x 2 ranks: epoch 0's 64 images, none twice
    assert state["progress"]["sampler"] == {"epoch": 0, "consumed": 64}


def test_triplet_fine_tuning_from_a_trained_checkpoint(tmp_path: Path):
    base = train(tiny_config(tmp_path / "base", max_steps=3, verbose=3, val_targets=[]))
    result = train(tiny_config(tmp_path / "triplet", loss=12, pretrained=str(base.last_checkpoint), lr=0.005, mom=0.0,
                               per_batch_size=8, images_per_identity=4, max_steps=4, verbose=4, triplet_alpha=0.3))
    assert result.state == "finished" and result.final_loss is not None
    frame = read_metrics(tmp_path / "triplet")
    rows = frame[frame["kind"] == "train"]
    assert "triplets" in rows and (rows["triplets"] >= 0).all()
    state = read_checkpoint(result.last_checkpoint)
    assert state["head"] is None and state["meta"]["loss"] == "triplet"
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.0
    before = read_checkpoint(base.last_checkpoint)["backbone"]
    changed = [k for k, v in state["backbone"].items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)  # fine-tuned from the pretrained weights


def test_bad_input_names_the_option_or_file(tmp_path: Path):
    with pytest.raises(ValueError, match=r"images are 32x32 \(property\), but the run's image size is 56,56 .*pass --image-size 32,32"):
        train(tiny_config(tmp_path, image_size="56,56"))
    with pytest.raises(FileNotFoundError, match=r"val target 'lfw': neither .*lfw.bin nor lfw exists \(.bin files in .*: tiny_val\)"):
        train(tiny_config(tmp_path, val_targets=["lfw"]))
    with pytest.raises(ValueError, match="option 'dataset' is empty"):
        train(tiny_config(tmp_path, dataset=""))
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.pt does not exist"):
        train(tiny_config(tmp_path, resume=str(tmp_path / "nothing.pt")))


def test_command_line_errors_are_one_line(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "tasks.training", "--dataset", str(tiny_dataset()), "--output",
                           str(tmp_path), "--network", "r7"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config: option 'network': network 'r7' is not a known code")
    assert "Traceback" not in proc.stderr


def test_a_failed_evaluation_keeps_the_checkpoint_and_is_recorded(tmp_path: Path, caplog):
    # (the metrics rows of a failed target: tests/test_protocol_112x96.py)
    caplog.set_level(logging.ERROR, logger="facepipe")
    broken = tmp_path / "broken.bin"
    broken.write_bytes((tiny_dataset() / "tiny_val.bin").read_bytes()[:100])  # torn pickle
    targets = ["tiny_val", str(broken)]
    result = train(tiny_config(tmp_path / "go", max_steps=2, verbose=2, ckpt=1, val_targets=targets))
    assert result.state == "finished" and result.step == 2 and result.best["target"] == "tiny_val"
    assert read_checkpoint(result.last_checkpoint)["progress"]["step"] == 2
    assert "broken.bin" in read_status(tmp_path / "go")["eval_errors"]["broken"]
    assert any("[broken]error: " in r.getMessage() and "checkpoint is kept" in r.getMessage() for r in caplog.records)

    # on_eval_failure=stop: the step's checkpoint is written first, then the run stops; it resumes.
    stop = tiny_config(tmp_path / "stop", max_steps=4, verbose=2, ckpt=3, val_targets=targets, on_eval_failure="stop")
    with pytest.raises(EvaluationFailed, match=r"step 2: evaluation failed .*broken.*last.pt \(resume with"):
        train(stop)
    assert read_checkpoint(tmp_path / "stop" / "checkpoints" / "last.pt")["progress"]["step"] == 2
    assert read_status(tmp_path / "stop")["state"] == "failed"
    resumed = train(stop.model_copy(update={"resume": "auto", "val_targets": ["tiny_val"]}))
    assert resumed.state == "finished" and resumed.step == 4


def test_non_finite_embeddings_name_diverged_weights(tmp_path: Path):
    from tasks.checkpoint import build_backbone
    from tasks.training.validation import TargetError, ValidationSets

    cfg = tiny_config(tmp_path)
    model = build_backbone(cfg.backbone_args()).eval()
    sets = ValidationSets([("tiny_val", tiny_dataset() / "tiny_val.bin")], cfg.image_hw, cfg.normalize)
    assert not isinstance(sets.evaluate(model, torch.device("cpu"))["tiny_val"], TargetError)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    failure = sets.evaluate(model, torch.device("cpu"))["tiny_val"]
    assert isinstance(failure, TargetError)
    assert "non-finite embedding" in failure.message and "weights diverged" in failure.message
    assert all(word in failure.message for word in ("lr", "margin_m", "grad_clip"))
