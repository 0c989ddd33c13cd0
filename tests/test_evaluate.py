"""Verification stage: exact answers from a model whose embeddings are known (torch and ONNX), the
written files, Skipped on a second run, bad packs and bad model files."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from build_data import export_onnx
from datasets.errors import FormatError
from eval_data import KNOWN, CodeEmbedder, code_image, easy_pairs, known_pairs, png, write_pack
from models import get_backbone
from tasks.verification import METRICS_FILE, PLOT_FILE, ROC_FILE, VerificationConfig, metrics_table, roc_markdown, run_verification
from tasks.stage import load_record

CPU = VerificationConfig(device="cpu", batch_size=64)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    known = write_pack(root / "known.bin", *known_pairs())
    easy = write_pack(root / "easy.bin", *easy_pairs(40))
    onnx = export_onnx(CodeEmbedder(), root / "code.onnx")
    return {"known": known, "easy": easy, "onnx": onnx, "root": root}


def _check_known(row: dict) -> None:
    assert row["accuracy"] == pytest.approx(KNOWN["accuracy"], abs=1e-12)
    assert row["accuracy_std"] == pytest.approx(KNOWN["accuracy_std"], abs=1e-12)
    assert row["threshold_mean"] == pytest.approx(KNOWN["threshold"], abs=1e-12)
    assert row["xnorm"] == KNOWN["xnorm"]
    assert row["val@far=1e-03"] == KNOWN["val"] and row["val_far"] == pytest.approx(KNOWN["val_far"], abs=1e-12)
    for far, tar in KNOWN["tar"].items():
        key = f"tar@far={far:.0e}"
        assert (row[key] is None or np.isnan(row[key])) if tar is None else row[key] == pytest.approx(tar, abs=1e-12), key
    assert (row["n_pairs"], row["n_same"], row["n_diff"], row["images"]) == (200, 100, 100, 400)


@pytest.mark.parametrize("form", ["module", "onnx"])
def test_known_answer_and_files(packs, tmp_path, form):
    model = CodeEmbedder() if form == "module" else packs["onnx"]
    result = run_verification(model, [packs["known"], packs["easy"]], tmp_path / "eval", CPU)
    assert not result.skipped
    known, easy = result.rows
    assert (known["target"], easy["target"]) == ("known", "easy")
    _check_known(known)
    assert easy["accuracy"] == 1.0 and easy["accuracy_std"] == 0.0
    assert known["model_kind"] == ("module" if form == "module" else "onnx")
    assert known["image_size"] == "112x112" and known["normalize"] == "arcface"

    table = pq.read_table(result.metrics_path).to_pandas()
    assert list(table["target"]) == ["known", "easy"] and table["model_sha256"].nunique() == 1
    assert table["tar@far=1e-06"].isna().all() and table["tar@far=1e-06"].dtype == np.float64
    roc = pq.read_table(result.roc_path).to_pandas()
    known_roc = roc[roc["target"] == "known"]
    np.testing.assert_array_equal(known_roc["far"], KNOWN["roc_far"])
    np.testing.assert_array_equal(known_roc["tar"], KNOWN["roc_tar"])
    np.testing.assert_array_equal(known_roc["threshold"], [-np.inf, 0.0, 1.0, 2.0])

    data = result.plot_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(data) < 150_000
    markdown = roc_markdown(result.plot_path, result.rows)
    assert "data:image/png;base64," in markdown and "**known**: accuracy 0.92000" in markdown
    assert metrics_table(result.rows)[0]["tar@far=1e-01"] == 0.84
    assert result.summary_lines()[0] == "[known]XNorm: 2.000000 Accuracy-Flip: 0.92000+-0.02449"
    record = load_record(result.out_dir)
    assert set(record.outputs) == {METRICS_FILE, ROC_FILE, PLOT_FILE}
    assert set(record.inputs) == {"model", "bin:known", "bin:easy"}


def test_runs_of_two_models_concatenate(packs, tmp_path):
    """A weight-free model and a (small, random) y1 backbone: tables with one schema."""
    tiny = write_pack(tmp_path / "tiny.bin", *easy_pairs(10, seed=5))
    first = run_verification(CodeEmbedder(), [packs["known"]], tmp_path / "a", CPU)
    second = run_verification(get_backbone("y1", emb_size=16, blocks=(1, 1, 1, 1)), {"lfw_like": tiny}, tmp_path / "b", CPU)
    both = pa.concat_tables([pq.read_table(first.metrics_path), pq.read_table(second.metrics_path)])  # needs equal schemas
    rows = both.to_pylist()
    assert [r["target"] for r in rows] == ["known", "lfw_like"] and rows[0]["model_sha256"] != rows[1]["model_sha256"]
    assert [(r["network"], r["emb_size"]) for r in rows] == [(None, None), ("y1", 16)]
    assert 0.0 <= rows[1]["accuracy"] <= 1.0 and rows[1]["n_pairs"] == 10  # random weights: plumbing only


def test_second_run_is_skipped_until_an_input_changes(packs, tmp_path):
    out = tmp_path / "eval"
    first = run_verification(packs["onnx"], [packs["known"]], out, CPU)
    again = run_verification(packs["onnx"], [packs["known"]], out, CPU)
    assert not first.skipped and again.skipped
    assert again.rows == pq.read_table(first.metrics_path).to_pylist()
    _check_known(again.rows[0])
    # same model bytes under another name: still the same digest
    copy = tmp_path / "copy.onnx"
    copy.write_bytes(packs["onnx"].read_bytes())
    assert run_verification(copy, [packs["known"]], out, CPU).skipped
    # another setting, another pack content, force: evaluated again
    assert not run_verification(packs["onnx"], [packs["known"]], out, CPU.model_copy(update={"nfolds": 5})).skipped
    assert run_verification(packs["onnx"], [packs["known"]], out, CPU.model_copy(update={"nfolds": 5})).skipped
    images, issame = known_pairs()
    issame[0] = not issame[0]
    changed = write_pack(tmp_path / "known.bin", images, issame)
    rerun = run_verification(packs["onnx"], [changed], out, CPU.model_copy(update={"nfolds": 5}))
    assert not rerun.skipped and rerun.rows[0]["accuracy"] != first.rows[0]["accuracy"]
    assert not run_verification(packs["onnx"], [changed], out, CPU.model_copy(update={"nfolds": 5}), force=True).skipped


def test_bf16_autocast_keeps_the_codes(packs, tmp_path):
    result = run_verification(CodeEmbedder(), [packs["known"]], tmp_path / "eval", CPU.model_copy(update={"precision": "bf16"}))
    _check_known(result.rows[0])
    assert result.rows[0]["precision"] == "bf16"


def _py3_pickle(path, images, issame):
    path.write_bytes(pickle.dumps((images, issame), protocol=2))
    return path


def test_bad_packs_name_the_file(tmp_path):
    rng = np.random.default_rng(0)
    good = png(code_image((0, 1), rng))
    with pytest.raises(FormatError, match=r"odd\.bin: 3 images for 1 pairs \(expected 2 x 1 = 2 images\)"):
        run_verification(CodeEmbedder(), [_py3_pickle(tmp_path / "odd.bin", [good] * 3, [True])], tmp_path / "a", CPU)
    with pytest.raises(FormatError, match=r"short\.bin: 4 images for 3 pairs"):
        run_verification(CodeEmbedder(), [_py3_pickle(tmp_path / "short.bin", [good] * 4, [True, False, True])], tmp_path / "a", CPU)
    narrow = png(rng.integers(0, 255, (112, 96, 3), dtype=np.uint8))
    with pytest.raises(FormatError, match=r"narrow\.bin: image 3 \(pair 1\) measures 112x96 \(130x112 after resize_short "
                                          r"to 112\) \(expected 112x112\)"):
        run_verification(CodeEmbedder(), [write_pack_bytes(tmp_path / "narrow.bin", [good] * 3 + [narrow], [True, False])],
                         tmp_path / "a", CPU)
    with pytest.raises(FormatError, match=r"nothere\.bin: verification pack does not exist"):
        run_verification(CodeEmbedder(), [tmp_path / "nothere.bin"], tmp_path / "a", CPU)
    with pytest.raises(ValueError, match=r"every target failed: odd: .*odd\.bin: 3 images.*; nothere: .*does not exist"):
        run_verification(CodeEmbedder(), [tmp_path / "odd.bin", tmp_path / "nothere.bin"], tmp_path / "a", CPU)
    assert not (tmp_path / "a" / "stage.json").exists()


def test_one_bad_target_leaves_the_others_rows(packs, tmp_path):
    """A malformed pack, a missing one and a 6-pair set beside a good one: each target gets its row
    (metrics, an error or a note), in the table, the summary lines and the UI table; nothing is
    recorded as done, so the next run tries the failed targets again."""
    rng = np.random.default_rng(1)
    odd = _py3_pickle(tmp_path / "odd.bin", [png(code_image((0, 1), rng))] * 3, [True])
    six = write_pack(tmp_path / "six.bin", *easy_pairs(6, seed=2))
    targets = {"known": packs["known"], "odd": odd, "gone": tmp_path / "gone.bin", "six": six}
    result = run_verification(CodeEmbedder(), targets, tmp_path / "eval", CPU)
    rows = {r["target"]: r for r in pq.read_table(result.metrics_path).to_pylist()}
    assert list(rows) == ["known", "odd", "gone", "six"]
    _check_known(rows["known"])
    assert rows["known"]["error"] == "" and rows["six"]["error"] == ""
    assert "odd.bin: 3 images for 1 pairs" in rows["odd"]["error"] and rows["odd"]["accuracy"] is None
    assert "gone.bin: verification pack does not exist" in rows["gone"]["error"]
    assert rows["six"]["nfolds"] == 6 and rows["six"]["accuracy"] == 1.0
    assert "6 pairs are fewer than 10 folds" in rows["six"]["notes"]
    assert set(result.errors) == {"odd", "gone"}
    assert result.summary_lines()[1].startswith("[odd]error: ") and result.summary_lines()[0].startswith("[known]XNorm")
    table = metrics_table(result.rows)
    assert table[2]["error"].startswith("verification pack does not exist") or "does not exist" in table[2]["error"]
    assert "**odd**: error:" in roc_markdown(result.plot_path, result.rows)
    roc = pq.read_table(result.roc_path).to_pandas()
    assert set(roc["target"]) == {"known", "six"}
    assert not (tmp_path / "eval" / "stage.json").exists()
    assert not run_verification(CodeEmbedder(), targets, tmp_path / "eval", CPU).skipped
    # a recorded run of the good targets is not taken for up to date once a failed run replaced its files
    good = {"known": packs["known"], "six": six}
    assert not run_verification(CodeEmbedder(), good, tmp_path / "again", CPU).skipped
    run_verification(CodeEmbedder(), targets, tmp_path / "again", CPU)
    rerun = run_verification(CodeEmbedder(), good, tmp_path / "again", CPU)
    assert not rerun.skipped and [r["target"] for r in rerun.rows] == ["known", "six"]
    # shuffled folds: a recorded setting, the same accuracy on this balanced, separable set
    shuffled = run_verification(CodeEmbedder(), [six], tmp_path / "shuffled", CPU.model_copy(update={"shuffle_folds": True}))
    assert shuffled.rows[0]["accuracy"] == 1.0 and "shuffled with seed 0" in shuffled.rows[0]["notes"]


def write_pack_bytes(path, encoded, issame):
    from datasets.verification_bin import write_bin

    return write_bin(path, encoded, issame)


def test_small_square_images_are_resized_as_insightface_does(tmp_path):
    """A 56x56 pack is resized to 112x112 (bicubic resize_short), so its codes survive."""
    images, issame = easy_pairs(20, seed=3)
    small = [img[::2, ::2] for img in images]
    pack = write_pack(tmp_path / "small.bin", small, issame)
    assert run_verification(CodeEmbedder(), [pack], tmp_path / "eval", CPU).rows[0]["accuracy"] == 1.0


def test_bad_model_files_are_named(packs, tmp_path):
    text = tmp_path / "model.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(FormatError, match=r"model\.pt: neither an ONNX model nor a training checkpoint"):
        run_verification(text, [packs["easy"]], tmp_path / "a", CPU)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(FormatError, match=r"broken\.onnx: not a loadable ONNX model"):
        run_verification(broken, [packs["easy"]], tmp_path / "a", CPU)
    archive = tmp_path / "other.ckpt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "a zip file, not a checkpoint")
    with pytest.raises((FormatError, ValueError), match=r"other\.ckpt"):
        run_verification(archive, [packs["easy"]], tmp_path / "a", CPU)
    with pytest.raises(FileNotFoundError, match=r"gone\.onnx: embedding model not found"):
        run_verification(tmp_path / "gone.onnx", [packs["easy"]], tmp_path / "a", CPU)


def test_network_and_size_checks_name_both_values(packs, tmp_path):
    with pytest.raises(ValueError, match=r"Backbone: the module holds network 'y1' \(emb 16\), but network 'r50' was asked for"):
        run_verification(get_backbone("y1", emb_size=16, blocks=(1, 1, 1, 1)), [packs["easy"]], tmp_path / "a", CPU.model_copy(update={"network": "r50"}))
    with pytest.raises(ValueError, match=r"code\.onnx: the onnx takes 112x112 images, but image_size 112x96 was asked for"):
        run_verification(packs["onnx"], [packs["easy"]], tmp_path / "a", CPU.model_copy(update={"image_size": (112, 96)}))


def _training_checkpoint(path, network="y1", normalize="mxnet"):
    """A checkpoint file as tasks.checkpoint writes it (skips while that module has not landed)."""
    from tasks import checkpoint
    if not all(hasattr(checkpoint, name) for name in ("save_checkpoint", "FORMAT", "VERSION")):
        pytest.skip("tasks.checkpoint has no save_checkpoint/FORMAT/VERSION")
    args = {"network": network, "emb_size": 16, "blocks": [1, 1, 1, 1]}
    model = get_backbone(**args)
    meta = {"network": network, "emb_size": 16, "image_size": [112, 112], "normalize": normalize, "backbone_args": args}
    state = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "meta": meta, "backbone": model.state_dict()}
    return checkpoint.save_checkpoint(path, state), model


def test_training_checkpoint_is_loaded_with_its_settings(tmp_path):
    tiny = write_pack(tmp_path / "tiny.bin", *easy_pairs(10, seed=5))
    path, model = _training_checkpoint(tmp_path / "model-0001.pt")
    from_file = run_verification(path, [tiny], tmp_path / "a", CPU).rows[0]
    assert (from_file["model_kind"], from_file["network"], from_file["emb_size"], from_file["normalize"]) == ("checkpoint", "y1", 16, "mxnet")
    from_module = run_verification(model, [tiny], tmp_path / "b", CPU.model_copy(update={"normalize": "mxnet"})).rows[0]
    assert from_file["accuracy"] == from_module["accuracy"] and from_file["xnorm"] == pytest.approx(from_module["xnorm"], rel=1e-6)
    with pytest.raises(ValueError, match=r"model-0001\.pt: the checkpoint holds network 'y1' \(emb 16\), but network 'r100' was asked for"):
        run_verification(path, [tiny], tmp_path / "c", CPU.model_copy(update={"network": "r100"}))


def test_command_line(packs, tmp_path, capsys):
    from tasks.verification import main

    args = [str(packs["onnx"]), str(packs["known"]), "--out-dir", str(tmp_path / "cli"), "--device", "cpu"]
    assert main(args) == 0
    assert "[known]XNorm: 2.000000 Accuracy-Flip: 0.92000+-0.02449" in capsys.readouterr().out
    assert main(args) == 0 and '"skipped": true' in capsys.readouterr().out
