"""The demo's sample and parameters: valid for both flows, written once."""
from __future__ import annotations

from pathlib import Path

from tasks.bins import missing_images, read_pairs
from flows.demo import PHOTOS, build_params, prepare_sample, train_params
from flows.params import BuildDatasetParams
from flows.train_params import TrainAndEvalParams

TINY = {"identities": 3, "images": 2, "held_out_identities": 4, "held_out_images": 3, "pairs": 20, "seed": 0}


def test_sample_is_written_once_and_the_parameters_validate(tmp_path: Path):
    sample = prepare_sample(tmp_path, TINY)
    faces = sorted((sample / "identities").rglob("*.jpg"))
    assert len(faces) == 6 and len(list((sample / "heldout").rglob("*.jpg"))) == 12
    pairs = read_pairs(sample / "pairs.csv", sample / "heldout")
    assert len(pairs) == 20 and not missing_images(pairs)
    stamp = faces[0].stat().st_mtime_ns
    assert prepare_sample(tmp_path, TINY) == sample and faces[0].stat().st_mtime_ns == stamp  # not rewritten

    build = BuildDatasetParams(**build_params(tmp_path, sample))
    build.check_inputs()
    assert build.raw_dir == str(PHOTOS) and build.pairs[0].name == "synth_val"
    train = TrainAndEvalParams(**train_params(tmp_path))
    assert train.dataset_dir() == tmp_path / "datasets" / "sample"
    cfg = train.train_config()
    assert (cfg.network, cfg.image_hw, cfg.device) == ("m05", (112, 112), "cpu")
