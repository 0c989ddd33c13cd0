"""Published models in: arcface_torch ``backbone.pth`` state dicts, insightface-style ONNX models, refused pickles.

The references are the small restatements of arcface_torch's networks in ``tests/published_refs.py``
(its key names, layer order and BN eps), with random weights; inputs are 32x32 so that every test is
fast (arcface_torch's 7x7 FC becomes 2x2). The MXNet formats are in ``test_mxnet_models.py``.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from datasets.errors import FormatError
from datasets.mxnet_params import read_ndarray_list, read_params, resolve_mxnet_checkpoint, write_ndarray_list
from models import get_backbone
from published_refs import IResNet, MobileFaceNet, randomize
from tasks.checkpoint import load_embedder, load_published_into, model_files_digest
from tasks.evaluation.model import ExtractionConfig, load_eval_model
from tasks.export import export_onnx

SIZE = 32


def _pixels(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.5) / 127.5


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = float(a.abs().max())
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rtol * max(scale, 1e-6), (float((a - b).abs().max()), scale)


@pytest.fixture(scope="module")
def iresnet18() -> IResNet:
    torch.manual_seed(0)
    return randomize(IResNet((2, 2, 2, 2), num_features=64, fc_scale=4), seed=1)


@pytest.fixture(scope="module")
def mbf() -> MobileFaceNet:
    torch.manual_seed(0)
    return randomize(MobileFaceNet(num_features=32, blocks=(1, 4, 6, 2), scale=2, gdc_kernel=2), seed=2)


@pytest.mark.parametrize("wrap", ["plain", "nested-ddp"])
def test_iresnet_state_dict_gives_arcface_torch_embeddings(iresnet18, tmp_path, wrap):
    state = iresnet18.state_dict()
    if wrap == "nested-ddp":  # as saved from a DistributedDataParallel wrapper inside a training dict
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, tmp_path / "backbone.pth")
    model, meta = load_embedder(tmp_path / "backbone.pth")
    assert (meta["source"], meta["network"], meta["normalize"], meta["image_size"], meta["emb_size"]) == \
        ("arcface_torch", "iresnet18", "arcface", [SIZE, SIZE], 64)
    assert "iresnet18" in meta["conversion"] and model.variant == "arcface_torch"
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    x = _normalised(_pixels())
    with torch.no_grad():
        _same(iresnet18(x), model(x))


def test_fp16_mobilefacenet_state_dict(mbf, tmp_path):
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in mbf.state_dict().items()}, tmp_path / "mbf.pth")
    model, meta = load_embedder(tmp_path / "mbf.pth")
    assert meta["network"] == "mbf" and meta["backbone_args"]["scale"] == 2 and "fp16 -> fp32" in meta["conversion"]
    rounded = randomize(MobileFaceNet(32, (1, 4, 6, 2), 2, 2), seed=2)
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in mbf.state_dict().items()})
    x = _normalised(_pixels())
    with torch.no_grad():
        _same(rounded(x), model(x))
        assert next(model.parameters()).dtype == torch.float32


def test_mobilefacenet_large_style_first_residual_stack(tmp_path):
    """arcface_torch's Residual stack before the first reduction expands to 128 at every scale (mbf_large)."""
    ref = randomize(MobileFaceNet(16, blocks=(2, 1, 1, 1), scale=1, gdc_kernel=2), seed=3)
    torch.save(ref.state_dict(), tmp_path / "large.pth")
    model, meta = load_embedder(tmp_path / "large.pth")
    assert meta["backbone_args"]["blocks"] == [2, 1, 1, 1]
    x = _normalised(_pixels(2))
    with torch.no_grad():
        _same(ref(x), model(x))


