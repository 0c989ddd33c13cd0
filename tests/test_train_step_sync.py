"""The training step reads nothing back to the host between log points (so a GPU never waits for the CPU).

On the CPU, every way a tensor's value reaches Python (``.item()``, ``bool()``, ``float()``, ``int()``,
``.tolist()``, ``.cpu()``) is counted while the trainer runs; inside ``_train_step``
the count must be zero, and outside it such reads happen only at log points (every ``frequent``
steps), at checkpoints and at the start and the end. Where CUDA exists, the same steps run under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tasks.training import trainer as trainer_mod
from tasks.training.record import read_status
from train_data import tiny_config

# (``.numpy()`` is left out: it fails on a device tensor, and on the CPU it is a view, not a read-back)
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu")


@pytest.fixture
def read_counter(monkeypatch):
    """Patch the tensor read methods; returns the list of (method, trainer step, inside _train_step)."""
    calls: list[tuple[str, int, bool]] = []
    where = {"step": -1, "inside": False}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, __name=name, **kwargs):
            calls.append((__name, where["step"], where["inside"]))
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = trainer_mod._Trainer._train_step

    def watched(self, images, labels):
        where["step"], where["inside"] = self.step, True
        try:
            return step(self, images, labels)
        finally:
            where["inside"] = False

    monkeypatch.setattr(trainer_mod._Trainer, "_train_step", watched)
    return calls


@pytest.mark.parametrize("sample_rate", [0.5])  # sampled Partial FC: the path with the most to sync
def test_no_host_read_inside_the_step_and_only_at_log_points_outside(tmp_path: Path, read_counter, sample_rate):
    cfg = tiny_config(tmp_path, max_steps=6, frequent=3, verbose=10**6, ckpt=0, val_targets=[], num_workers=0,
                      sample_rate=sample_rate, loss="arcface")
    result = trainer_mod.train(cfg)
    assert result.step == 6 and result.final_loss is not None
    inside = [c for c in read_counter if c[2]]
    assert inside == [], f"host reads inside the training step: {inside[:10]}"
    # Outside the step: the data loader of this process and the log points (after steps 3 and 6) only.
    between = sorted({step for _, step, inside in read_counter if not inside and step not in (-1, 2, 5)})
    assert between == [], f"host reads outside the log points, after the steps {between}"


def test_a_skipped_step_changes_no_weight_momentum_or_batch_norm_statistic(tmp_path: Path, caplog):
    """lr so large that the second step's loss is not finite: weights, momentum and running statistics
    after the skipped steps equal those after the last good one (decided on the device)."""
    caplog.set_level(logging.WARNING, logger="facepipe")
    cfg = tiny_config(tmp_path, lr=1e30, grad_clip=0, max_steps=3, frequent=3, verbose=10**6, ckpt=0,
                      val_targets=[], nan_max_consecutive=100)
    t = trainer_mod._Trainer(cfg, _single(), None)
    loader = iter(t.loader)
    snapshots = []
    for _ in range(3):
        images, labels = next(loader)
        ok, loss, _ = t._train_step(images, labels)
        t.step += 1
        snapshots.append((bool(ok), {k: v.clone() for k, v in t.backbone.state_dict().items()},
                          {id(p): s["momentum_buffer"].clone() for p, s in t.optimizer.state.items()}))
    oks = [s[0] for s in snapshots]
    assert oks[0] and not oks[-1], oks
    good = max(i for i, ok in enumerate(oks) if ok)
    for later in snapshots[good + 1:]:
        for key, value in snapshots[good][1].items():
            assert torch.equal(value, later[1][key]), key  # weights and running_mean/var untouched
        for key, value in snapshots[good][2].items():
            assert torch.equal(value, later[2][key])


def test_checkpoints_written_in_the_background_are_complete(tmp_path: Path, monkeypatch):
    """The CUDA path (checkpoint files written by a thread while training goes on), run on the CPU with
    a deep copy of the state, as the device-to-host copy makes it on CUDA."""
    monkeypatch.setattr(trainer_mod, "_ASYNC_SAVE_DEVICES", ("cpu",))
    state = trainer_mod._Trainer._state

    def copied(self, val):
        return {k: (v if k == "config" else _clone(v)) for k, v in state(self, val).items()}

    monkeypatch.setattr(trainer_mod._Trainer, "_state", copied)
    result = trainer_mod.train(tiny_config(tmp_path, max_steps=6, verbose=2, ckpt=2, val_targets=["tiny_val"]))
    from tasks.checkpoint import read_checkpoint

    assert [p.name for p in result.checkpoints] == ["model-0001.pt", "model-0002.pt", "model-0003.pt"]
    assert read_checkpoint(result.last_checkpoint)["progress"]["step"] == 6
    assert read_checkpoint(result.checkpoints[0])["progress"]["step"] == 2
    status = read_status(tmp_path)
    assert status["state"] == "finished" and status["last_checkpoint"] == str(result.last_checkpoint)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_run_under_sync_debug_mode_error(tmp_path: Path, monkeypatch):  # pragma: no cover - GPU only
    step = trainer_mod._Trainer._train_step

    def strict(self, images, labels):
        if self.step < 2:  # compilation and the first allocations may synchronise
            return step(self, images, labels)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, images, labels)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(trainer_mod._Trainer, "_train_step", strict)
    cfg = tiny_config(tmp_path, device="cuda", max_steps=6, frequent=6, verbose=10**6, ckpt=0, val_targets=[],
                      sample_rate=0.5, loss="arcface", compile=False)
    assert trainer_mod.train(cfg).step == 6


def _single():
    from tasks.training.distributed import DistContext

    return DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def test_an_exploding_loss_is_warned_once_with_the_likely_causes(caplog):
    from types import SimpleNamespace

    from tasks.training.config import TrainConfig

    caplog.set_level(logging.WARNING, logger="facepipe")
    cfg = TrainConfig(dataset="d", output="o", lr=0.2, loss="arcface", margin_m=0.5)
    watcher = SimpleNamespace(log=logging.getLogger("facepipe"), _loss_floor=None, _exploding=False, step=0, cfg=cfg)
    for step, loss in enumerate([40.0, 20.0, 10.0, 9.0, 25.0, 30.0, 9.5, 8.0, 19.0]):
        watcher.step = step
        trainer_mod._Trainer._watch_loss(watcher, loss)
    warned = [r.getMessage() for r in caplog.records if "exploding" in r.getMessage()]
    assert len(warned) == 2, warned  # steps 4 (25 > 2 x 9) and 8 (19 > 2 x 8); step 5 continues the first
    assert "lr 0.2" in warned[0] and "grad_clip 5" in warned[0] and "margin arcface s=64 m=0.5" in warned[0]
