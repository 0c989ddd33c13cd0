"""Checkpoint files: loading the embedder from the file alone, clear errors, optimizer re-sharding, RNG states."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.errors import FormatError
from models import get_backbone
from models.partial_fc import shard_bounds
from tasks.checkpoint import (gather_optimizer_state, link_checkpoint, load_embedder, read_checkpoint,
                              resolve_checkpoint, rng_state, save_checkpoint, set_rng_state, shard_optimizer_state)
from tasks.training.trainer import train
from train_data import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 3-step run's last.pt (m05, 32x32, emb 32, CosFace over 16 classes)."""
    out = tmp_path_factory.mktemp("ckpt-run")
    result = train(tiny_config(out, max_steps=3, verbose=3, val_targets=[]))
    return result.last_checkpoint


def test_load_embedder_rebuilds_the_network_from_the_file(trained: Path):
    model, meta = load_embedder(trained)
    assert not model.training
    assert (meta["network"], meta["emb_size"], meta["image_size"], meta["normalize"]) == ("m05", 32, [32, 32], "arcface")
    assert meta["step"] == 3 and meta["num_classes"] == 16 and meta["loss"] == "cosface"
    state = read_checkpoint(trained)
    assert state["head"]["weight"].shape == (16, 32) and state["config"]["network"] == "m05"
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    # the same weights as a freshly built network loaded by hand
    fresh = get_backbone("m05", version_input=0, image_size=(32, 32), emb_size=32)
    fresh.load_state_dict(state["backbone"])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)


def test_prefix_epoch_spelling_and_links(trained: Path, tmp_path: Path):
    link_checkpoint(trained, tmp_path / "model-0007.pt")
    assert resolve_checkpoint(f"{tmp_path / 'model'},7") == tmp_path / "model-0007.pt"
    model, meta = load_embedder(f"{tmp_path / 'model'},7")
    assert meta["network"] == "m05"
    (tmp_path / "old-0003.params").write_bytes(b"\0" * 16)
    with pytest.raises(FormatError, match=r"old-0003.params: is an MXNet checkpoint \(expected a facepipe checkpoint"):
        resolve_checkpoint(f"{tmp_path / 'old'},3")
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*model,8': .*model-0008.pt does not exist"):
        resolve_checkpoint(f"{tmp_path / 'model'},8")


def test_files_that_are_not_checkpoints(tmp_path: Path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FormatError, match=r"garbage.pt: cannot be read as a torch checkpoint"):
        load_embedder(garbage)
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(FormatError, match=r"weights.pt: format None \(expected a facepipe training checkpoint"):
        load_embedder(other)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_embedder(tmp_path / "missing.pt")


def test_checkpoint_of_another_network_is_refused_naming_both(trained: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"cannot start from it \(pretrained\): the checkpoint holds network m05 with "
                                         r"emb_size 32 at 32x32, this run builds network m05 with emb_size 64 at 32x32"):
        train(tiny_config(tmp_path / "a", emb_size=64, pretrained=str(trained), max_steps=1))
    with pytest.raises(ValueError, match=r"cannot resume this run: the checkpoint holds network m05 .*"
                                         r"this run builds network m1 with emb_size 32"):
        train(tiny_config(tmp_path / "b", network="m1", resume=str(trained), max_steps=1))


def test_optimizer_state_round_trips_through_any_world_size():
    weight = torch.nn.Parameter(torch.randn(10, 4))
    other = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([{"params": [other]}, {"params": [weight]}], lr=0.1, momentum=0.9)
    (weight.sum() * 2 + other.sum()).backward()
    opt.step()
    full = gather_optimizer_state(opt, {weight: 10})
    assert full["sharded"] == {1: 10}
    for world in (1, 2, 3):
        parts = [shard_optimizer_state(full, rank, world)["state"][1]["momentum_buffer"] for rank in range(world)]
        assert [p.shape[0] for p in parts] == [b - a for a, b in (shard_bounds(10, r, world) for r in range(world))]
        assert torch.equal(torch.cat(parts), full["state"][1]["momentum_buffer"])
        assert torch.equal(shard_optimizer_state(full, 0, world)["state"][0]["momentum_buffer"],
                           full["state"][0]["momentum_buffer"])
    fresh = torch.optim.SGD([{"params": [other]}, {"params": [torch.nn.Parameter(torch.randn(5, 4))]}], lr=0.1, momentum=0.9)
    fresh.load_state_dict(shard_optimizer_state(full, 1, 2))
    assert torch.equal(fresh.state_dict()["state"][1]["momentum_buffer"], full["state"][1]["momentum_buffer"][5:])


def test_rng_states_survive_a_weights_only_file(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    want = (random.random(), np.random.rand(), torch.rand(1))
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1)) == want
