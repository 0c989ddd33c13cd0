"""The merge stage (dataset_merge.py): concatenation, name merge, model de-duplication and exclusion.

Datasets are packed from generated identities: A holds identities 0-5, B identities 3-8 of the same
seed, so identities 3, 4, 5 have byte-identical images in both. The embedding model is a small
weight-free torch module (:class:`build_data.PixelEmbedder`), used directly and as an ONNX export.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from build_data import PixelEmbedder, export_onnx, synthetic_identities
from datasets.errors import FormatError
from datasets.manifest import read_manifest
from datasets.rec_layout import read_property, read_rec_index
from datasets.recordio import MXIndexedRecordIO, read_idx_arrays, unpack
from datasets.verification_bin import write_bin
from tasks.alignment import AlignConfig, run_align
from datasets.rec_layout import read_labels
from tasks.lst import run_lst
from tasks.merge import EXTRA_COLUMNS, STAGE, MergeConfig, identity_centres, load_embedding_model, run_merge
from tasks.pack import run_pack


def _packed(root, identities: range):
    raw = root / "faces"
    names = synthetic_identities(raw, identities, images=3)
    aligned = run_align(raw, root / "aligned", AlignConfig(already_aligned=True)).out_dir
    lst = run_lst([aligned], root / "lst").out_dir
    return run_pack(lst, root / "pack").out_dir, names


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a, names_a = _packed(root / "a", range(0, 6))
    b, names_b = _packed(root / "b", range(3, 9))
    c, _ = _packed(root / "c", range(4, 5))
    onnx = export_onnx(PixelEmbedder(), root / "pixel.onnx")
    return {"a": a, "b": b, "c": c, "names": {**names_a, **names_b}, "onnx": onnx, "root": root}


def _payloads(folder) -> list[bytes]:
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
        n = int(unpack(rec.read_idx(0))[0].label[0]) - 1
        return [unpack(rec.read_idx(k))[1] for k in range(1, n + 1)]


def _manifest(out):
    return read_manifest(out / "manifest.parquet", stage=STAGE, extra=EXTRA_COLUMNS).set_index("item_id")


def _expected_centre(paths) -> np.ndarray:
    """Independent identity centre: decode the source JPEGs, normalise as arcface, embed, average."""
    rgb = np.stack([cv2.imread(str(p))[:, :, ::-1] for p in paths]).astype(np.float32)
    x = torch.from_numpy((rgb - 127.5) / 127.5).permute(0, 3, 1, 2)
    emb = torch.nn.functional.normalize(PixelEmbedder()(x), dim=1).mean(0)
    return torch.nn.functional.normalize(emb, dim=0).numpy()


def test_concatenate_and_merge_by_name(tmp_path, packs):
    concat = run_merge([packs["a"], packs["b"]], tmp_path / "concat")
    assert (concat.identities, concat.images) == (12, 36) and concat.counts == {"kept": 12}
    assert str(read_property(concat.property_path)) == "12,112,112"
    assert sorted(_payloads(concat.out_dir)) == sorted(_payloads(packs["a"]) + _payloads(packs["b"]))
    keys, _ = read_idx_arrays(concat.idx_path)
    assert keys[-1] == 0 and list(keys[:36]) == list(range(1, 37))  # record 0 written last, as dataset_merge.py
    header, _ = unpack(MXIndexedRecordIO(concat.idx_path, concat.rec_path, "r").read_idx(1))
    assert header.flag == 0 and header.label == 0.0  # scalar labels, as dataset_merge.py
    labels = read_labels(concat.out_dir / "labels.csv")
    assert labels["synth0_000003#3"] == 3 and labels["synth0_000003#6"] == 6  # one name twice: told apart

    by_name = run_merge([packs["a"], packs["b"]], tmp_path / "name", MergeConfig(dedup="name"))
    assert (by_name.identities, by_name.images) == (9, 36)
    df = _manifest(by_name.out_dir)
    for label in (3, 4, 5):
        row = df.loc[f"1:{label - 3}"]
        assert row["status"] == "merged" and row["collided_with"] == f"0:{label}" and row["new_label"] == label
    index = read_rec_index(by_name.out_dir)
    assert len(index.identities) == 9 and index.labels.tolist() == sorted(index.labels.tolist())
    assert np.diff(index.identities, axis=1).ravel().tolist() == [3, 3, 3, 6, 6, 6, 3, 3, 3]
    assert read_labels(by_name.out_dir / "labels.csv") == {f"synth0_{i:06d}": i for i in range(9)}
    assert run_merge([packs["a"], packs["b"]], tmp_path / "name", MergeConfig(dedup="name")).skipped


def test_model_dedup_and_exclusion_match_an_independent_computation(tmp_path, packs):
    names = packs["names"]
    centres = {name: _expected_centre(sorted(paths)) for name, paths in names.items()}
    a_names = [f"synth0_{i:06d}" for i in range(6)]
    b_names = [f"synth0_{i:06d}" for i in range(3, 9)]
    closest = sorted(max(float(centres[b] @ centres[a]) for a in a_names) for b in b_names[3:])
    param1 = closest[1]  # of the three identities only in B, the closest two collide, the third does not

    cfg = MergeConfig(dedup="model", model=str(packs["onnx"]), param1=param1)
    result = run_merge([packs["a"], packs["b"]], tmp_path / "model", cfg)
    df = _manifest(result.out_dir)
    assert (df.loc[[f"0:{i}" for i in range(6)], "status"] == "kept").all()  # the first dataset is kept whole
    kept_a = np.stack([centres[n] for n in a_names])
    for label, name in enumerate(b_names):
        row = df.loc[f"1:{label}"]
        sims = kept_a @ centres[name]
        best = int(np.argmax(sims))
        if sims[best] >= param1:
            assert row["status"] == "duplicate" and row["collided_with"] == f"0:{best}"
            assert row["cosine"] == pytest.approx(sims[best], abs=2e-3)
            assert f">= param1 {param1}" in row["reason"]
        else:
            assert row["status"] == "kept" and np.isnan(row["cosine"])
    assert sorted(df.loc[["1:3", "1:4", "1:5"], "status"]) == ["duplicate", "duplicate", "kept"]
    for label in range(3):  # identical images: cosine 1
        assert df.loc[f"1:{label}", "cosine"] == pytest.approx(1.0, abs=1e-4)
        assert df.loc[f"1:{label}", "collided_with"] == f"0:{label + 3}"
    kept = df[df["status"] == "kept"]
    assert result.identities == len(kept) and sorted(kept["new_label"]) == list(range(len(kept)))
    assert run_merge([packs["a"], packs["b"]], tmp_path / "model", cfg).skipped

    # The same decisions with the torch module passed directly.
    direct = run_merge([packs["a"], packs["b"]], tmp_path / "direct", cfg.model_copy(update={"model": None}),
                       embedder=PixelEmbedder())
    assert _manifest(direct.out_dir)["status"].to_dict() == df["status"].to_dict()
    assert (direct.rec_path.read_bytes() == result.rec_path.read_bytes())

    # Exclusion: a packed set holding identity 4, and a .bin of two of identity 7's images.
    seven = sorted(names["synth0_000007"])
    bin_path = write_bin(tmp_path / "probe.bin", [p.read_bytes() for p in seven[:2]], [True])
    vectors = np.stack([centres["synth0_000004"], *(_expected_centre([p]) for p in seven[:2])])
    param2 = float((vectors[1:] @ centres["synth0_000007"]).max()) - 1e-3
    exclude = MergeConfig(dedup="none", model=str(packs["onnx"]), param2=param2, exclude=[str(packs["c"]), str(bin_path)])
    cleaned = run_merge([packs["a"], packs["b"]], tmp_path / "cleaned", exclude)
    df = _manifest(cleaned.out_dir)
    item_names = {f"0:{i}": n for i, n in enumerate(a_names)} | {f"1:{i}": n for i, n in enumerate(b_names)}
    expected = {item for item, name in item_names.items() if (vectors @ centres[name]).max() >= param2}
    assert {"0:4", "1:1", "1:4"} <= expected
    excluded = df[df["status"] == "excluded"]
    assert set(excluded.index) == expected, excluded[["identity", "cosine", "collided_with"]]
    assert excluded.loc["0:4", "collided_with"] == "pack identity 'synth0_000004' (label 0)"
    assert excluded.loc["0:4", "cosine"] == pytest.approx(1.0, abs=1e-4)
    assert excluded.loc["1:4", "collided_with"] in ("probe.bin image 0", "probe.bin image 1")
    assert excluded.loc["1:4", "cosine"] == pytest.approx(param2 + 1e-3, abs=2e-3)
    assert cleaned.identities == 12 - len(expected)


def test_bad_merges_are_refused(tmp_path, packs):
    with pytest.raises(ValueError, match="needs an embedding model"):
        run_merge([packs["a"]], tmp_path / "x", MergeConfig(dedup="model"))
    with pytest.raises(FileNotFoundError, match="embedding model not found"):
        run_merge([packs["a"], packs["b"]], tmp_path / "x", MergeConfig(dedup="model", model=str(tmp_path / "none.onnx")))
    with pytest.raises(FormatError, match="neither a packed dataset folder nor a .bin"):
        run_merge([packs["a"]], tmp_path / "x", MergeConfig(model=str(packs["onnx"]), exclude=[str(packs["onnx"])]))
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="model.pt"):
        load_embedding_model(fake)
    raw = tmp_path / "narrow"
    synthetic_identities(raw, range(2), images=2)
    aligned = run_align(raw, tmp_path / "al", AlignConfig(already_aligned=True, image_size="112x96")).out_dir
    narrow = run_pack(run_lst([aligned], tmp_path / "lst").out_dir, tmp_path / "pack").out_dir
    with pytest.raises(ValueError, match="different image sizes"):
        run_merge([packs["a"], narrow], tmp_path / "x")
    labels, centres = identity_centres(packs["c"], PixelEmbedder())
    assert labels.tolist() == [0] and np.linalg.norm(centres, axis=1) == pytest.approx([1.0])
