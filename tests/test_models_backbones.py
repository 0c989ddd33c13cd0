"""Backbones: codes and options, shapes at 112x112 and 112x96, channels_last, torch.compile, ONNX, published sizes.

Heavier checks (every code with channels_last / torch.compile (inductor) / ONNX, r100 export, speed)
live in ``bench/models.py``.
"""
from __future__ import annotations

import io

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import get_backbone, network_codes, summarize
from models.embedding import OUTPUT_OPTIONS, EmbeddingHead
from models.layers import FixedGammaBatchNorm1d
from models.resnet import ResidualUnit
from models_helpers import calibrate_batch_norm

# The smallest code of every family. The three heaviest run with the 7x7/2 input stem (version_input=0:
# a quarter of the pixels, the same module types) to keep the suite fast; their default L input is
# covered by the shape tests here and by bench/models.py. i4's ONNX export uses option A (its default E
# head is a 113M-parameter FC on the 12x12x1536 map).
FAMILIES = {"r18": {}, "m05": {}, "y1": {}, "i4": {"version_input": 0}, "p68": {"version_input": 0},
            "d121": {"version_input": 0}}
ONNX_OPTIONS = {**FAMILIES, "i4": {"version_input": 0, "version_output": "A"}}
DYNAMO_EXPORT = ("r18", "y1")
LIGHT = ("r18", "m05", "y1")


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_documented_codes_are_accepted():
    codes = network_codes()
    for code in ["r18", "r34", "r50", "r100", "r200", "m1", "y1", "y2", "i4", "p68", "p92", "p107",
                 "d121", "d161", "d169", "d201"]:
        assert code in codes


def test_unknown_code_error_lists_valid_codes():
    with pytest.raises(ValueError) as err:
        get_backbone("r99")
    msg = str(err.value)
    assert "'r99'" in msg and "fresnet table" in msg
    for code in ("r100", "y1", "m1", "i4", "p92", "d121"):
        assert code in msg
    with pytest.raises(ValueError, match="valid codes"):
        get_backbone("vgg16")


@pytest.mark.parametrize("kwargs, pattern", [
    ({"version_output": "Q"}, "version_output 'Q'"),
    ({"version_act": "tanh"}, "version_act 'tanh'"),
    ({"version_input": 2}, "version_input 2"),
    ({"version_unit": 4}, "version_unit 4"),
    ({"image_size": "112"}, "image_size '112'"),
    ({"emb_size": 0}, "emb_size"),
])
def test_bad_options_are_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_backbone("r18", **kwargs)


def test_too_small_image_is_named():
    with pytest.raises(ValueError, match=r"image_size \(8, 8\) is too small for 'd121'"):
        get_backbone("d121", image_size=(8, 8))


def test_family_specific_options_are_checked():
    with pytest.raises(ValueError, match="version_se applies to ResNet"):
        get_backbone("y1", version_se=1)
    with pytest.raises(TypeError, match="multiplier"):
        get_backbone("r18", multiplier=0.5)
    with pytest.raises(ValueError, match="four positive unit counts"):
        get_backbone("y1", blocks=(1, 2))


def test_wrong_input_shape_is_named():
    model = get_backbone("y1").eval()
    with pytest.raises(ValueError, match=r"input has shape \(1, 3, 112, 96\), expected \(N, 3, 112, 112\)"):
        model(torch.zeros(1, 3, 112, 96))


def test_code_defaults_follow_the_configs():
    assert get_backbone("y1").emb_size == 128
    assert get_backbone("y1").head.option == "GDC"
    assert get_backbone("y2").emb_size == 256
    assert get_backbone("y1", emb_size=512, version_output="E").head.option == "E"
    r18 = get_backbone("r18")
    assert r18.emb_size == 512 and r18.head.option == "E"
    fc = [m for m in r18.head.modules() if isinstance(m, nn.Linear)][0]
    assert fc.in_features == 512 * 7 * 7  # LResNet: 112 -> 7x7 after four stride-2 stages
    bns = [m for m in r18.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 2e-5 and m.momentum == 0.1 for m in bns)


