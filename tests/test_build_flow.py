"""The build-dataset flow end to end on a real Prefect server: real photos, generated identities, a pairs
CSV and a merge; artifacts; a second run that skips every stage; an added photo processed alone on the
process-pool runner; a Dask cluster; bad input failing fast."""
from __future__ import annotations

import inspect
import shutil
import time
import uuid

import pytest

from build_data import copy_photos, synthetic_identities
import prefect_api as api
from datasets.lst import read_insightface_lst
from datasets.rec_layout import read_property, read_rec_index
from datasets.verification_bin import load_bin
from flows.build_dataset import build_dataset
from flows.params import BuildDatasetParams
from tasks.alignment import AlignConfig, run_align
from tasks.bins import PairsSet
from datasets.rec_layout import read_labels
from tasks.lst import run_lst
from tasks.merge import MergeConfig
from tasks.pack import run_pack

pytestmark = pytest.mark.prefect_server
STAGE_TASKS = ("align-plan", "lst", "pack", "merge", "bins", "gather")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Photos of three people, generated identities with a pairs CSV, and another packed set to merge."""
    from datasets.synthetic import write_pairs_csv

    root = tmp_path_factory.mktemp("build-flow")
    raw = copy_photos(root / "raw")
    aligned = root / "aligned"
    names = synthetic_identities(aligned, range(4), images=3)
    pairs = write_pairs_csv(root / "pairs.csv", names, num_pairs=20, folds=10, relative_to=aligned)
    other_faces = root / "other-faces"
    synthetic_identities(other_faces, range(2, 6), images=2)  # identities 2 and 3 are also in `aligned`
    other_aligned = run_align(other_faces, root / "other-aligned", AlignConfig(already_aligned=True)).out_dir
    other = run_pack(run_lst([other_aligned], root / "other-lst").out_dir, root / "other").out_dir
    return {"root": root, "raw": raw, "aligned": aligned, "pairs": pairs, "other": other}


def _kwargs(inputs, **extra):
    return dict(name="faces", raw_dir=str(inputs["raw"]), aligned_dirs=[str(inputs["aligned"])],
                data_root=str(inputs["root"] / "data"), align=AlignConfig(device="cpu"),
                merge_with=[str(inputs["other"])], merge=MergeConfig(dedup="name"),
                pairs=[PairsSet(name="synth", file=str(inputs["pairs"]), image_root=str(inputs["aligned"]), aligned=True)],
                **extra)


def _stage_tasks(states: dict[str, str]) -> dict[str, str]:
    """The task runs that are stages (not planning helpers)."""
    return {name: state for name, state in states.items()
            if name.startswith(STAGE_TASKS) and not any(w in name for w in ("prepare", "finalize"))}


def _aligned_label(inputs) -> str:
    return next(k for k in BuildDatasetParams(**_kwargs(inputs)).sources() if k != "raw")


def test_flow_signature_matches_the_parameter_model():
    from prefect.utilities.callables import parameter_docstrings, parameter_schema

    signature = inspect.signature(build_dataset.fn)
    assert list(signature.parameters) == list(BuildDatasetParams.model_fields)
    for name, param in signature.parameters.items():
        field = BuildDatasetParams.model_fields[name]
        default = field.get_default(call_default_factory=True)
        assert param.default == default or (param.default is None and default == []) or name == "name", name
    # The UI form shows the docstring's argument texts: the model's descriptions.
    docs = parameter_docstrings(inspect.getdoc(build_dataset.fn))
    assert docs == {name: field.description for name, field in BuildDatasetParams.model_fields.items()}
    schema = parameter_schema(build_dataset.fn).model_dump()
    assert schema["required"] == ["name"] and "PairsSet" in schema["definitions"]


def test_build_then_rebuild_skips_every_stage(prefect_server, inputs):
    state = build_dataset(**_kwargs(inputs, task_runner="threads"), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result["stages"].values()) == {"ran"}
    out = inputs["root"] / "data" / "datasets" / "faces"
    assert result["dataset_dir"] == str(out)
    # Training set: real faces of two people (kit_harington has one photo), 4 generated, merged by name
    # with a set holding 2 of those 4 and 2 others -> 8 identities.
    index = read_rec_index(out)
    assert len(index.identities) == 8 and result["identities"] == 8 and str(read_property(out / "property")) == "8,112,112"
    assert result["images"] == 4 + 12 + 8 == len(index.keys)
    assert (out / "train.rec").stat().st_ino == (out / "merge" / "train.rec").stat().st_ino  # hard link
    labels = read_labels(out / "labels.csv")
    assert set(labels) == {"barack_obama", "rose_leslie", *(f"synth0_{i:06d}" for i in range(6))}
    images, issame = load_bin(out / "synth.bin")
    assert len(issame) == 20 == result["bins"]["synth"]
    lines = read_insightface_lst(out / "lst" / "train.lst")
    assert len(lines) == 16 and (out / "align" / "raw" / "manifest.parquet").is_file()

    with api.client() as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        assert flow_run.name == "build-faces"
        runs = api.runs_below(client, flow_run.id)
        assert {r.name for r in runs[1:]} == {"align-raw", f"align-{_aligned_label(inputs)}", "align-bins-synth"}
        artifacts = api.artifacts(client, [r.id for r in runs])
        counts = artifacts["build-dataset-counts"]
        assert counts.type == "table"
        rows = {(r["stage"], r["status"]): r["count"] for r in _table(counts.data)}
        assert rows[("align/raw", "ok")] == 5 and rows[("lst", "dropped")] == 1 and rows[("merge", "merged")] == 2
        samples = artifacts["build-dataset-samples"]
        assert samples.type == "markdown" and "](data:image/jpeg;base64," in samples.data and len(samples.data) < 200_000
        table = {r["role"]: r for r in _table(artifacts["build-dataset-datasets"].data)}
        assert table["training set"]["images"] == 24 and table["training set"]["bins"] == "synth (20 pairs)"
        assert table["packed"]["identities"] == 6 and table["merged in"]["identities"] == 4
        progress = artifacts["build-dataset-align-raw"]
        assert progress.type == "progress" and float(progress.data) == 100.0

    started = time.monotonic()
    again = build_dataset(**_kwargs(inputs, task_runner="threads"), return_state=True)
    took = time.monotonic() - started
    assert again.is_completed() and set(again.result()["stages"].values()) == {"skipped"}
    with api.client() as client:
        runs = api.runs_below(client, again.state_details.flow_run_id)
        assert len(runs) == 1, "no subflow when nothing needs detection"
        stages = _stage_tasks(api.task_states(client, [r.id for r in runs]))
    assert len(stages) == 8 and set(stages.values()) == {"Skipped"}, stages
    print(f"second run of an unchanged build: {took:.1f} s")


def test_a_bins_folder_another_run_holds_fails_the_flow_and_keeps_the_bin(prefect_server, inputs):
    """The flow's bins step (prepare, align, finalize as separate tasks) holds the bins folder's lock, as
    ``run_bins`` does: a second writer fails at once, naming the folder, and the finished set is untouched."""
    from datasets.locks import folder_lock

    out = inputs["root"] / "data" / "datasets" / "faces"
    if not (out / "stage.json").exists():
        pytest.skip("needs the build of test_build_then_rebuild_skips_every_stage")
    bins_dir = out / "bins" / "synth"
    before = {p.name: p.read_bytes() for p in bins_dir.iterdir() if p.is_file() and p.name != ".lock"}
    with folder_lock(bins_dir, "test's bins"):
        state = build_dataset(**_kwargs(inputs, task_runner="threads"), return_state=True)
    assert state.is_failed() and f"{bins_dir.resolve()}: in use by test's bins" in state.message, state.message
    assert {p.name: p.read_bytes() for p in bins_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    again = build_dataset(**_kwargs(inputs, task_runner="threads"), return_state=True)
    assert again.is_completed() and set(again.result()["stages"].values()) == {"skipped"}, again.message


def _table(data):
    import json

    return json.loads(data) if isinstance(data, str) else data


def test_added_photo_is_processed_alone_on_the_process_pool(prefect_server, inputs):
    out = inputs["root"] / "data" / "datasets" / "faces"
    if not (out / "stage.json").exists():
        pytest.skip("needs the build of test_build_then_rebuild_skips_every_stage")
    faces = out / "align" / "raw" / "images"
    before = {p: p.stat().st_mtime_ns for p in faces.rglob("*.jpg")}
    copy_photos(inputs["raw"], {"kit_harington": ["3.jpg"]})  # kit_harington now has two photos
    state = build_dataset(**_kwargs(inputs, task_runner="processes", max_workers=1), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stages"] == {"align/raw": "ran", f"align/{_aligned_label(inputs)}": "skipped", "lst": "ran",
                                "pack": "ran", "merge": "ran", "bins/synth": "skipped", "gather": "ran"}
    assert result["identities"] == 9 and result["images"] == 26
    after = {p: p.stat().st_mtime_ns for p in faces.rglob("*.jpg")}
    assert set(after) - set(before) == {faces / "kit_harington" / "3.jpg"}
    assert all(after[p] == t for p, t in before.items()), "faces of unchanged photos were rewritten"
    with api.client() as client:
        runs = api.runs_below(client, state.state_details.flow_run_id)
        subflow = next(r for r in runs if r.name == "align-raw")
        shards = api.task_states(client, [subflow.id])
    assert len(shards) == 1 and list(shards.values()) == ["Completed"], shards


def test_dask_cluster_runs_the_shards(prefect_server, tmp_path):
    distributed = pytest.importorskip("distributed")
    raw = copy_photos(tmp_path / "raw", {"joe_biden": ["1.jpg", "2.jpg"]})
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        state = build_dataset(name="dask", raw_dir=str(raw), data_root=str(tmp_path / "data"), lst={"min_images": 1},
                              align=AlignConfig(device="cpu"), task_runner="dask",
                              dask_address=cluster.scheduler_address, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["images"] == 2
    assert read_rec_index(tmp_path / "data" / "datasets" / "dask").labels.tolist() == [0, 0]


def test_bad_input_fails_fast_naming_the_path(prefect_server, tmp_path, inputs):
    missing = tmp_path / "no-such-folder"
    state = build_dataset(name="bad", raw_dir=str(missing), data_root=str(tmp_path), return_state=True)
    assert state.is_failed() and f"raw_dir {missing} is not a folder" in state.message
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    state = build_dataset(name="bad", raw_dir=str(empty), data_root=str(tmp_path), return_state=True)
    assert state.is_failed() and "holds no image files" in state.message
    pairs = tmp_path / "pairs.csv"
    shutil.copy(inputs["pairs"], pairs)
    with open(pairs, "a", encoding="utf-8") as fh:
        fh.write(f"synth0_000000/0.jpg,{uuid.uuid4().hex}.jpg,0\n")
    state = build_dataset(name="bad", aligned_dirs=[str(inputs["aligned"])], data_root=str(tmp_path),
                          pairs=[PairsSet(name="p", file=str(pairs), image_root=str(inputs["aligned"]), aligned=True)],
                          return_state=True)
    assert state.is_failed() and "pairs.csv line 22 names" in state.message
    assert not (tmp_path / "datasets" / "bad" / "align").exists(), "nothing may run before the inputs are checked"
    state = build_dataset(name="bad name", aligned_dirs=[str(inputs["aligned"])], data_root=str(tmp_path), return_state=True)
    assert state.is_failed() and "option 'name': name 'bad name' must start with a letter" in state.message
    with pytest.raises(ValueError, match="give raw_dir"):
        BuildDatasetParams(name="x")
    with pytest.raises(ValueError, match="needs merge_with"):
        BuildDatasetParams(name="x", raw_dir="r", merge=MergeConfig(dedup="name"))
    with pytest.raises(ValueError, match="need merge.model"):
        BuildDatasetParams(name="x", raw_dir="r", merge_with=["m"], merge=MergeConfig(dedup="model"))
    with pytest.raises(ValueError, match="must start with a letter"):
        BuildDatasetParams(name="../x", raw_dir="r")


def test_user_lst_files_of_both_forms_pack_through_the_flow(prefect_server, tmp_path):
    """lst_file replaces align and lst: an im2rec list of face crops, and an InsightFace list mixing
    aligned crops, photos with landmarks + bbox (aligned here) and a bbox-only photo (cropped, a
    'fallback' row); pair lists and gather as usual."""
    from datasets.face_align import TEMPLATE_112x112
    from datasets.lst import Im2recLine, InsightFaceLine, write_im2rec_lst, write_insightface_lst
    from datasets.synthetic import write_pairs_csv

    faces = tmp_path / "faces"
    people = synthetic_identities(faces, range(3), images=3, seed=2)
    files = list(people.values())
    im2rec = write_im2rec_lst(tmp_path / "crops.lst", [Im2recLine(i, (float(k),), str(p.relative_to(tmp_path)))
                                                       for k, paths in enumerate(files) for i, p in enumerate(paths)])
    marks = tuple(map(tuple, TEMPLATE_112x112))  # the generated crops are "photos" whose landmarks sit on the template
    insight = write_insightface_lst(tmp_path / "mixed.lst", [
        *(InsightFaceLine(True, str(p), 0) for p in files[0]),
        *(InsightFaceLine(False, str(p), 1, (20, 20, 92, 100), marks) for p in files[1]),
        InsightFaceLine(False, str(files[2][0]), 2, (20, 20, 92, 100)),
    ])
    pairs = write_pairs_csv(tmp_path / "pairs.csv", people, num_pairs=8, folds=2, relative_to=faces)
    spec = PairsSet(name="synth", file=str(pairs), image_root=str(faces), aligned=True)
    for name, lst, images, counts in (("from-im2rec", im2rec, 9, {"ok": 9}), ("from-mixed", insight, 7, {"fallback": 1, "ok": 6})):
        state = build_dataset(name=name, lst_file=str(lst), data_root=str(tmp_path / "data"),
                              align=AlignConfig(device="cpu"), pairs=[spec], return_state=True)
        assert state.is_completed(), state.message
        result = state.result()
        out = tmp_path / "data" / "datasets" / name
        assert result["images"] == images and result["identities"] == 3 and result["bins"] == {"synth": 8}
        assert str(read_property(out / "property")) == "3,112,112" and not (out / "align").exists()
        assert "lst" not in result["stages"] and result["stages"]["pack"] == "ran"
        with api.client() as client:
            table = api.artifacts(client, [state.state_details.flow_run_id])["build-dataset-counts"]
            assert {r["status"]: r["count"] for r in _table(table.data) if r["stage"] == "pack"} == counts
    with pytest.raises(ValueError, match="lst_file is packed as it is"):
        BuildDatasetParams(name="x", lst_file=str(im2rec), raw_dir="r")
    bad = tmp_path / "bad.lst"
    bad.write_text("just one column\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lst_file: .*bad\.lst: line 1: 1 tab-separated columns"):
        BuildDatasetParams(name="x", lst_file=str(bad)).check_inputs()
