"""The align stage's ``already_aligned`` input: aligned crops pass through without detection."""
from __future__ import annotations

import cv2
import numpy as np

from build_data import synthetic_identities
from datasets.images import load_image
from datasets.manifest import read_manifest
from tasks.align import parse_args
from tasks.alignment import EXTRA_COLUMNS, STAGE, AlignConfig, run_align


def test_aligned_crops_are_kept_or_fitted_to_the_output_size(tmp_path):
    raw = tmp_path / "raw"
    names = synthetic_identities(raw, range(2), images=2)
    first = names["synth0_000000"][0]
    face = load_image(first)  # (112, 112, 3) RGB
    person = raw / "synth0_000000"
    cv2.imwrite(str(person / "as.png"), face[:, :, ::-1])
    cv2.imwrite(str(person / "narrow.jpg"), face[:, 8:104, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])  # a 112x96 crop
    cv2.imwrite(str(person / "big.jpg"), cv2.resize(face, (224, 224), interpolation=cv2.INTER_CUBIC)[:, :, ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, 100])
    (person / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")

    cfg = AlignConfig(already_aligned=True, device="cpu")
    result = run_align(raw, tmp_path / "out", cfg)
    assert result.counts == {"ok": 7, "unreadable": 1}
    df = read_manifest(tmp_path / "out" / "manifest.parquet", stage=STAGE, extra=EXTRA_COLUMNS).set_index("source_path")
    out = tmp_path / "out"
    # A JPEG of the output size is copied byte for byte.
    assert (out / df.loc["synth0_000000/0.jpg", "output_path"]).read_bytes() == first.read_bytes()
    ok = df[df["status"] == "ok"]
    assert (ok["face_index"] == 0).all() and ok["det_score"].isna().all() and ok["landmarks"].isna().all()
    for rel in ("synth0_000000/as.png", "synth0_000000/narrow.jpg", "synth0_000000/big.jpg"):
        fitted = load_image(out / df.loc[rel, "output_path"]).astype(int)
        assert fitted.shape == (112, 112, 3), rel
        if rel.endswith("narrow.jpg"):  # 112x96 -> 112x112: 8 black columns on each side, the crop between
            assert fitted[:, :7].max() < 24 and fitted[:, -7:].max() < 24
            assert np.abs(fitted[:, 10:102] - face[:, 10:102]).mean() < 3
        else:
            assert np.abs(fitted - face).mean() < 3, rel
    assert df.loc["synth0_000000/broken.jpg", "status"] == "unreadable"
    assert run_align(raw, out, cfg).skipped
    # The option is part of the output parameters: the same folder as photos would be redone.
    assert cfg.params_hash() != AlignConfig(device="cpu").params_hash()
    assert "already_aligned" not in AlignConfig().output_params()  # hashes of detected outputs are unchanged
    narrow = run_align(raw, tmp_path / "narrow", AlignConfig(already_aligned=True, image_size="112x96"))
    assert narrow.counts["ok"] == 7
    assert load_image(tmp_path / "narrow" / "images" / "synth0_000000" / "0.jpg").shape == (112, 96, 3)


def test_command_line_flag():
    assert parse_args(["raw", "out", "--already-aligned"])[1].already_aligned is True
    assert parse_args(["raw", "out"])[1].already_aligned is False
