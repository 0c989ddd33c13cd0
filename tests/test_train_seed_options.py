"""The 2018 train_softmax.py options users pass: each works (with its effect checked on the objects it
configures) or is refused with one line naming what replaces it; output option AD; --val-targets '[]'."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.margins import SphereFace, get_margin
from tasks.checkpoint import build_backbone
from tasks.training.config import TrainConfig, load_config, parse_args
from tasks.training.objectives import ClassifierObjective
from tasks.training.trainer import set_bn_momentum


def test_train_softmax_options_work(tmp_path: Path):
    cfg = parse_args(["--network", "m1", "--loss-type", "0", "--prefix", str(tmp_path / "model-m1"),
                      "--fc7-wd-mult", "10", "--fc7-lr-mult", "2", "--fc7-no-bias", "--bn-mom", "0.99",
                      "--rand-mirror", "0", "--version-multiplier", "0.25", "--version-output", "AD", "--lr", "0.2"])
    assert cfg.output == str(tmp_path / "model-m1") and cfg.flip is False and cfg.version_output == "AX"
    assert (cfg.fc7_wd_mult, cfg.fc7_lr_mult, cfg.fc7_no_bias, cfg.bn_mom) == (10.0, 2.0, True, 0.99)
    backbone = build_backbone(cfg.backbone_args())
    assert backbone.head.option == "AX" and any(isinstance(m, torch.nn.Dropout) for m in backbone.head.modules())
    assert backbone.emb_size == 256  # option A: the trunk's last width, 1024 * 0.25: the multiplier reached it
    set_bn_momentum(backbone, cfg.bn_mom)
    momenta = {m.momentum for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert momenta == {0.01}
    set_bn_momentum(backbone, 0.9)
    assert {m.momentum for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)} == {0.1}

    objective = ClassifierObjective(cfg, emb_size=16, num_classes=10, device=torch.device("cpu"))
    assert objective.pfc.bias is None  # softmax without fc7 bias
    (group,) = objective.param_groups(cfg)
    assert group["lr"] == pytest.approx(0.4) and group["weight_decay"] == pytest.approx(5e-3)
    with_bias = ClassifierObjective(cfg.model_copy(update={"fc7_no_bias": False}), 16, 10, torch.device("cpu"))
    assert with_bias.pfc.bias is not None and len(with_bias.param_groups(cfg)) == 2


def test_sphereface_annealing_options_reach_the_head():
    cfg = parse_args(["--loss-type", "1", "--beta", "100", "--beta-min", "2", "--beta-freeze", "3", "--gamma", "0.5",
                      "--power", "2"])
    head = get_margin(cfg.loss, num_classes=30000, **cfg.margin_args())
    assert isinstance(head, SphereFace) and head.m == 4
    assert (head.base, head.beta_min, head.beta_freeze, head.gamma, head.power) == (100.0, 2.0, 3, 0.5, 2.0)
    for _ in range(5):  # 2 steps after the freeze: max(2, 100 (1 + 0.5 * 2)^-2) = 25
        head.step()
    assert float(head.beta()) == pytest.approx(25.0)
    default = get_margin("sphereface", num_classes=30000, **TrainConfig(loss=1).margin_args())
    assert (default.beta_freeze, default.gamma) == (5000, 0.06)  # the 2018 rule above 20000 classes still applies
    with pytest.raises(ValueError, match=r"beta, gamma apply to loss sphereface \(loss type 1\) only, not to 'arcface'"):
        load_config(None, {"beta": 10, "gamma": 0.1})


@pytest.mark.parametrize("argv, replacement", [
    (["--images-filter", "10"], "lst.min_images=N"),
    (["--margin", "4"], "margin_m"),
    (["--ce-loss"], "logged as 'loss'"),
])
def test_options_without_counterpart_say_what_replaces_them(argv, replacement):
    with pytest.raises(ValueError, match="is not a training option here") as err:
        parse_args(argv)
    assert replacement in str(err.value) and "\n" not in str(err.value)


def test_val_targets_empty_list_and_bracket_forms():
    assert parse_args(["--val-targets", "[]"]).val_targets == []
    assert parse_args(["--val-targets", "[lfw, 'cfp_fp']"]).val_targets == ["lfw", "cfp_fp"]
    assert parse_args(["--val-targets", "lfw,agedb_30"]).val_targets == ["lfw", "agedb_30"]
    assert parse_args(["--target", ""]).val_targets == []
    assert parse_args([]).val_targets is None


def test_output_option_spellings():
    for spelling, canonical in [("AD", "AX"), ("bd", "BX"), ("XD", "DX"), ("DX", "DX"), ("GAP", "C"), ("gdc", "GDC")]:
        assert TrainConfig(version_output=spelling).version_output == canonical
    with pytest.raises(ValueError, match="version_output 'ZZ' is not an embedding option"):
        TrainConfig(version_output="ZZ")
    with pytest.raises(ValueError, match="version_multiplier applies to MobileNet codes"):
        TrainConfig(network="r50", version_multiplier=0.5)
