"""The train-and-eval flow on a real Prefect server: training (child process), triplet fine-tuning,
verification, MegaFace, IJB and ONNX export on a tiny packed set; a second run that skips every stage;
another configuration under the same run name refused, then moved aside with force; bad input
failing fast with a one-line reason."""
from __future__ import annotations

import inspect
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import prefect_api as api
from flows.train_and_eval import train_and_eval
from flows.train_params import TrainAndEvalParams
from ijb_data import write_ijb
from tasks.ijb import IjbConfig
from tasks.megaface import ImageSet, MegaFaceConfig
from tasks.stage import load_record
from train_data import SIZE, tiny_dataset

pytestmark = pytest.mark.prefect_server
STAGES = ("train", "triplet", "verification", "megaface", "ijb", "export")


def _kwargs(root: Path, **extra):
    options = {"version_input": 0, "margin_s": 16.0, "num_workers": 0, "frequent": 1, "seed": 3,
               "val_targets": ["tiny_val"]}
    data = tiny_dataset()
    kwargs = dict(dataset=str(data), name="tiny", data_root=str(root), network="m05", loss="cosface", lr=0.05,
                  emb_size=32, image_size=f"{SIZE},{SIZE}", per_batch_size=8, max_steps=6, verbose=3, ckpt=1,
                  device="cpu", options=options, triplet=True,
                  triplet_options={"max_steps": 3, "images_per_identity": 4, "per_batch_size": 8},
                  megaface={"probes": ImageSet(path=str(data)), "distractors": ImageSet(path=str(data)),
                            "config": MegaFaceConfig(sizes=[10, 40], device="cpu", batch_size=32)})
    kwargs.update(extra)
    return kwargs


def test_flow_signature_matches_the_parameter_model():
    from prefect.utilities.callables import parameter_docstrings, parameter_schema

    signature = inspect.signature(train_and_eval.fn)
    assert list(signature.parameters) == list(TrainAndEvalParams.model_fields)
    for name, param in signature.parameters.items():
        default = TrainAndEvalParams.model_fields[name].get_default(call_default_factory=True)
        assert param.default == default or (param.default is None and default in ({}, [])) or name == "dataset", name
    docs = parameter_docstrings(inspect.getdoc(train_and_eval.fn))
    assert docs == {name: field.description for name, field in TrainAndEvalParams.model_fields.items()}
    schema = parameter_schema(train_and_eval.fn).model_dump()
    assert schema["required"] == ["dataset"] and {"MegaFaceSpec", "IjbSpec"} <= set(schema["definitions"])


