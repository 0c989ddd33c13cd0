"""``whiten_trunk``: PCA whitening of the trunk's mirror-symmetric features (models/whitening.py), fit by the
trainer at each checkpoint, rebuilt by load_embedder, evaluated during training and exported to ONNX."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.errors import FormatError
from datasets.rec_dataset import RecFaceDataset
from datasets.normalization import normalize_batch
from models import get_backbone
from models.whitening import Whitening, WhitenedTrunkEmbedding, fit_whitening, mirror_features
from tasks.checkpoint import load_embedder, read_checkpoint, save_checkpoint
from tasks.export import export_onnx
from tasks.training.record import read_metrics
from tasks.training.trainer import train
from train_data import tiny_config, tiny_dataset


def test_whitened_fit_features_have_unit_covariance_and_rank_at_most_n_minus_1():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(20, 200, generator=gen, dtype=torch.float64) * torch.logspace(0, 3, 20, dtype=torch.float64)[:, None]
    features = torch.randn(50, 20, generator=gen, dtype=torch.float64) @ mixing + 5.0  # rank 20 in 200 dimensions
    w = fit_whitening(features)
    assert w.mean.shape == (200,) and w.proj.shape == (200, 20) and w.proj.dtype == torch.float32
    z = ((features.float() - w.mean) @ w.proj).double()
    cov = z.T @ z / (len(z) - 1)
    assert torch.allclose(cov, torch.eye(20, dtype=torch.float64), atol=2e-3), (cov - torch.eye(20)).abs().max()
    wide = fit_whitening(torch.randn(10, 300, generator=gen))
    assert wide.dim == 9  # centring 10 points leaves 9 directions


@pytest.mark.parametrize("features, message", [
    (torch.ones(5, 8), "do not vary"),
    (torch.ones(5, 8) + 1e-9 * torch.randn(5, 8), "do not vary beyond float32 rounding"),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "NaN or infinite"),
    (torch.ones(1, 8), "N >= 2"),
])
def test_features_that_cannot_be_whitened_are_refused(features, message):
    with pytest.raises(ValueError, match=message):
        fit_whitening(features)


def test_the_branch_is_mirror_invariant_unit_norm_and_as_documented():
    torch.manual_seed(0)
    backbone = get_backbone("onet", emb_size=16, image_size=(48, 48)).eval()
    x = torch.randn(6, 3, 48, 48)
    with torch.no_grad():
        features = mirror_features(backbone.trunk, x)
        assert features.shape == (6, 64 * 8 * 4)  # conv3 of ONet at 48x48: 64 x 8 x 8, the left half kept
        assert torch.allclose(features, mirror_features(backbone.trunk, x.flip(3)), atol=1e-5)
        w = fit_whitening(torch.cat([features, mirror_features(backbone.trunk, torch.randn(10, 3, 48, 48))]))
        model = WhitenedTrunkEmbedding(backbone, w).eval()
        out = model(x)
        assert out.shape == (6, 16 + w.dim) and model.emb_size == 16 + w.dim
        assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-5)
        assert torch.allclose(out, model(x.flip(3)), atol=1e-5)
        head = backbone(x) + backbone(x.flip(3))
        whitened = (features - w.mean) @ w.proj
        expected = torch.cat([torch.nn.functional.normalize(head, dim=1), torch.nn.functional.normalize(whitened, dim=1)], 1)
        assert torch.allclose(out, expected / 2 ** 0.5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as evaluation runs on CUDA: the branch stays float32
            assert torch.allclose(model(x), out, atol=1e-6)
            assert torch.equal(mirror_features(backbone.trunk, x), features)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 48, 48\)"):
        model(torch.zeros(1, 3, 40, 40))


# the detector's convolutions give varied features from the first step (a fresh m05 trunk's barely vary)
ONET = {"network": "onet", "version_input": 1}


@pytest.fixture(scope="module")
def whitened_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whiten-run")
    train(tiny_config(out, max_steps=3, verbose=3, whiten_trunk=True, **ONET))
    return out


def test_the_checkpoint_carries_the_fit_and_load_embedder_rebuilds_the_branch(whitened_run: Path):
    state = read_checkpoint(whitened_run / "checkpoints" / "last.pt")
    w = Whitening.from_state(state["whitening"])
    model, meta = load_embedder(whitened_run / "checkpoints" / "last.pt")
    assert isinstance(model, WhitenedTrunkEmbedding) and not model.training
    assert meta["emb_size"] == model.emb_size == 32 + w.dim and "whitened trunk" in meta["embedding"]
    # the fit is the training images' features, whitened: unit variance on them, as fit_whitening promises
    data = RecFaceDataset(tiny_dataset(), normalize=None)
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        features = mirror_features(model.backbone.trunk, normalize_batch(images, "arcface"))
    z = ((features - w.mean) @ w.proj).double()
    assert 1 <= w.dim <= min(len(data) - 1, features.shape[1])
    assert np.allclose(z.var(0, unbiased=True).numpy(), 1.0, atol=1e-3)
    val = read_metrics(whitened_run)
    val = val[val["kind"] == "val"]
    assert len(val) == 1 and val["accuracy"].between(0, 1).all()
    assert np.allclose(val["xnorm"], 1.0, atol=1e-4)  # unit raw norms: the wrapped model was evaluated, not the backbone


def test_a_resumed_run_refits_and_a_whitening_that_does_not_fit_is_named(whitened_run: Path, tmp_path: Path):
    first = read_checkpoint(whitened_run / "checkpoints" / "last.pt")["whitening"]["proj"].clone()
    result = train(tiny_config(whitened_run, max_steps=5, verbose=5, whiten_trunk=True, resume="auto", **ONET))
    assert result.step == 5
    again = read_checkpoint(result.last_checkpoint)["whitening"]["proj"]
    assert again.shape == first.shape and not torch.allclose(again, first)  # trained further: features changed
    state = read_checkpoint(result.last_checkpoint)
    state["whitening"]["proj"] = torch.zeros(7, 3)
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(FormatError, match=r"bad\.pt.*'whitening' entry does not fit the network"):
        load_embedder(tmp_path / "bad.pt")


def test_a_whitened_model_exports_to_onnx_with_the_same_embeddings(whitened_run: Path, tmp_path: Path):
    result = export_onnx(whitened_run / "checkpoints" / "last.pt", tmp_path / "model.onnx")
    assert result.max_abs_diff <= 1e-4 and (tmp_path / "model.onnx").is_file()
