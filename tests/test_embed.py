"""Embedding extraction: flip fusion, input normalisation, batching, ONNX models, Parquet output."""
from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from conftest import FACES
from datasets.errors import FormatError
from tasks.evaluation.embed import OnnxEmbedder, extract_embeddings, read_embeddings, write_embeddings


def _faces(n: int = 12, size: int = 48) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 RGB centre crops of the real photos (repeated, mirrored variants)."""
    paths = sorted((FACES / "raw").glob("*/*.jpg"))
    if not paths:
        pytest.skip(f"no real photos under {FACES / 'raw'}")
    out = []
    for i in range(n):
        img = cv2.imread(str(paths[i % len(paths)]))
        h, w = img.shape[:2]
        side = min(h, w)
        crop = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)[:, :: 1 if i < len(paths) else -1])
    return np.ascontiguousarray(np.stack(out))


def _net(dim: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, dim),
    )


def _manual(model: nn.Module, images: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    model = model.double().eval()
    with torch.no_grad():
        raw = model(x)
        norms = [raw.norm(dim=1)]
        if flip:
            raw_flip = model(torch.flip(x, dims=[3]))
            norms.append(raw_flip.norm(dim=1))
            raw = raw + raw_flip
    model.float()
    return (raw / raw.norm(dim=1, keepdim=True)).numpy(), torch.stack(norms, 1).numpy()


@pytest.mark.parametrize("flip", [True, False])
def test_flip_fusion_and_xnorm_match_manual_computation(flip):
    images = _faces()
    model = _net().train()
    res = extract_embeddings(model, images, batch_size=5, flip=flip, device="cpu")
    assert model.training  # the caller's mode is restored (eval was used: Dropout would make runs differ)
    fused, norms = _manual(model, images, flip)
    assert res.fused.dtype == np.float32 and res.fused.shape == (12, 16)
    np.testing.assert_allclose(res.fused, fused, atol=2e-5)
    np.testing.assert_allclose(res.raw_norms, norms, rtol=2e-5)
    assert res.raw_norm_mean == pytest.approx(norms.mean(), rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(res.fused, axis=1), 1.0, atol=1e-6)
    model.train()
    again = extract_embeddings(model, images, batch_size=7, flip=flip, device="cpu")
    np.testing.assert_allclose(again.fused, res.fused, atol=1e-6)


def test_flip_changes_the_result_for_asymmetric_faces():
    images = _faces()
    model = _net()
    with_flip = extract_embeddings(model, images, device="cpu").fused
    without = extract_embeddings(model, images, flip=False, device="cpu").fused
    assert np.abs(with_flip - without).max() > 1e-3


@pytest.mark.parametrize("normalize,white,black", [("arcface", 1.0, -1.0), ("mxnet", 127.5 / 128, -127.5 / 128)])
def test_input_normalisation(normalize, white, black):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0] = 255

    def first_pixels(x: torch.Tensor) -> torch.Tensor:  # a plain callable, not a Module
        return x.reshape(x.shape[0], -1)[:, :4]

    res = extract_embeddings(first_pixels, images, flip=False, device="cpu", normalize=normalize)
    np.testing.assert_allclose(res.raw_norms[:, 0], [2 * abs(white), 2 * abs(black)], rtol=1e-6)
    np.testing.assert_allclose(res.fused, [[0.5] * 4, [-0.5] * 4], rtol=1e-6)


def test_iterable_of_uneven_batches_equals_one_array():
    images = _faces()
    model = _net()
    whole = extract_embeddings(model, images, batch_size=4, device="cpu")
    parts = extract_embeddings(model, (images[a:b] for a, b in [(0, 5), (5, 6), (6, 12)]), batch_size=4, device="cpu")
    np.testing.assert_allclose(parts.fused, whole.fused, atol=1e-6)
    np.testing.assert_allclose(parts.raw_norms, whole.raw_norms, rtol=1e-6)


def test_bf16_autocast_stays_close():
    images = _faces()
    model = _net()
    ref = extract_embeddings(model, images, device="cpu").fused
    bf16 = extract_embeddings(model, images, device="cpu", amp_dtype=torch.bfloat16).fused
    assert bf16.dtype == np.float32
    assert np.min(np.sum(ref * bf16, axis=1)) > 0.999


def test_bad_input_and_bad_model_output_are_named():
    model = _net()
    with pytest.raises(ValueError, match=r"image batch 1 has shape \(2, 8, 8, 3\) and dtype float32"):
        extract_embeddings(model, [np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.float32)], device="cpu")
    with pytest.raises(ValueError, match=r"image batch 0 has shape \(8, 8, 3\)"):
        extract_embeddings(model, np.zeros((8, 8, 3), np.uint8), device="cpu")
    with pytest.raises(ValueError, match=r"model returned shape \(3,\) for a batch of 3 images"):
        extract_embeddings(lambda x: x.sum(dim=(1, 2, 3)), np.zeros((3, 8, 8, 3), np.uint8), device="cpu")

    def nan_for_third(x: torch.Tensor) -> torch.Tensor:
        out = torch.ones(x.shape[0], 4)
        if x.shape[0] > 2:
            out[2] = float("nan")
        return out

    with pytest.raises(ValueError, match="non-finite embedding for image 2"):
        extract_embeddings(nan_for_third, np.zeros((4, 8, 8, 3), np.uint8), device="cpu")

    def broken_reader():
        yield np.zeros((2, 8, 8, 3), np.uint8)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        extract_embeddings(model, broken_reader(), device="cpu")


def _onnx_twin(model: nn.Sequential, path, batch: int | str) -> None:
    """Write ``Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm`` with ``model``'s weights as ONNX."""
    conv, linear = model[0], model[4]
    inits = [numpy_helper.from_array(t.detach().numpy(), name) for name, t in
             [("w", conv.weight), ("b", conv.bias), ("fw", linear.weight), ("fb", linear.bias)]]
    nodes = [
        helper.make_node("Conv", ["data", "w", "b"], ["c"], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["fc1"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "embedder",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 48, 48])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, linear.out_features])],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))


