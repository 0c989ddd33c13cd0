"""TrainConfig: the seeds' option names and spellings, presets, and errors that name the option and value."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from models.margins import get_margin
from tasks.training.config import TrainConfig, load_config, parse_args

CONFIGS = ROOT / "configs"


def test_seed_command_line_spellings(tmp_path: Path):
    cfg = parse_args(["--network", "r100", "--loss-type", "4", "--margin-m", "0.5", "--lr-steps", "100000,140000,160000",
                      "--per-batch-size", "64", "--ckpt", "2", "--verbose", "1000", "--target", "lfw,agedb_30",
                      "--easy-margin", "--data-dir", str(tmp_path), "--loss_m1", "1.0", "--mom=0.0"])
    assert cfg.network == "r100" and cfg.loss == "arcface" and cfg.margin_m == 0.5
    assert cfg.lr_steps == [100000, 140000, 160000] and cfg.per_batch_size == 64
    assert cfg.ckpt == 2 and cfg.ckpt_policy == "all" and cfg.verbose == 1000
    assert cfg.val_targets == ["lfw", "agedb_30"] and cfg.dataset == str(tmp_path)
    assert cfg.easy_margin is True and cfg.margin_m1 == 1.0 and cfg.mom == 0.0
    head = get_margin(cfg.loss, **cfg.margin_args())
    assert type(head).__name__ == "ArcFace" and head.m == 0.5 and head.easy_margin


@pytest.mark.parametrize("number, name", [(0, "softmax"), (1, "sphereface"), (2, "cosface"), (4, "arcface"),
                                          (5, "combined"), (12, "triplet")])
def test_loss_type_numbers(number, name):
    cfg = TrainConfig(loss=number, per_batch_size=150)
    assert cfg.loss == name and cfg.is_triplet == (name == "triplet")


def test_yaml_with_dashes_and_overrides(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text("network: y1\nloss-type: 2\nmargin-m: 0.35\nper-batch-size: 32\nlr-steps: [10, 20]\n")
    cfg = load_config(path, {"lr": "0.01", "per-batch-size": 16})
    assert (cfg.network, cfg.loss, cfg.margin_m, cfg.lr_steps) == ("y1", "cosface", 0.35, [10, 20])
    assert cfg.lr == 0.01 and cfg.per_batch_size == 16
    combined = TrainConfig(loss="combined", margin_m=0.4, margin_m3=0.1).margin_args()
    assert combined == {"s": 64.0, "m2": 0.4, "m3": 0.1}  # 2019 margin_m is the additive angle m2


def test_every_preset_loads_and_matches_its_seed_command():
    presets = {p.stem: load_config(p) for p in sorted(CONFIGS.glob("*.yaml"))}
    assert set(presets) >= {"r100-arcface", "r50-cosface", "y1-softmax", "m1-triplet", "cpu-demo"}
    r100 = presets["r100-arcface"]
    assert (r100.network, r100.loss, r100.margin_m) == ("r100", "arcface", 0.5)
    r50 = presets["r50-cosface"]
    assert (r50.network, r50.loss, r50.margin_m) == ("r50", "cosface", 0.35)
    y1 = presets["y1-softmax"]
    assert (y1.network, y1.loss, y1.emb_size, y1.version_output) == ("y1", "softmax", 128, "GDC")
    m1 = presets["m1-triplet"]
    assert (m1.network, m1.loss, m1.lr, m1.mom, m1.per_batch_size, m1.triplet_alpha) == ("m1", "triplet", 0.005, 0.0, 150, 0.3)
    assert m1.pretrained


@pytest.mark.parametrize("options, message", [
    ({"network": "r7"}, r"option 'network': network 'r7' is not a known code; valid codes: r18, .*y1"),
    ({"loss": 3}, r"option 'loss': loss type 3 is not supported; valid loss types: 0 \(softmax\)"),
    ({"loss": "arcfac"}, r"option 'loss': loss 'arcfac' is not known; valid losses: softmax"),
    ({"ckpt": 4}, r"option 'ckpt': ckpt 4 is not a policy; valid: 0 \(none\), 1 \(best\), 2 \(all\), 3 \(last\)"),
    ({"lr_steps": "100,50"}, r"option 'lr_steps': lr_steps '100,50' must be positive and increasing"),
    ({"image_size": "112"}, r"option 'image_size': image size '112': expected two integers of at least 16, height x width"),
    ({"per_batch_size": 0}, r"option 'per_batch_size': .*greater than or equal to 2 \(got 0\)"),
    ({"amp": "fp8"}, r"option 'amp': .*'auto', 'bf16', 'fp16' or 'none' \(got 'fp8'\)"),
    ({"loss": 12, "per_batch_size": 64}, r"per_batch_size 64 must be a multiple of images_per_identity 5"),
    ({"lrr": 0.1}, r"option 'lrr': is not an option; did you mean lr\?"),
])
def test_errors_name_the_option_and_value(options, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, options)


def test_command_line_errors(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        parse_args(["--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.yaml: training config not found"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        parse_args(["--no-such-option", "1"])
