from __future__ import annotations

from tasks.stage import code_version, commit_record, current_record, invalidate, load_record


def test_record_matches_only_same_everything(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"1234")
    code = code_version("tasks.stage")
    rec = commit_record(tmp_path, "pack", {"q": 95}, {"lst": "abc"}, code, ["out.bin"], {"images": 1})
    assert rec.outputs == {"out.bin": 4}
    assert current_record(tmp_path, "pack", {"q": 95}, {"lst": "abc"}, code) == rec
    assert current_record(tmp_path, "pack", {"q": 90}, {"lst": "abc"}, code) is None
    assert current_record(tmp_path, "pack", {"q": 95}, {"lst": "xyz"}, code) is None
    assert current_record(tmp_path, "pack", {"q": 95}, {"lst": "abc"}, "other") is None
    (tmp_path / "out.bin").write_bytes(b"12345")  # output changed under us
    assert current_record(tmp_path, "pack", {"q": 95}, {"lst": "abc"}, code) is None
    invalidate(tmp_path)
    assert load_record(tmp_path) is None


def test_fingerprint_changes_with_outputs(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    r1 = commit_record(tmp_path, "s", {}, {}, "c", ["a"])
    (tmp_path / "a").write_bytes(b"12")
    r2 = commit_record(tmp_path, "s", {}, {}, "c", ["a"])
    assert r1.fingerprint != r2.fingerprint
