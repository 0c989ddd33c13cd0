from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest

from datasets.atomic import atomic_open, atomic_paths, remove_partials
from datasets.errors import FormatError
from datasets.hashing import params_hash, sha256_file
from datasets.manifest import (
    clear_parts,
    read_manifest,
    read_parts,
    split_reusable,
    status_counts,
    upsert,
    write_manifest,
    write_part,
)

EXTRA = {"label": pa.int64(), "bbox": pa.list_(pa.float32())}


def rows(ids, status="ok", ph="p1", sha=None):
    return pd.DataFrame(
        {
            "item_id": ids,
            "source_path": [f"raw/{i}.jpg" for i in ids],
            "source_sha256": sha or [f"sha-{i}" for i in ids],
            "params_hash": ph,
            "status": status,
            "reason": "",
            "output_path": [f"{i}.jpg" for i in ids],
            "label": list(range(len(ids))),
            "bbox": [[0.0, 1.0, 2.0, 3.0]] * len(ids),
        }
    )


def test_roundtrip_keeps_types_and_metadata(tmp_path):
    path = tmp_path / "manifest.parquet"
    write_manifest(path, rows(["a", "b"]), stage="align", extra=EXTRA)
    df = read_manifest(path, stage="align", extra=EXTRA)
    assert list(df["item_id"]) == ["a", "b"]
    assert list(df["bbox"][0]) == [0.0, 1.0, 2.0, 3.0]
    assert df["label"].dtype == "int64"
    with pytest.raises(FormatError, match="stage 'pack'"):
        read_manifest(path, stage="pack")


def test_missing_manifest_is_empty_with_columns(tmp_path):
    df = read_manifest(tmp_path / "nope.parquet", extra=EXTRA)
    assert df.empty and {"item_id", "status", "label", "bbox"} <= set(df.columns)


def test_corrupt_manifest_names_file(tmp_path):
    path = tmp_path / "manifest.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(FormatError, match=str(path)):
        read_manifest(path)


def test_rejects_duplicates_and_missing_columns(tmp_path):
    df = rows(["a", "a"])
    with pytest.raises(ValueError, match="duplicate item_id"):
        write_manifest(tmp_path / "m.parquet", df, stage="s", extra=EXTRA)
    with pytest.raises(ValueError, match="lack columns"):
        write_manifest(tmp_path / "m.parquet", rows(["a"]).drop(columns=["status"]), stage="s")
    assert not list(tmp_path.iterdir()), "a refused write must leave nothing behind"


def test_upsert_and_reuse(tmp_path):
    old = rows(["a", "b", "c"])
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "source_sha256": ["sha-a", "changed", "sha-c", "sha-d"]})
    reused, todo = split_reusable(old, items, "p1", output_root=tmp_path)
    # a: same digest, output exists; b: digest changed; c: output file gone; d: new
    assert list(reused["item_id"]) == ["a"]
    assert list(todo["item_id"]) == ["b", "c", "d"]
    reused, todo = split_reusable(old, items, "p2")
    assert reused.empty and len(todo) == 4
    merged = upsert(old, rows(["b", "d"], status="no_face"))
    assert list(merged["item_id"]) == ["a", "c", "b", "d"]
    assert status_counts(merged) == {"no_face": 2, "ok": 2}


def test_parts(tmp_path):
    write_part(tmp_path, "shard-0001", rows(["a"]), stage="align", extra=EXTRA)
    write_part(tmp_path, "shard-0000", rows(["b"]), stage="align", extra=EXTRA)
    assert list(read_parts(tmp_path, stage="align", extra=EXTRA)["item_id"]) == ["b", "a"]
    clear_parts(tmp_path)
    assert read_parts(tmp_path, stage="align", extra=EXTRA).empty


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write(b"new but unfinished")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_survives_sigkill(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = (
        "import os, signal, sys; from datasets.atomic import atomic_open\n"
        f"with atomic_open({str(target)!r}) as fh:\n"
        "    fh.write(b'x' * 1000); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=os.environ.copy())
    assert proc.returncode == -9
    assert target.read_bytes() == b"old"
    assert len(remove_partials(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["big.bin"]


def test_atomic_paths_renames_all(tmp_path):
    with atomic_paths(tmp_path / "a", tmp_path / "b") as (ta, tb):
        ta.write_text("1")
        tb.write_text("2")
        assert not (tmp_path / "a").exists()
    assert (tmp_path / "a").read_text() == "1" and (tmp_path / "b").read_text() == "2"


def test_hashes(tmp_path):
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash({"a": 1}) != params_hash({"a": 2})
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
