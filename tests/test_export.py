"""ONNX export of a checkpoint: checked against torch on L2-normalised embeddings, cached as a stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.checkpoint import read_checkpoint, save_checkpoint
from tasks.export import MODEL_FILE, export_onnx, run_export_stage
from tasks.training.trainer import train
from train_data import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-run")
    return train(tiny_config(out, max_steps=2, verbose=2, val_targets=[])).last_checkpoint


def test_huge_raw_embeddings_still_export(trained: Path, tmp_path: Path):
    """After a few steps the final BatchNorm can scale embeddings to ~1e6 (seen in the e2e run): float32
    rounding then exceeds 1e-4 in absolute terms although the direction, which recognition uses, agrees."""
    state = read_checkpoint(trained)
    bn = next(k for k in reversed(list(state["backbone"])) if k.endswith("running_var"))
    state["backbone"][bn] = torch.full_like(state["backbone"][bn], 1e-12)
    save_checkpoint(tmp_path / "huge.pt", state)
    result = export_onnx(tmp_path / "huge.pt", tmp_path / "huge.onnx")
    assert result.max_abs_diff <= 1e-4 and (tmp_path / "huge.onnx").is_file()


def test_export_stage_is_skipped_until_the_checkpoint_changes(trained: Path, tmp_path: Path):
    first = run_export_stage(trained, tmp_path / "export")
    assert not first.skipped and first.path == tmp_path / "export" / MODEL_FILE
    again = run_export_stage(trained, tmp_path / "export")
    assert again.skipped and again.path == first.path
    other = tmp_path / "other.pt"
    state = read_checkpoint(trained)
    state["meta"]["step"] = 99
    save_checkpoint(other, state)
    assert not run_export_stage(other, tmp_path / "export").skipped
    assert run_export_stage(other, tmp_path / "export", force=True).skipped is False