def test_train_evaluate_export_then_rerun_skips(prefect_server, tmp_path: Path):
    ijb = {"root": str(write_ijb(tmp_path / "ijb")), "targets": ["IJBC"], "config": IjbConfig(device="cpu", batch_size=16)}
    state = train_and_eval(**_kwargs(tmp_path, ijb=ijb), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    run = tmp_path / "runs" / "tiny"
    assert result["run_dir"] == str(run) and set(result["stages"]) == set(STAGES)
    assert set(result["stages"].values()) == {"ran"}
    assert Path(result["checkpoint"]).parent == run / "triplet" / "checkpoints"  # evaluation uses the fine-tuned model
    assert load_record(run / "train").summary["step"] == 6 and load_record(run / "triplet").summary["step"] == 3
    metrics = pq.read_table(run / "verification" / "verification.parquet").to_pylist()
    assert [r["target"] for r in metrics] == ["tiny_val"] and 0.0 <= metrics[0]["accuracy"] <= 1.0
    assert result["verification"] == {"tiny_val": metrics[0]["accuracy"]}
    assert set(result["megaface"]) == {10, 40} and (run / "megaface" / "megaface.parquet").is_file()
    ijb_rows = pq.read_table(run / "ijb" / "ijb.parquet").to_pylist()  # the 32x32 model gets the aligned crops resized
    assert [(r["target"], r["pairs"], r["image_size"]) for r in ijb_rows] == [("IJBC", 105, "32x32")]
    assert result["ijb"]["IJBC"]["tar@far=1e-01"] == ijb_rows[0]["tar@far=1e-01"] and ijb_rows[0]["rank_1"] is not None
    assert Path(result["onnx"]) == run / "export" / "model.onnx" and Path(result["onnx"]).stat().st_size > 0

    with api.client() as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        assert flow_run.name == "train-tiny"
        artifacts = api.artifacts(client, [flow_run.id])
        assert {"train-and-eval-summary", "verification-metrics", "verification-roc", "megaface-metrics", "ijb-metrics", "ijb-roc",
                "train-metrics-train", "train-summary-triplet", "train-progress-train"} <= set(artifacts)
        assert artifacts["train-progress-train"].type == "progress"
        assert "data:image/png;base64," in artifacts["verification-roc"].data
        assert "| triplet | ran |" in artifacts["train-and-eval-summary"].data

    again = train_and_eval(**_kwargs(tmp_path, ijb=ijb), return_state=True)
    assert again.is_completed(), again.message
    assert set(again.result()["stages"].values()) == {"skipped (up to date)"}
    with api.client() as client:
        states = api.task_states(client, [again.state_details.flow_run_id])
    assert {states[name] for name in STAGES} == {"Skipped"}

    other = train_and_eval(**_kwargs(tmp_path, lr=0.06, triplet=False, megaface=None), return_state=True)
    assert other.is_failed() and "holds a run with other options (lr 0.05 -> 0.06)" in other.message
    forced = train_and_eval(**_kwargs(tmp_path, lr=0.06, triplet=False, megaface=None, verification=False, export=False,
                                      force=True), return_state=True)
    assert forced.is_completed(), forced.message
    aside = list(run.glob("train.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "best.pt").is_file()  # nothing lost


@pytest.mark.parametrize("change, message", [
    ({"dataset": "no-such-set"}, "dataset 'no-such-set': {root}/datasets/no-such-set is not a folder"),
    ({"network": "r7"}, "option 'network': network 'r7' is not a known code; valid codes: "),
    ({"lr": -1.0}, "option 'lr': Input should be greater than 0"),
    ({"preset": "r1000"}, "preset 'r1000' is not in "),
    ({"targets": ["lfw"]}, "val target 'lfw': neither "),
    ({"train": False, "triplet": False}, "train is false: give model"),
    ({"ckpt": 0}, "ckpt 0 keeps no checkpoint"),
    ({"ijb": {"root": "/no/such/ijb"}}, "ijb root /no/such/ijb: no IJBB or IJBC folder with meta/"),
])
def test_bad_input_fails_fast_with_one_line(prefect_server, tmp_path: Path, change, message):
    state = train_and_eval(**_kwargs(tmp_path, **change), return_state=True)
    assert state.is_failed()
    assert message.format(root=tmp_path) in state.message and "\n" not in state.message.strip()
    assert not (tmp_path / "runs").exists(), "nothing may run before the inputs are checked"


def test_dataset_is_a_name_under_the_data_root_unless_it_is_a_path(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample").mkdir()  # a folder of that name in the working directory does not change the meaning
    params = TrainAndEvalParams(dataset="sample", data_root=str(tmp_path / "data"))
    assert params.dataset_dir() == tmp_path / "data" / "datasets" / "sample"
    assert TrainAndEvalParams(dataset="./sample").dataset_dir() == tmp_path / "sample"
    assert TrainAndEvalParams(dataset=str(tmp_path / "x")).dataset_dir() == tmp_path / "x"
    with pytest.raises(ValueError, match="train is false: give model"):
        TrainAndEvalParams(dataset="sample", train=False)
    with pytest.raises(ValueError, match="model is only used when train is false"):
        TrainAndEvalParams(dataset="sample", model="m.onnx")
