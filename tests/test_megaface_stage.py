"""MegaFace stage on coded images whose CMC and TAR are known: image lists and a .rec, noise lists,
devkit feature files, skipping, resuming an interrupted extraction, and bad input.

The set (codes are pairs of mirror slots, :mod:`eval_data`; squared distances 0, 1 or 2):
probes Alice (two images of code A, one of A' sharing one slot with A), Bob (three of B), Carol
(three of C); six distractors, disjoint from every probe code except number 3, a copy of Alice's
A' image. With the first 2 distractors nothing outranks a match. With all 6, the two (gallery A,
query A') pairs have distractor 3 at distance 0 against the match at 1: rank 2. Every other pair
is rank 1 (the (gallery A', query A) pairs tie with distractor 3, and ties count for the match).
So rank-1 = 16/18 at 6 distractors and 1 at 2; either noise list repairs it.

TAR (9 genuine pairs: 7 at d = 0, 2 at d = 1; 9 x 6 = 54 impostor pairs: one at 0, two at 1, 51 at 2):
FAR 0.05 keeps 2 false accepts at most -> accept d < 1: TAR 7/9 at FAR 1/54; FAR 0.1 -> accept
d < 2: TAR 1 at FAR 3/54. With 2 distractors (18 impostors, all at 2) FAR 0.05 is not measurable
and FAR 0.1 gives TAR 1 at FAR 0.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from build_data import export_onnx
from datasets.errors import FormatError
from datasets.megaface import feature_path, read_feature
from datasets.rec_layout import InsightFaceRecWriter
from eval_data import CodeEmbedder, CountingCodeEmbedder, code_image, fused_code, png
from models import get_backbone
from datasets.rec_layout import LABELS_FILE, write_labels
from tasks.megaface import FEATURES_DIR, ImageSet, MegaFaceConfig, cmc_file_name, run_megaface
from tasks.stage import load_record

A, A_PRIME, B, C = (0, 1), (0, 2), (3, 4), (5, 6)
PROBES = {"Alice": [A, A, A_PRIME], "Bob": [B, B, B], "Carol": [C, C, C]}
DISTRACTORS = [(7, 8), (9, 10), (11, 12), None, (13, 14), (15, 16)]  # None: the copy of Alice_3.png
CFG = MegaFaceConfig(device="cpu", batch_size=4, sizes=[2, 6], ranks=[1, 2], far=0.05, roc_fars=[0.1], algo="code")
RANK1_ALL = 16 / 18


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Probe and distractor image lists (PNG files), and the probe images packed into a .rec."""
    root = tmp_path_factory.mktemp("megaface")
    rng = np.random.default_rng(0)
    probe_lines, images = [], {}
    for name, codes in PROBES.items():
        for k, code in enumerate(codes, 1):
            rel = f"{name}/{name}_{k}.png"
            images[rel] = png(code_image(code, rng))
            (root / "facescrub" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "facescrub" / rel).write_bytes(images[rel])
            probe_lines.append(rel)
    distractor_lines = []
    for i, code in enumerate(DISTRACTORS):
        rel = f"{i}/{i}{i}@N00/{1000 + i}_0.png"
        data = images["Alice/Alice_3.png"] if code is None else png(code_image(code, rng))
        (root / "megaface" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "megaface" / rel).write_bytes(data)
        distractor_lines.append(rel)
    (root / "facescrub_lst").write_text("\n".join(probe_lines) + "\n")
    (root / "megaface_lst").write_text("\n".join(distractor_lines) + "\n")
    rec = root / "probes_rec"
    with InsightFaceRecWriter(rec) as writer:
        for label, name in enumerate(PROBES):
            for rel in probe_lines:
                if rel.startswith(name + "/"):
                    writer.add(label, images[rel])
    write_labels(rec / LABELS_FILE, {name: label for label, name in enumerate(PROBES)})
    return {"root": root, "probes": ImageSet(path=str(root / "facescrub_lst"), root=str(root / "facescrub")),
            "distractors": ImageSet(path=str(root / "megaface_lst"), root=str(root / "megaface")),
            "rec": rec, "probe_lines": probe_lines, "distractor_lines": distractor_lines}


def _by_size(result) -> dict[int, dict]:
    return {r["distractors"]: r for r in result.rows}


