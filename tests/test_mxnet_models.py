"""2018 MXNet checkpoints against real MXNet 1.9.1 (its own venv, tests/mxnet_env.py).

* the ``.params`` container: what ``mx.nd.save`` and ``mx.model.save_checkpoint`` write, we read identically;
* networks: an LResNet-E-IR (``fresnet.py`` unit v3, output E) and a MobileFaceNet (``fmobilefacenet.py``,
  output GDC) built here with MXNet's symbol API under the 2018 names and layer settings (in-graph
  ``(x - 127.5) * 0.0078125``, BN eps 2e-5 / MXNet's default 1e-3, ``fix_gamma``), random weights,
  ``save_checkpoint``; MXNet runs the symbol on raw pixels, we load ``prefix,0`` and must give the same
  embeddings. The ResNet is r18 at 32x32 and the MobileFaceNet y1 at 112x112 (small and fast).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mxnet_env
from datasets.mxnet_params import read_ndarray_list, read_params
from tasks.checkpoint import load_embedder
from tasks.evaluation.model import ExtractionConfig, load_eval_model

pytestmark = pytest.mark.mxnet
mxnet_python = mxnet_env.pytest_fixture()

SAVE_SCRIPT = r"""
import json, sys, numpy as np, mxnet as mx
out = sys.argv[1]
rng = np.random.RandomState(0)
d = {"f32": rng.randn(2, 3, 4).astype("float32"), "f64": rng.randn(5).astype("float64"),
     "f16": rng.randn(3, 2).astype("float16"), "u8": rng.randint(0, 256, 7).astype("uint8"),
     "i32": rng.randint(-9, 9, (2, 2)).astype("int32"), "i8": np.array([-3, 4], "int8"),
     "i64": np.array([2**40, -5], "int64"), "big": rng.randn(64, 3, 3, 3).astype("float32")}
mx.nd.save(out + "/dict.params", {k: mx.nd.array(v, dtype=v.dtype) for k, v in d.items()})
mx.nd.save(out + "/list.params", [mx.nd.array(d["f32"]), mx.nd.array(d["i64"], dtype="int64")])
np.savez(out + "/want.npz", **d)
data = mx.sym.Variable("data")
net = mx.sym.FullyConnected(mx.sym.Flatten(data), num_hidden=3, name="fc")
net = mx.sym.BatchNorm(net, name="bn")
args = {"fc_weight": mx.nd.array(rng.randn(3, 4)), "fc_bias": mx.nd.array(rng.randn(3)),
        "bn_gamma": mx.nd.ones(3), "bn_beta": mx.nd.zeros(3)}
aux = {"bn_moving_mean": mx.nd.zeros(3), "bn_moving_var": mx.nd.ones(3)}
mx.model.save_checkpoint(out + "/ck", 7, net, args, aux)
_, a2, x2 = mx.model.load_checkpoint(out + "/ck", 7)
np.savez(out + "/ck.npz", **{"arg:" + k: v.asnumpy() for k, v in a2.items()}, **{"aux:" + k: v.asnumpy() for k, v in x2.items()})
"""

# 2018 InsightFace symbols (names and layer settings of fresnet.py v3 + symbol_utils get_fc1 'E', and of
# fmobilefacenet.py + get_fc1 'GDC'), random weights, save_checkpoint, forward on raw pixels.
NET_SCRIPT = r"""
import json, sys, numpy as np, mxnet as mx
kind, prefix, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
bn_mom = 0.9
def Act(data, name):
    return mx.sym.LeakyReLU(data=data, act_type="prelu", name=name)