@pytest.mark.parametrize("code", list(FAMILIES))
def test_family_runs_channels_last_in_eval_and_train(code):
    """Eval output equals the contiguous one; a train-mode forward (batch statistics) runs, and for the
    light families a backward too (bench/models.py --channels-last runs train steps for every code)."""
    torch.manual_seed(0)
    model = calibrate_batch_norm(get_backbone(code, **FAMILIES[code]))
    x = _randn(2, 3, 112, 112)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 128 if code == "y1" else 512) and out.dtype == torch.float32
    # Different conv algorithms sum in a different order; i4's 221184-input FC amplifies that to ~5e-4.
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())
    cosine = torch.nn.functional.cosine_similarity(out, reference, dim=1)
    assert cosine.min().item() > 1 - 1e-6
    model_cl.train()
    if code in LIGHT:
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
        out.square().mean().backward()
        grads = [p.grad for p in model_cl.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    else:
        with torch.no_grad():
            out = model_cl(x.contiguous(memory_format=torch.channels_last))
        assert torch.isfinite(out).all() and not torch.allclose(out, reference, atol=1e-3)  # batch statistics


@pytest.mark.parametrize("code", ["r18", "y1", "d121", "p68"])
def test_112x96_input(code):
    model = get_backbone(code, image_size=(112, 96)).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 112, 96))
    assert out.shape == (1, model.emb_size)


@pytest.mark.parametrize("image_size, feature_size", [((112, 112), (12, 12)), ((112, 96), (12, 10))])
def test_inception_resnet_feature_map_with_l_input(image_size, feature_size):
    """i4 follows the MXNet symbol's 'valid' convolutions (and its unused first max-pool)."""
    model = get_backbone("i4", version_output="GDC", image_size=image_size)
    assert model.trunk.out_channels == 1536
    assert model.head.layers[0].kernel_size == feature_size


@pytest.mark.parametrize("version_unit, version_input, version_se, act", [
    (1, 0, 0, "relu"), (1, 1, 1, "prelu"), (2, 0, 1, "prelu"), (2, 1, 0, "relu"), (3, 0, 0, "prelu"),
    (3, 1, 1, "relu"),
])
def test_resnet_unit_variants(version_unit, version_input, version_se, act):
    model = get_backbone("r18", version_unit=version_unit, version_input=version_input, version_se=version_se,
                         version_act=act, image_size=(112, 96)).eval()
    units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    assert len(units) == 8
    first = units[0]
    assert (first.shortcut_from_preact and len(first.shortcut) == 1) == (version_unit == 2)
    assert isinstance(first.post_act, nn.Identity) == (version_unit != 1)
    assert isinstance(first.se, nn.Identity) == (not version_se)
    acts = (nn.PReLU if act == "prelu" else nn.ReLU)
    assert any(isinstance(m, acts) for m in first.body)
    fc = [m for m in model.head.modules() if isinstance(m, nn.Linear)][0]
    # input 0: 7x7/2 stem + max-pool, stage strides 1,2,2,2 -> 4x3; input L: 7x6
    assert fc.in_features == 512 * ((4 * 3) if version_input == 0 else (7 * 6))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 112, 96)).shape == (1, 512)


def test_deep_resnets_use_bottlenecks():
    r100, r101 = get_backbone("r100"), get_backbone("r101")
    assert r100.trunk.out_channels == 512 and r101.trunk.out_channels == 2048
    assert [len(s) for s in r100.trunk.stages] == [3, 13, 30, 3]
    assert [len(s) for s in r101.trunk.stages] == [3, 4, 23, 3]
    assert r101.trunk.stages[0][0].body[1].out_channels == 64  # bottleneck width out/4


