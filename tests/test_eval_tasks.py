"""The verification and MegaFace Prefect tasks in a flow on a real Prefect server: artifacts (metrics
tables, the ROC plot as a data URI under 150 KB) and a second run whose tasks finish as Skipped."""
from __future__ import annotations

import base64
import json
import re
import time

import numpy as np
import pytest
from prefect import flow

from build_data import export_onnx
from eval_data import CodeEmbedder, code_image, known_pairs, png, write_pack
from flows.runs import result_of
from tasks.verification import VerificationConfig, verification_task
from tasks.megaface import MegaFaceConfig, megaface_task

pytestmark = pytest.mark.prefect_server


@flow(name="eval-stages-test")
def _eval_flow(model: str, bins: list[str], probes: str, distractors: str, out: str) -> dict:
    ver = result_of(verification_task, model, bins, f"{out}/verification", VerificationConfig(device="cpu"))
    mf = result_of(megaface_task, model, probes, distractors, f"{out}/megaface",
                   MegaFaceConfig(device="cpu", sizes=[3], ranks=[1], far=0.1, roc_fars=[0.1]))
    return {"accuracy": ver.rows[0]["accuracy"], "rank_1": mf.rows[0]["rank_1"], "skipped": [ver.skipped, mf.skipped]}


def _wait_final(client, flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 30
    while True:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if (runs and all(r.state is not None and r.state.is_final() for r in runs)) or time.monotonic() > deadline:
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}
        time.sleep(0.5)


def test_tasks_publish_artifacts_and_skip(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    rng = np.random.default_rng(0)
    pack = write_pack(tmp_path / "known.bin", *known_pairs())
    model = export_onnx(CodeEmbedder(), tmp_path / "code.onnx")
    (tmp_path / "p" / "Ann").mkdir(parents=True)
    (tmp_path / "d" / "x" / "y").mkdir(parents=True)
    for k in range(2):
        (tmp_path / "p" / "Ann" / f"Ann_{k}.png").write_bytes(png(code_image((0, 1), rng)))
    for k, code in enumerate([(2, 3), (4, 5), (6, 7)]):
        (tmp_path / "d" / "x" / "y" / f"{k}.png").write_bytes(png(code_image(code, rng)))
    (tmp_path / "p" / "lst").write_text("Ann/Ann_0.png\nAnn/Ann_1.png\n")
    (tmp_path / "d" / "lst").write_text("".join(f"x/y/{k}.png\n" for k in range(3)))
    args = (str(model), [str(pack)], str(tmp_path / "p" / "lst"), str(tmp_path / "d" / "lst"), str(tmp_path / "out"))

    first = _eval_flow(*args, return_state=True)
    second = _eval_flow(*args, return_state=True)
    assert first.is_completed() and second.is_completed(), (first.message, second.message)
    assert first.result() == {"accuracy": pytest.approx(0.92), "rank_1": 1.0, "skipped": [False, False]}
    assert second.result()["skipped"] == [True, True]

    with get_client(sync_client=True) as client:
        assert _wait_final(client, first.state_details.flow_run_id) == {"verification": "Completed", "megaface": "Completed"}
        assert _wait_final(client, second.state_details.flow_run_id) == {"verification": "Skipped", "megaface": "Skipped"}
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first.state_details.flow_run_id])))
        artifacts = {a.key: a for a in found}
    assert {"verification-metrics", "verification-roc", "megaface-metrics"} <= set(artifacts)
    table = artifacts["verification-metrics"].data
    table = table if isinstance(table, list) else json.loads(table)
    assert table[0]["target"] == "known" and table[0]["accuracy"] == 0.92 and table[0]["tar@far=1e-01"] == 0.84
    mf = artifacts["megaface-metrics"].data
    mf = mf if isinstance(mf, list) else json.loads(mf)
    assert mf[0]["distractors"] == 3 and mf[0]["rank_1"] == 1.0
    uri = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", artifacts["verification-roc"].data)
    png_bytes = base64.b64decode(uri.group(1))
    assert png_bytes.startswith(b"\x89PNG") and len(png_bytes) < 150_000