@pytest.mark.parametrize("batch", ["N", 4])
def test_onnx_embedder_matches_torch_model(tmp_path, batch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
    _onnx_twin(model, tmp_path / "m.onnx", batch)
    images = _faces(10)
    embedder = OnnxEmbedder(tmp_path / "m.onnx")
    assert embedder.fixed_batch == (None if batch == "N" else 4)
    ours = extract_embeddings(embedder, images, batch_size=6)  # 6 = 4 + 2 padded when the batch is fixed
    ref = extract_embeddings(model, images, batch_size=6, device="cpu")
    np.testing.assert_allclose(ours.fused, ref.fused, atol=1e-5)
    np.testing.assert_allclose(ours.raw_norms, ref.raw_norms, rtol=1e-5)


def test_onnx_embedder_rejects_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx: ONNX model not found"):
        OnnxEmbedder(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(FormatError, match="bad.onnx: not a loadable ONNX model"):
        OnnxEmbedder(tmp_path / "bad.onnx")


def test_embeddings_parquet_round_trip(tmp_path):
    emb = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    names = [f"lfw/{i}.jpg" for i in range(5)]
    path = tmp_path / "emb.parquet"
    write_embeddings(path, names, emb)
    got_names, got = read_embeddings(path)
    assert got_names == names and got.dtype == np.float32
    np.testing.assert_array_equal(got, emb)
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]  # no temporary left behind
    with pytest.raises(ValueError, match="4 names for 5 embeddings"):
        write_embeddings(path, names[:4], emb)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(FormatError, match="other.parquet: no column 'embedding'"):
        read_embeddings(tmp_path / "other.parquet")