def test_known_cmc_tar_files_and_skip(sets, tmp_path):
    devkit = tmp_path / "devkit"
    cfg = CFG.model_copy(update={"devkit_dir": str(devkit)})
    result = run_megaface(CodeEmbedder(), sets["probes"], sets["distractors"], tmp_path / "mf", cfg)
    assert not result.skipped and not result.features_skipped
    rows = _by_size(result)
    assert rows[2]["rank_1"] == 1.0 and rows[6]["rank_1"] == pytest.approx(RANK1_ALL, abs=1e-12) and rows[6]["rank_2"] == 1.0
    assert rows[6]["tar@far=5e-02"] == pytest.approx(7 / 9) and rows[6]["far_achieved"] == pytest.approx(1 / 54)
    assert rows[2]["tar@far=5e-02"] is None and rows[2]["far_achieved"] is None
    assert (rows[6]["probes"], rows[6]["probe_identities"], rows[6]["pairs"]) == (9, 3, 18)
    assert pq.read_table(result.metrics_path).to_pylist() == result.rows

    doc = json.loads((tmp_path / "mf" / cmc_file_name("facescrub", "code", 6)).read_text())
    assert doc["cmc"][0] == [1, 2] and doc["cmc"][1] == pytest.approx([RANK1_ALL, 1.0])
    assert doc["roc"][0] == pytest.approx([1 / 54, 3 / 54]) and doc["roc"][1] == pytest.approx([7 / 9, 1.0])
    small = json.loads((tmp_path / "mf" / cmc_file_name("facescrub", "code", 2)).read_text())
    assert small["roc"] == [[0.0], [1.0]]

    probes = np.load(tmp_path / "mf" / FEATURES_DIR / "probes.npy")
    expected = [fused_code(code) for codes in PROBES.values() for code in codes]
    np.testing.assert_array_equal(probes, np.stack(expected))
    for rel, row in zip(sets["probe_lines"], probes):
        np.testing.assert_array_equal(read_feature(feature_path(devkit / "facescrub", rel, "code")), row)
    distractors = np.load(tmp_path / "mf" / FEATURES_DIR / "distractors.npy")
    last = feature_path(devkit / "megaface", sets["distractor_lines"][-1], "code")
    assert last.name == "1005_0.png_code.bin" and last.stat().st_size == 16 + 4 * 48
    np.testing.assert_array_equal(read_feature(last), distractors[-1])

    again = run_megaface(CodeEmbedder(), sets["probes"], sets["distractors"], tmp_path / "mf", cfg)
    assert again.skipped and again.rows == result.rows
    # new evaluation settings reuse the features
    other = run_megaface(CodeEmbedder(), sets["probes"], sets["distractors"], tmp_path / "mf", cfg.model_copy(update={"ranks": [1]}))
    assert not other.skipped and other.features_skipped and _by_size(other)[6]["rank_1"] == rows[6]["rank_1"]
    # a removed devkit folder is written again
    shutil.rmtree(devkit)
    assert not run_megaface(CodeEmbedder(), sets["probes"], sets["distractors"], tmp_path / "mf", cfg).skipped
    assert read_feature(last).shape == (48,)


@pytest.mark.parametrize("which", ["distractor", "probe"])
def test_noise_lists_repair_rank1(sets, tmp_path, which):
    noise = tmp_path / "noise.txt"
    if which == "distractor":
        noise.write_text("# megaface_noises.txt style\n" + sets["distractor_lines"][3] + "\n")
        cfg = CFG.model_copy(update={"distractor_noise": str(noise), "devkit_dir": str(tmp_path / "devkit")})
    else:
        noise.write_text("Alice_3.png\n")
        cfg = CFG.model_copy(update={"probe_noise": str(noise), "devkit_dir": str(tmp_path / "devkit")})
    result = run_megaface(str(export_onnx(CodeEmbedder(), tmp_path / "code.onnx")), sets["probes"], sets["distractors"],
                          tmp_path / "mf", cfg)
    rows = _by_size(result)
    assert rows[6]["rank_1"] == 1.0 and rows[2]["rank_1"] == 1.0
    assert (rows[6]["noisy_distractors"], rows[6]["noisy_probes"]) == ((1, 0) if which == "distractor" else (0, 1))
    noisy = read_feature(feature_path(tmp_path / "devkit" / "megaface", sets["distractor_lines"][3], "code"))
    assert noisy.shape == (49,) and noisy[48] == (100.0 if which == "distractor" else 0.0)  # 513-d style after removal


def test_rec_probes_match_the_image_list(sets, tmp_path):
    from_list = run_megaface(CodeEmbedder(), sets["probes"], sets["distractors"], tmp_path / "a", CFG)
    from_rec = run_megaface(CodeEmbedder(), str(sets["rec"]), sets["distractors"], tmp_path / "b", CFG)
    keys = ("distractors", "rank_1", "rank_2", "tar@far=5e-02", "pairs", "probe_identities")
    assert [{k: r[k] for k in keys} for r in from_rec.rows] == [{k: r[k] for k in keys} for r in from_list.rows]
    np.testing.assert_array_equal(np.load(tmp_path / "a" / FEATURES_DIR / "probes.npy"),
                                  np.load(tmp_path / "b" / FEATURES_DIR / "probes.npy"))