def lresnet(units, emb):
    data = mx.sym.Variable("data")
    data = mx.sym.identity(data=data, name="id")
    data = data - 127.5
    data = data * 0.0078125
    body = mx.sym.Convolution(data=data, num_filter=64, kernel=(3, 3), stride=(1, 1), pad=(1, 1), no_bias=True, name="conv0")
    body = mx.sym.BatchNorm(data=body, fix_gamma=False, eps=2e-5, momentum=bn_mom, name="bn0")
    body = Act(body, "relu0")
    filters = [64, 64, 128, 256, 512]
    for i, n in enumerate(units):
        for j in range(n):
            name, stride, f = "stage%d_unit%d" % (i + 1, j + 1), (2, 2) if j == 0 else (1, 1), filters[i + 1]
            bn1 = mx.sym.BatchNorm(data=body, fix_gamma=False, eps=2e-5, momentum=bn_mom, name=name + "_bn1")
            conv1 = mx.sym.Convolution(data=bn1, num_filter=f, kernel=(3, 3), stride=(1, 1), pad=(1, 1), no_bias=True, name=name + "_conv1")
            bn2 = mx.sym.BatchNorm(data=conv1, fix_gamma=False, eps=2e-5, momentum=bn_mom, name=name + "_bn2")
            act1 = Act(bn2, name + "_relu1")
            conv2 = mx.sym.Convolution(data=act1, num_filter=f, kernel=(3, 3), stride=stride, pad=(1, 1), no_bias=True, name=name + "_conv2")
            bn3 = mx.sym.BatchNorm(data=conv2, fix_gamma=False, eps=2e-5, momentum=bn_mom, name=name + "_bn3")
            if j == 0:
                sc = mx.sym.Convolution(data=body, num_filter=f, kernel=(1, 1), stride=stride, no_bias=True, name=name + "_conv1sc")
                sc = mx.sym.BatchNorm(data=sc, fix_gamma=False, eps=2e-5, momentum=bn_mom, name=name + "_sc")
            else:
                sc = body
            body = bn3 + sc
    body = mx.sym.BatchNorm(data=body, fix_gamma=False, eps=2e-5, momentum=bn_mom, name="bn1")
    body = mx.sym.Dropout(data=body, p=0.4)
    fc1 = mx.sym.FullyConnected(data=body, num_hidden=emb, name="pre_fc1")
    return mx.sym.BatchNorm(data=fc1, fix_gamma=True, eps=2e-5, momentum=bn_mom, name="fc1")

def Conv(data, num_filter=1, kernel=(1, 1), stride=(1, 1), pad=(0, 0), num_group=1, name=None, suffix=""):
    conv = mx.sym.Convolution(data=data, num_filter=num_filter, kernel=kernel, num_group=num_group, stride=stride, pad=pad, no_bias=True, name="%s%s_conv2d" % (name, suffix))
    bn = mx.sym.BatchNorm(data=conv, name="%s%s_batchnorm" % (name, suffix), fix_gamma=False, momentum=bn_mom)
    return Act(bn, "%s%s_relu" % (name, suffix))

def Linear(data, num_filter=1, kernel=(1, 1), stride=(1, 1), pad=(0, 0), num_group=1, name=None, suffix=""):
    conv = mx.sym.Convolution(data=data, num_filter=num_filter, kernel=kernel, num_group=num_group, stride=stride, pad=pad, no_bias=True, name="%s%s_conv2d" % (name, suffix))
    return mx.sym.BatchNorm(data=conv, name="%s%s_batchnorm" % (name, suffix), fix_gamma=False, momentum=bn_mom)

def DResidual(data, num_out=1, kernel=(3, 3), stride=(2, 2), pad=(1, 1), num_group=1, name=None, suffix=""):
    conv = Conv(data=data, num_filter=num_group, name="%s%s_conv_sep" % (name, suffix))
    conv_dw = Conv(data=conv, num_filter=num_group, num_group=num_group, kernel=kernel, pad=pad, stride=stride, name="%s%s_conv_dw" % (name, suffix))
    return Linear(data=conv_dw, num_filter=num_out, name="%s%s_conv_proj" % (name, suffix))

def Residual(data, num_block=1, num_out=1, num_group=1, name=None):
    identity = data
    for i in range(num_block):
        identity = DResidual(data=identity, num_out=num_out, stride=(1, 1), num_group=num_group, name="%s_block" % name, suffix="%d" % i) + identity
    return identity

def mobilefacenet(blocks, emb, k):
    data = mx.sym.Variable("data")
    data = data - 127.5
    data = data * 0.0078125
    conv_1 = Conv(data, num_filter=64, kernel=(3, 3), pad=(1, 1), stride=(2, 2), name="conv_1")
    conv_2_dw = Conv(conv_1, num_group=64, num_filter=64, kernel=(3, 3), pad=(1, 1), stride=(1, 1), name="conv_2_dw")
    conv_23 = DResidual(conv_2_dw, num_out=64, num_group=128, name="dconv_23")
    conv_3 = Residual(conv_23, num_block=blocks[1], num_out=64, num_group=128, name="res_3")
    conv_34 = DResidual(conv_3, num_out=128, num_group=256, name="dconv_34")
    conv_4 = Residual(conv_34, num_block=blocks[2], num_out=128, num_group=256, name="res_4")
    conv_45 = DResidual(conv_4, num_out=128, num_group=512, name="dconv_45")
    conv_5 = Residual(conv_45, num_block=blocks[3], num_out=128, num_group=256, name="res_5")
    conv_6_sep = Conv(conv_5, num_filter=512, kernel=(1, 1), pad=(0, 0), stride=(1, 1), name="conv_6sep")
    conv_6_dw = Linear(conv_6_sep, num_filter=512, num_group=512, kernel=(k, k), pad=(0, 0), stride=(1, 1), name="conv_6dw7_7")
    conv_6_f = mx.sym.FullyConnected(data=conv_6_dw, num_hidden=emb, name="pre_fc1")
    return mx.sym.BatchNorm(data=conv_6_f, fix_gamma=True, eps=2e-5, momentum=bn_mom, name="fc1")

