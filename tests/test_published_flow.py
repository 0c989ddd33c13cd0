"""The train-and-eval flow with a published model and train=false: an arcface_torch ``backbone.pth`` is
evaluated and exported, and the import shows in the verification table and the run summary."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import prefect_api as api
from flows.train_and_eval import train_and_eval
from published_refs import MobileFaceNet, randomize
from tasks.stage import load_record
from train_data import SIZE, tiny_dataset

pytestmark = pytest.mark.prefect_server


def test_flow_evaluates_and_exports_an_arcface_torch_backbone(prefect_server, tmp_path: Path):
    model = tmp_path / "backbone.pth"
    torch.save(randomize(MobileFaceNet(32, (1, 4, 6, 2), 2, gdc_kernel=SIZE // 16), seed=5).state_dict(), model)
    state = train_and_eval(dataset=str(tiny_dataset()), name="published", data_root=str(tmp_path), train=False,
                           model=str(model), triplet=False, megaface=None, device="cpu",
                           options={"val_targets": ["tiny_val"]}, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    run = tmp_path / "runs" / "published"
    rows = pq.read_table(run / "verification" / "verification.parquet").to_pylist()
    assert rows[0]["model_kind"] == "arcface_torch" and "mbf" in rows[0]["conversion"]
    assert load_record(run / "export").summary["source"] == "arcface_torch"
    assert Path(result["onnx"]).is_file()
    with api.client() as client:
        artifacts = api.artifacts(client, [state.state_details.flow_run_id])
        assert "(arcface_torch: arcface_torch mbf state dict" in artifacts["train-and-eval-summary"].data