def test_eval_model_and_onnx_export_of_a_backbone_pth(mbf, tmp_path):
    torch.save(mbf.state_dict(), tmp_path / "backbone.pth")
    loaded = load_eval_model(tmp_path / "backbone.pth")
    row = loaded.describe()
    assert row["model_kind"] == "arcface_torch" and row["normalize"] == "arcface" and "mbf" in row["conversion"]
    pixels = _pixels(4)
    got = loaded.embed(pixels, ExtractionConfig(flip=False, device="cpu")).fused
    with torch.no_grad():
        want = torch.nn.functional.normalize(mbf(_normalised(pixels)), dim=1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    result = export_onnx(tmp_path / "backbone.pth", tmp_path / "mbf.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "mbf.onnx")).metadata_props}
    assert props["source"] == "arcface_torch" and props["normalize"] == "arcface" and "conversion" in props
    assert result.max_abs_diff <= 1e-4
    onnx_loaded = load_eval_model(tmp_path / "mbf.onnx")
    assert onnx_loaded.normalize == "arcface"  # from the export's metadata
    np.testing.assert_allclose(onnx_loaded.embed(pixels, ExtractionConfig(flip=False)).fused, want, atol=1e-4)


def test_pretrained_copies_backbone_weights_and_names_the_options(mbf, tmp_path):
    torch.save(mbf.state_dict(), tmp_path / "backbone.pth")
    ours = get_backbone("mbf", emb_size=32, image_size=(SIZE, SIZE), variant="arcface_torch")
    meta = load_published_into(ours, tmp_path / "backbone.pth", "start from it (pretrained)")
    assert meta is not None and meta["source"] == "arcface_torch"
    x = _normalised(_pixels(2))
    with torch.no_grad():
        _same(mbf(x), ours.eval()(x))
    with pytest.raises(ValueError) as err:  # the facepipe variant: other BN eps, an FC bias
        load_published_into(get_backbone("mbf", emb_size=32, image_size=(SIZE, SIZE)), tmp_path / "backbone.pth", "start")
    assert "backbone.pth: cannot start" in str(err.value) and "variant=arcface_torch" in str(err.value)


def test_triplet_fine_tuning_from_a_backbone_pth(mbf, tmp_path):
    from tasks.training.trainer import train
    from train_data import tiny_config

    torch.save(mbf.state_dict(), tmp_path / "backbone.pth")
    cfg = tiny_config(tmp_path / "run", network="mbf", variant="arcface_torch", version_input=1, emb_size=32,
                      loss="triplet", images_per_identity=4, per_batch_size=8, lr=0.005, mom=0.0, max_steps=2,
                      verbose=2, val_targets=[], pretrained=str(tmp_path / "backbone.pth"))
    result = train(cfg)
    model, meta = load_embedder(result.last_checkpoint)
    assert meta["network"] == "mbf" and meta["backbone_args"]["variant"] == "arcface_torch"
    status = (tmp_path / "run" / "train.log")
    assert model.emb_size == 32 and (not status.exists() or "pretrained" in status.read_text())


# --- bad input ----------------------------------------------------------------------------------------------------

def test_key_shape_network_and_size_errors_name_the_file(iresnet18, tmp_path):
    state = iresnet18.state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "layer2.1.conv2.weight"}, None, "missing keys layer2.1.conv2.weight"),
        "shape": ({**state, "layer3.0.conv1.weight": torch.zeros(256, 128, 3, 4)}, None,
                  "shape mismatch at layer3.0.conv1.weight: ours (256, 128, 3, 3)"),
        "network": ({**state, "layer4.2.bn1.weight": torch.zeros(512)}, None, "(2, 2, 2, 3) is not iresnet18/34/50/100/200"),
        "size": (state, (48, 48), "cannot take 48x48 input"),
    }
    for name, (sd, size, message) in cases.items():
        torch.save(sd, tmp_path / f"{name}.pth")
        with pytest.raises(FormatError) as err:
            load_embedder(tmp_path / f"{name}.pth", image_size=size)
        text = str(err.value)
        assert str(tmp_path / f"{name}.pth") in text and message in text and "\n" not in text, text
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FormatError, match="other.pth"):
        load_embedder(tmp_path / "other.pth")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["torch-zip", "plain-pickle"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, form):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    payload = {"layer1.0.conv1.weight": torch.zeros(1), "fc.weight": _RunsCode(marker)}
    if form == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for load in (load_embedder, load_eval_model):
        with pytest.raises(FormatError) as err:
            load(path)
        assert "evil.pth: refused: its pickle asks for the global" in str(err.value)
    assert not marker.exists()
    with pytest.raises(FormatError, match="refused"):
        from tasks.checkpoint import safe_torch_load

        safe_torch_load(path)
    assert not marker.exists()