def test_interrupted_extraction_resumes_at_its_last_chunk(sets, tmp_path):
    cfg = CFG.model_copy(update={"batch_size": 2, "chunk_images": 2, "flip": False})
    model = CountingCodeEmbedder(fail_at=5)  # probes: 5 passes of 2, 2, 2, 2, 1 images; fails in the last
    with pytest.raises(RuntimeError, match="interrupted at forward pass 5"):
        run_megaface(model, sets["probes"], sets["distractors"], tmp_path / "mf", cfg)
    progress = json.loads((tmp_path / "mf" / FEATURES_DIR / "probes.npy.progress.json").read_text())
    assert progress["done"] == 8 and not (tmp_path / "mf" / "stage.json").exists()
    model.fail_at, model.calls = None, 0
    result = run_megaface(model, sets["probes"], sets["distractors"], tmp_path / "mf", cfg)
    assert model.calls == 1 + 3  # the last probe, then 6 distractors in 3 passes
    assert _by_size(result)[6]["rank_1"] == pytest.approx(RANK1_ALL, abs=1e-12)
    assert not list((tmp_path / "mf" / FEATURES_DIR).glob("*.inprogress"))
    assert load_record(tmp_path / "mf" / FEATURES_DIR).outputs.keys() == {"probes.npy", "distractors.npy"}


def test_bad_input_is_named(sets, tmp_path):
    root = sets["root"]
    noise = tmp_path / "noise.txt"
    noise.write_text("Alice_3.png\nNobody_7.png\nGhost_1.png\n")
    with pytest.raises(ValueError, match=r"noise\.txt: 2 of 3 probe noise-list entries name no probe image, e\.g\. 'Ghost_1\.png', 'Nobody_7\.png'"):
        run_megaface(CodeEmbedder(), sets["probes"], sets["distractors"], tmp_path / "mf", CFG.model_copy(update={"probe_noise": str(noise)}))
    assert not (tmp_path / "mf" / FEATURES_DIR).exists()  # checked before any extraction

    listing = tmp_path / "missing_lst"
    listing.write_text("Alice/Alice_1.png\nAlice/Alice_9.png\nZed/Zed_1.png\n")
    with pytest.raises(FileNotFoundError, match=r"missing_lst: 2 of 3 listed probe images do not exist under .*'Alice/Alice_9\.png', 'Zed/Zed_1\.png'"):
        run_megaface(CodeEmbedder(), ImageSet(path=str(listing), root=str(root / "facescrub")), sets["distractors"], tmp_path / "mf", CFG)

    flat = tmp_path / "flat_lst"
    flat.write_text("Alice_1.png\n")
    shutil.copy(root / "facescrub" / "Alice" / "Alice_1.png", tmp_path / "Alice_1.png")
    with pytest.raises(FormatError, match=r"flat_lst: probe 'Alice_1\.png' is not in an identity folder"):
        run_megaface(CodeEmbedder(), str(flat), sets["distractors"], tmp_path / "mf", CFG)

    small = tmp_path / "small" / "Alice"
    small.mkdir(parents=True)
    (small / "Alice_1.png").write_bytes(png(code_image(A, np.random.default_rng(0))[::2, ::2]))
    (tmp_path / "small" / "lst").write_text("Alice/Alice_1.png\n")
    with pytest.raises(FormatError, match=r"Alice_1\.png: image is 56x56 \(expected 112x112 aligned faces"):
        run_megaface(CodeEmbedder(), str(tmp_path / "small" / "lst"), sets["distractors"], tmp_path / "mf2", CFG)

    with pytest.raises(ValueError, match=r"Backbone: the module holds network 'y1' \(emb 16\), but network 'r100' was asked for"):
        run_megaface(get_backbone("y1", emb_size=16, blocks=(1, 1, 1, 1)), sets["probes"], sets["distractors"], tmp_path / "mf3",
                     CFG.model_copy(update={"network": "r100"}))


def test_command_line(sets, tmp_path, capsys):
    from tasks.megaface import main

    probes, distractors = sets["probes"], sets["distractors"]
    onnx = export_onnx(CodeEmbedder(), tmp_path / "code.onnx")
    assert main([str(onnx), "--probes", probes.path, "--probe-root", probes.root, "--distractors", distractors.path,
                 "--distractor-root", distractors.root, "--out-dir", str(tmp_path / "cli"), "--sizes", "2,6",
                 "--far", "0.05", "--device", "cpu", "--algo", "code"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["skipped"] is False
    assert printed["rank_1"]["2"] == 1.0 and printed["rank_1"]["6"] == pytest.approx(RANK1_ALL, abs=1e-12)
    assert (tmp_path / "cli" / cmc_file_name("facescrub", "code", 6)).is_file()