UNITS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
sym = lresnet(UNITS[kind], 512 if size == 112 else 64) if kind in UNITS else mobilefacenet((1, 4, 6, 2), 128, size // 16)
shape = (3, 3, size, size)
arg_shapes, _, aux_shapes = sym.infer_shape(data=shape)
rng = np.random.RandomState(1)
args, aux = {}, {}
for name, s in zip(sym.list_arguments(), arg_shapes):
    if name == "data":
        continue
    if name.endswith("_gamma"):  # BN scales (fc1's is ignored by fix_gamma) and PReLU slopes
        v = rng.uniform(0.1, 0.3, s) if not name.startswith("fc1") else rng.uniform(2.0, 3.0, s)
    elif name.endswith(("_beta", "_bias")):
        v = rng.randn(*s) * 0.1
    else:
        v = rng.randn(*s) / np.sqrt(np.prod(s[1:]))
    args[name] = mx.nd.array(v.astype("float32"))
for name, s in zip(sym.list_auxiliary_states(), aux_shapes):
    v = rng.uniform(0.05, 0.25, s) if name.endswith("moving_var") else rng.randn(*s) * 0.1
    aux[name] = mx.nd.array(v.astype("float32"))
mx.model.save_checkpoint(prefix, 0, sym, args, aux)
pixels = rng.randint(0, 256, (3, size, size, 3)).astype("uint8")
mod = mx.mod.Module(symbol=sym, context=mx.cpu(), label_names=None)
mod.bind(data_shapes=[("data", shape)], for_training=False)
mod.set_params(args, aux)
x = mx.nd.array(pixels.transpose(0, 3, 1, 2).astype("float32"))
mod.forward(mx.io.DataBatch(data=[x]), is_train=False)
np.savez(prefix + "-io.npz", pixels=pixels, emb=mod.get_outputs()[0].asnumpy())
"""


def test_params_files_read_as_mxnet_reads_them(mxnet_python, tmp_path):
    mxnet_env.run_script(SAVE_SCRIPT, str(tmp_path), python=mxnet_python)
    want = np.load(tmp_path / "want.npz")
    arrays, names = read_ndarray_list(tmp_path / "dict.params")
    assert sorted(names) == sorted(want.files)
    for name, array in zip(names, arrays):
        assert array.dtype == want[name].dtype and array.shape == want[name].shape and np.array_equal(array, want[name]), name
    arrays, names = read_ndarray_list(tmp_path / "list.params")
    assert names == [] and np.array_equal(arrays[0], want["f32"]) and np.array_equal(arrays[1], want["i64"])
    args, aux = read_params(tmp_path / "ck-0007.params")
    ck = np.load(tmp_path / "ck.npz")
    assert {f"arg:{k}" for k in args} | {f"aux:{k}" for k in aux} == set(ck.files)
    for k, v in {**{f"arg:{k}": v for k, v in args.items()}, **{f"aux:{k}": v for k, v in aux.items()}}.items():
        assert np.array_equal(v, ck[k]), k
    symbol = json.loads((tmp_path / "ck-symbol.json").read_text())
    assert any(n["op"] == "BatchNorm" for n in symbol["nodes"])


@pytest.mark.parametrize("kind, size, network", [("r18", 32, "r18"), ("y1", 112, "y1")])
def test_mxnet_checkpoint_gives_mxnet_embeddings(mxnet_python, tmp_path, kind, size, network):
    prefix = tmp_path / f"model-{kind}"
    mxnet_env.run_script(NET_SCRIPT, kind, str(prefix), str(size), python=mxnet_python)
    io = np.load(f"{prefix}-io.npz")
    model, meta = load_embedder(f"{prefix},0")
    assert (meta["source"], meta["network"], meta["normalize"], meta["image_size"]) == ("mxnet", network, "mxnet", [size, size])
    assert "1 fix_gamma BN(s)" in meta["conversion"] and "normalize mxnet" in meta["conversion"]
    x = (torch.from_numpy(io["pixels"]).permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
    with torch.no_grad():
        ours = model(x).numpy()
    want = io["emb"]
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max(), (np.abs(ours - want).max(), np.abs(want).max())

    # the same through the evaluation path, from the .params and from the -symbol.json spelling
    for spec in (f"{prefix}-0000.params", f"{prefix}-symbol.json"):
        loaded = load_eval_model(spec)
        assert loaded.kind == "mxnet" and loaded.normalize == "mxnet" and loaded.describe()["conversion"]
        got = loaded.embed(io["pixels"], ExtractionConfig(flip=False, device="cpu")).fused
        np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