@pytest.mark.parametrize("option", OUTPUT_OPTIONS + ("XD",))
def test_embedding_options(option):
    head = EmbeddingHead(option, 64, (7, 6), emb_size=32, dropout=0.4, act="prelu").eval()
    out = head(_randn(3, 64, 7, 6))
    expected = 64 if option in ("A", "AX") else 32
    assert out.shape == (3, expected)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if option in ("E", "F", "G", "H", "I", "J"):
        assert linears[0].in_features == 64 * 7 * 6
    if option == "GDC":
        assert head.layers[0].kernel_size == (7, 6) and head.layers[0].groups == 64
    dropouts = [m.p for m in head.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == ([0.4] if option in ("E", "F") else [0.2] if "X" in option else [])
    ends_with_fixed_bn = isinstance(head.layers[-1], FixedGammaBatchNorm1d)
    assert ends_with_fixed_bn == (option in ("C", "CX", "GAP", "E", "I", "J", "GDC"))


def test_fixed_gamma_stays_one_under_training():
    head = EmbeddingHead("E", 16, (2, 2), emb_size=8)
    bn = head.layers[-1]
    assert "weight" not in dict(bn.named_parameters()) and "weight" in bn.state_dict()
    opt = torch.optim.SGD(head.parameters(), lr=1.0, weight_decay=0.1)
    head(_randn(4, 16, 2, 2)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(bn.weight, torch.ones(8))
    assert bn.bias.abs().sum() > 0


# Published figures (checked against the sources): MobileFaceNet paper 0.99M params / 221M MAdds;
# arcface_torch README/flops.py (ptflops MACs, printed as "GFLOPs"): mobilefacenet 0.45G,
# r50 6.3G / 43.6M params, r100 12.1G / 65.2M params.
@pytest.mark.parametrize("code, params_m, gmacs, rel", [
    ("y1", 0.99, 0.221, 0.05), ("mbf", None, 0.45, 0.05), ("r50", 43.6, 6.3, 0.02), ("r100", 65.2, 12.1, 0.02),
])
def test_summary_matches_published_figures(code, params_m, gmacs, rel):
    stats = summarize(get_backbone(code))
    if params_m is not None:
        assert stats["params"] / 1e6 == pytest.approx(params_m, rel=rel)
    assert stats["macs"] / 1e9 == pytest.approx(gmacs, rel=rel)
    assert stats["gflops"] == pytest.approx(2 * stats["macs"] / 1e9)
    assert stats["size_mb"] == pytest.approx(stats["params"] * 4 / 2**20)
    if code == "y1":
        assert 3.5 < stats["size_mb"] < 4.5  # "4 MB"


def test_torch_compile_fullgraph_train_step():
    """Dynamo + AOT autograd capture of a training step without graph breaks (inductor: bench/models.py)."""
    torch.manual_seed(0)
    model = get_backbone("y1").train()
    x = _randn(4, 3, 112, 112)
    eager = model(x)
    eager.square().mean().backward()
    eager_grad = model.trunk.layers[0][0].weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    # BN running stats advanced twice by now, but train-mode outputs use batch statistics only.
    assert torch.allclose(out, eager, atol=1e-5)
    assert torch.allclose(model.trunk.layers[0][0].weight.grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("code", list(ONNX_OPTIONS))
def test_onnx_export_matches_onnxruntime(code):
    """Every family exports (opset >= 17) with a dynamic batch axis and onnxruntime agrees with torch.

    r18 and y1 use the dynamo exporter; the other families use the TorchScript exporter here to keep
    the suite fast (``bench/models.py --onnx`` exports every code with the dynamo exporter).
    """
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = calibrate_batch_norm(get_backbone(code, **ONNX_OPTIONS[code]))
    x = _randn(2, 3, 112, 112, seed=1)
    with torch.no_grad():
        expected = model(x)
    if code in DYNAMO_EXPORT:
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False,
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
        data = program.model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
        data = buffer.getvalue()
    assert onnx.load_from_string(data).opset_import[0].version >= 17
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (x, x[:1]):  # the batch axis is dynamic
        got = torch.from_numpy(session.run(None, {name: batch.numpy()})[0])
        want = expected[: batch.shape[0]]
        # Embeddings are compared after L2 normalisation (as they are used); raw values to 1e-3 relative
        # (an E head sums 25088-116032 products, so float32 summation order alone moves them ~1e-4).
        torch.testing.assert_close(F.normalize(got, dim=1), F.normalize(want, dim=1), rtol=0, atol=1e-4)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
