"""Partial FC: sharding, sampling, equality with the un-sharded margin softmax (world size 1 and 2 with gloo),
resharding helpers and the memory estimate."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from models.margins import get_margin
from models.partial_fc import PartialFC, gather_shards, memory_per_rank, shard_bounds, shard_rows

HEAD_NAMES = ["softmax", "sphereface", "cosface", "arcface", "combined", "nsoftmax", "curricularface", "adaface"]


def _data(n=16, dim=12, classes=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embeddings": torch.randn(n, dim, generator=g) * 3,
        "labels": torch.randint(0, classes, (n,), generator=g),
        "weight": torch.randn(classes, dim, generator=g) * 0.1,
        "bias": torch.randn(classes, generator=g) * 0.1,
    }


def _reference(name, data, classes=None):
    """Loss and gradients of the plain, un-sharded margin softmax (optionally over a subset of classes)."""
    head = get_margin(name).train()
    e = data["embeddings"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    b = data["bias"].clone().requires_grad_()
    labels = data["labels"]
    if head.normalized:
        logits = F.linear(F.normalize(e, dim=1), F.normalize(w, dim=1)).clamp(-1, 1)
        if classes is not None:
            keep = classes.nonzero().squeeze(1)
            logits, labels = logits[:, keep], torch.searchsorted(keep, labels)
        out = head(logits, labels, e.norm(dim=1))
    else:
        out = head(F.linear(e, w, b), labels)
    loss = F.cross_entropy(out, labels)
    loss.backward()
    return loss.detach(), e.grad, w.grad, b.grad


def test_shard_bounds_cover_all_classes():
    for classes, world in [(10, 3), (85742, 8), (7, 7), (100, 1)]:
        bounds = [shard_bounds(classes, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == classes
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shard_bounds(10, 0, 3) == (0, 4) and shard_bounds(10, 2, 3) == (7, 10)
    with pytest.raises(ValueError, match="3 classes cannot be sharded over 4 ranks"):
        shard_bounds(3, 0, 4)
    with pytest.raises(ValueError, match="rank 4 is not in a world of size 4"):
        shard_bounds(10, 4, 4)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_world_size_one_equals_full_margin_softmax(name):
    data = _data()
    head = get_margin(name).train()
    pfc = PartialFC(head, 12, 40)
    pfc.load_full_weight(data["weight"], None if head.normalized else data["bias"])
    e = data["embeddings"].clone().requires_grad_()
    loss = pfc(e, data["labels"])
    loss.backward()
    ref_loss, ref_e, ref_w, ref_b = _reference(name, data)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.grad, ref_e, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pfc.weight.grad, ref_w, rtol=1e-4, atol=1e-6)
    if not head.normalized:
        torch.testing.assert_close(pfc.bias.grad, ref_b, rtol=1e-4, atol=1e-6)


def test_sampling_keeps_positives_and_equals_the_loss_over_the_sampled_classes():
    data = _data(classes=200, seed=1)
    pfc = PartialFC(get_margin("arcface"), 12, 200, sample_rate=0.1, generator=torch.Generator().manual_seed(0))
    pfc.load_full_weight(data["weight"])
    e = data["embeddings"].clone().requires_grad_()
    loss = pfc(e, data["labels"])
    loss.backward()
    index = pfc.last_sample_index
    positives = torch.unique(data["labels"])
    assert index.numel() == max(20, data["labels"].numel())  # int(0.1 * 200), at least the batch
    assert torch.isin(positives, index).all() and torch.equal(index, index.sort().values)
    classes = torch.zeros(200, dtype=torch.bool)
    classes[index] = True
    ref_loss, ref_e, ref_w, _ = _reference("arcface", data, classes)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.grad, ref_e, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pfc.weight.grad, ref_w, rtol=1e-4, atol=1e-6)
    assert pfc.weight.grad[~classes].abs().sum() == 0  # only sampled centres are updated
    second = PartialFC(get_margin("arcface"), 12, 200, sample_rate=0.1, generator=torch.Generator().manual_seed(1))
    second(data["embeddings"], data["labels"])
    assert not torch.equal(second.last_sample_index, index)  # negatives are re-drawn


def test_loss_is_float32_under_bf16_autocast():
    data = _data()
    pfc = PartialFC(get_margin("arcface"), 12, 40)
    pfc.load_full_weight(data["weight"])
    reference = pfc(data["embeddings"], data["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pfc(data["embeddings"].to(torch.bfloat16), data["labels"])
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=0.02)


def test_bad_inputs_are_named():
    pfc = PartialFC(get_margin("arcface"), 12, 40)
    with pytest.raises(ValueError, match="label 40 is out of range"):
        pfc(torch.randn(2, 12), torch.tensor([0, 40]))
    with pytest.raises(ValueError, match=r"embeddings must be \(N, 12\)"):
        pfc(torch.randn(2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be int64"):
        pfc(torch.randn(2, 12), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"full weight must be \(40, 12\)"):
        pfc.load_full_weight(torch.zeros(40, 13))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(get_margin("arcface"), 12, 40, sample_rate=0.0)
    with pytest.raises(TypeError, match="MarginHead"):
        PartialFC(torch.nn.Identity(), 12, 40)


def test_reshard_helpers_round_trip():
    full = torch.arange(30.0).view(10, 3)
    parts = [shard_rows(full, r, 3) for r in range(3)]
    assert [p.shape[0] for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat(parts), full)
    pfc = PartialFC(get_margin("cosface"), 3, 10)
    pfc.load_full_weight(full)
    assert torch.equal(pfc.full_weight(), full) and torch.equal(gather_shards(pfc.weight, 10), full)
    with pytest.raises(ValueError, match="holds 9 rows"):
        gather_shards(full[:9], 10)


@pytest.mark.parametrize("optimizer, states", [("sgd", 1), ("adamw", 2)])
def test_memory_estimate_matches_real_tensors(optimizer, states):
    classes, emb = 1000, 64
    pfc = PartialFC(get_margin("softmax"), emb, classes)
    opt = (torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(pfc.parameters(), lr=1e-3))
    pfc(torch.randn(8, emb), torch.randint(0, classes, (8,))).backward()
    opt.step()
    measured = sum(p.numel() * p.element_size() * 2 for p in pfc.parameters())
    measured += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    assert memory_per_rank(classes, emb, 1, 1.0, torch.float32, optimizer, bias=True) == measured
    assert states == sum(1 for t in next(iter(opt.state.values())).values() if torch.is_tensor(t) and t.dim() > 0)
    big = memory_per_rank(2_000_000, 512, 8, 1.0)
    assert big == 250_000 * 512 * 4 * 3  # weight + grad + momentum of 2M / 8 centres
    assert memory_per_rank(2_000_000, 512, 8, 0.1) == big + 2 * 25_000 * 512 * 4
    half = memory_per_rank(2_000_000, 512, 8, 0.1, torch.float16, "none")
    assert half == 250_000 * 512 * 2 * 2 + 2 * 25_000 * 512 * 2  # weight + grad, sampled copy + grad
    logits = memory_per_rank(2_000_000, 512, 8, 0.1, batch_size=128) - memory_per_rank(2_000_000, 512, 8, 0.1)
    assert logits == 3 * (128 * 8) * 25_000 * 4
    with pytest.raises(ValueError, match="optimizer 'lamb'"):
        memory_per_rank(10, 4, 1, optimizer="lamb")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_full_margin_softmax(tmp_path: Path):
    """Two processes, uneven batches (9 + 7 rows), every head; loss and gradients equal the un-sharded ones."""
    data = {**_data(classes=100, seed=2), "sizes": [9, 7], "heads": HEAD_NAMES, "sample_rate": 0.3}
    torch.save(data, tmp_path / "data.pt")
    port = _free_port()
    worker = ROOT / "tests" / "partial_fc_worker.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", str(port), str(tmp_path / "data.pt"),
                               str(tmp_path / f"out{r}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("gloo workers did not finish in 240 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    results = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    assert results[0]["arcface"]["shard"] == (0, 50) and results[1]["arcface"]["shard"] == (50, 100)
    for name in HEAD_NAMES:
        ref_loss, ref_e, ref_w, ref_b = _reference(name, data)
        for rank, res in enumerate(results):
            got = res[name]
            torch.testing.assert_close(got["loss"], ref_loss, rtol=1e-5, atol=1e-5, msg=f"{name} rank {rank}")
            rows = slice(0, 9) if rank == 0 else slice(9, 16)
            # DDP convention: each rank's embedding gradient is world_size x dL/de
            torch.testing.assert_close(got["embedding_grad"] / 2, ref_e[rows], rtol=1e-4, atol=1e-6,
                                       msg=f"{name} rank {rank}")
            torch.testing.assert_close(got["weight_grad"], ref_w, rtol=1e-4, atol=1e-6, msg=f"{name} rank {rank}")
            if got["bias_grad"] is not None:
                torch.testing.assert_close(got["bias_grad"], ref_b, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got["full_weight"], data["weight"])
    sampled = results[0]["sampled"]
    classes = sampled["classes"]
    assert torch.isin(data["labels"], classes.nonzero().squeeze(1)).all()
    for (lo, hi), res in zip([(0, 50), (50, 100)], results):
        in_shard = data["labels"][(data["labels"] >= lo) & (data["labels"] < hi)]
        assert torch.unique(in_shard).numel() <= res["sampled"]["count"]
        # int(0.3 * 50), raised to the global batch (16 rows) so that every positive fits without a host read
        assert res["sampled"]["count"] == max(15, data["labels"].numel())
    ref_loss, ref_e, ref_w, _ = _reference("arcface", data, classes)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["sampled"]["loss"], ref_loss, rtol=1e-5, atol=1e-5)
        rows = slice(0, 9) if rank == 0 else slice(9, 16)
        torch.testing.assert_close(res["sampled"]["embedding_grad"] / 2, ref_e[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["sampled"]["weight_grad"], ref_w, rtol=1e-4, atol=1e-6)