# --- insightface-style ONNX models ----------------------------------------------------------------------------------

class _InGraphNormalised(nn.Module):
    """A tiny recognition model that normalises its own input as MXNet-converted InsightFace models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.fc = nn.Linear(8 * 16 * 16, 16)

    def forward(self, x):
        x = (x - 127.5) * 0.0078125
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def _export(module: nn.Module, path: Path, mxnet_names: bool = False) -> None:
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=17,
                      input_names=["data"], output_names=["fc1"], dynamic_axes={"data": {0: "b"}, "fc1": {0: "b"}})
    if mxnet_names:  # as mxnet2onnx names them, the ops renamed to something insightface would not see
        model = onnx.load(str(path))
        for node in model.graph.node:
            node.name = {"Sub": "_minusscalar0", "Mul": "_mulscalar0"}.get(node.op_type, f"node_{node.op_type.lower()}")
        onnx.save(model, str(path))


@pytest.mark.parametrize("mxnet_names", [False, True])
def test_onnx_in_graph_normalisation_is_detected(tmp_path, mxnet_names, caplog):
    module = _InGraphNormalised().eval()
    _export(module, tmp_path / "m.onnx", mxnet_names)
    loaded = load_eval_model(tmp_path / "m.onnx")
    assert loaded.normalize == "none" and loaded.image_size == (SIZE, SIZE) and "normalises its input" in loaded.conversion
    pixels = _pixels(3)
    with torch.no_grad():
        want = torch.nn.functional.normalize(module(torch.from_numpy(pixels).permute(0, 3, 1, 2).float()), dim=1).numpy()
    np.testing.assert_allclose(loaded.embed(pixels, ExtractionConfig(flip=False)).fused, want, atol=1e-5)

    # an explicit override wins, but never silently
    caplog.set_level(logging.WARNING, logger="facepipe")
    forced = load_eval_model(tmp_path / "m.onnx", ExtractionConfig(normalize="arcface"))
    assert forced.normalize == "arcface" and "normalize=arcface was asked for" in caplog.text
    assert np.abs(forced.embed(pixels, ExtractionConfig(flip=False)).fused - want).max() > 1e-3

    bgr = load_eval_model(tmp_path / "m.onnx", ExtractionConfig(channel_order="bgr"))
    np.testing.assert_allclose(bgr.embed(pixels[..., ::-1].copy(), ExtractionConfig(flip=False)).fused, want, atol=1e-5)


def test_onnx_without_normalisation_nodes_takes_arcface_input(tmp_path):
    class Plain(_InGraphNormalised):
        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    _export(Plain(), tmp_path / "p.onnx")
    assert load_eval_model(tmp_path / "p.onnx").normalize == "arcface"


# --- the .params container without MXNet ----------------------------------------------------------------------------

def test_params_container_round_trip_and_bad_files(tmp_path):
    arrays = {"arg:conv0_weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
              "arg:fc_half": np.array([0.5, -2], np.float16), "aux:bn0_moving_var": np.ones(3, np.float64),
              "arg:ids": np.array([1, 255], np.uint8), "aux:count": np.array([-7], np.int64)}
    path = write_ndarray_list(tmp_path / "m-0001.params", arrays)
    got, names = read_ndarray_list(path)
    assert names == list(arrays)
    for a, b in zip(got, arrays.values()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    args, aux = read_params(path)
    assert set(args) == {"conv0_weight", "fc_half", "ids"} and set(aux) == {"bn0_moving_var", "count"}

    data = path.read_bytes()
    (tmp_path / "cut.params").write_bytes(data[:-30])
    with pytest.raises(FormatError, match=r"cut.params: .*at byte \d+"):
        read_ndarray_list(tmp_path / "cut.params")
    (tmp_path / "bad.params").write_bytes(b"\x13" + data[1:])
    with pytest.raises(FormatError, match="bad.params: header"):
        read_ndarray_list(tmp_path / "bad.params")
    # "prefix,epoch" needs the symbol file beside the weights
    with pytest.raises(FileNotFoundError, match="m-symbol.json does not exist"):
        resolve_mxnet_checkpoint(f"{tmp_path / 'm'},1")
    (tmp_path / "m-symbol.json").write_text('{"nodes": []}')
    assert len(model_files_digest(f"{tmp_path / 'm'},1")) == 64


class _PixelsInGraph(nn.Module):
    """Takes pixels 0..255 and normalises inside, as MXNet-converted ONNX models do; ReLU so that a second
    normalisation would change the result."""

    def forward(self, x):
        from build_data import PixelEmbedder

        return PixelEmbedder()(torch.relu((x - 127.5) * 0.0078125))


class _Normalised(nn.Module):
    def forward(self, x):  # the same network taking (x - 127.5) / 128
        from build_data import PixelEmbedder

        return PixelEmbedder()(torch.relu(x))


def test_merge_dedup_with_an_in_graph_normalised_onnx_model(tmp_path):
    from build_data import export_onnx, synthetic_identities
    from tasks.alignment import AlignConfig, run_align
    from tasks.lst import run_lst
    from tasks.merge import MergeConfig, run_merge
    from tasks.pack import run_pack

    packs = []
    for name, ids in (("a", range(0, 4)), ("b", range(2, 6))):
        synthetic_identities(tmp_path / name / "faces", ids, images=2)
        aligned = run_align(tmp_path / name / "faces", tmp_path / name / "aligned", AlignConfig(already_aligned=True)).out_dir
        packs.append(run_pack(run_lst([aligned], tmp_path / name / "lst").out_dir, tmp_path / name / "pack").out_dir)
    onnx_path = export_onnx(_PixelsInGraph(), tmp_path / "in_graph.onnx")
    auto = run_merge(packs, tmp_path / "auto", MergeConfig(dedup="model", model=str(onnx_path), param1=0.9))
    direct = run_merge(packs, tmp_path / "direct", MergeConfig(dedup="model", param1=0.9, normalize="mxnet"),
                       embedder=_Normalised())
    from datasets.manifest import read_manifest
    from tasks.merge import EXTRA_COLUMNS, STAGE

    rows = [read_manifest(r.out_dir / "manifest.parquet", stage=STAGE, extra=EXTRA_COLUMNS) for r in (auto, direct)]
    assert list(rows[0]["status"]) == list(rows[1]["status"]) and (rows[0]["status"] == "duplicate").sum() == 2
    np.testing.assert_allclose(rows[0]["cosine"].to_numpy(float), rows[1]["cosine"].to_numpy(float), atol=1e-4)


def test_mxnet_checkpoints_that_are_not_covered_are_named(tmp_path):
    """Without MXNet: files written in its container format; the oracle comparisons are in test_mxnet_models.py."""
    import json

    prefix = tmp_path / "model"
    write_ndarray_list(f"{prefix}-0001.params", {"arg:conv_weight": np.zeros((4, 3, 3, 3), np.float32)})
    nodes = [{"op": "null", "name": "data", "inputs": []},
             {"op": "_minus_scalar", "name": "_minusscalar0", "attrs": {"scalar": "127.5"}, "inputs": [[0, 0, 0]]},
             {"op": "_mul_scalar", "name": "_mulscalar0", "attrs": {"scalar": "0.0078125"}, "inputs": [[1, 0, 0]]}]
    (tmp_path / "model-symbol.json").write_text(json.dumps({"nodes": nodes}))
    with pytest.raises(FormatError, match=r"model-0001.params: not a covered InsightFace MXNet network .*conv_weight"):
        load_embedder(f"{prefix},1")
    (tmp_path / "model-symbol.json").write_text(json.dumps({"nodes": nodes[:1]}))
    with pytest.raises(FormatError, match=r"model-symbol.json: input normalisation none in the graph"):
        load_embedder(f"{prefix}-0001.params")
