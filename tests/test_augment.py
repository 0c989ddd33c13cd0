"""Loader augmentations (2018 --color, --cutoff; random scale/shift): what each does, per-sample seeding,
the options' spellings, and an exact resume of a run that uses them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from datasets.augment import Augmenter, EpochTaggedSampler, tag_epochs
from datasets.rec_dataset import RecFaceDataset
from datasets.samplers import ShuffleSampler
from tasks.training.config import load_config, parse_args
from tasks.training.record import read_metrics
from tasks.training.trainer import train
from train_data import tiny_config, tiny_dataset


def _face(h=48, w=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 90, np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(60, 200, (h - 2 * (h // 4), w - 2 * (w // 4), 3))
    return img


def test_off_is_the_identity_and_the_dataset_keeps_no_augmenter():
    img = _face()
    assert Augmenter()(img, 3, 1) is img
    ds = RecFaceDataset(tiny_dataset(), normalize=None, augment=Augmenter(seed=5))
    assert ds.augment is None
    plain = RecFaceDataset(tiny_dataset(), normalize=None)
    assert torch.equal(ds[4][0], plain[4][0]) and torch.equal(ds[(4, 7)][0], plain[4][0])


def test_draws_depend_on_seed_epoch_and_index_only():
    aug = Augmenter(color=2, color_jitter=0.3, cutoff=12, rand_scale=0.1, rand_shift=0.05, seed=11)
    img = _face()
    first = aug(img, 5, 2)
    assert first.dtype == np.uint8 and first.shape == img.shape
    assert np.array_equal(first, aug(img.copy(), 5, 2))  # same sample, same result (any worker, after a resume)
    assert np.array_equal(img, _face())  # the input is not changed in place
    others = [aug(img, 5, 3), aug(img, 6, 2), Augmenter(color=2, color_jitter=0.3, cutoff=12, rand_scale=0.1,
                                                         rand_shift=0.05, seed=12)(img, 5, 2)]
    assert all(not np.array_equal(first, o) for o in others)


def test_cutoff_erases_a_square_to_128_in_about_half_the_samples():
    aug = Augmenter(cutoff=10, seed=1)
    img = np.full((40, 40, 3), 7, np.uint8)
    erased = 0
    for i in range(200):
        out = aug(img, i, 0)
        grey = out[:, :, 0] == 128
        if grey.any():
            erased += 1
            rows, cols = np.flatnonzero(grey.any(1)), np.flatnonzero(grey.any(0))
            assert len(rows) <= 10 and len(cols) <= 10 and grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
            assert (out[~grey] == 7).all()
    assert 70 <= erased <= 130


def test_colour_jitter_stays_within_its_strength():
    img = np.full((16, 16, 3), 100, np.uint8)
    aug = Augmenter(color=1, color_jitter=0.2, seed=0)
    values = np.array([aug(img, i, 0)[0, 0, 0] for i in range(200)], float)
    assert values.min() >= 100 * 0.8 ** 1 - 2 and values.max() <= 100 * 1.2 + 2  # grey: only brightness moves it
    assert values.std() > 3


def test_scale_and_shift_move_the_content_within_the_crop():
    img = np.zeros((40, 40, 3), np.uint8)
    img[18:22, 18:22] = 255
    aug = Augmenter(rand_shift=0.2, seed=0)
    centres = []
    for i in range(30):
        out = aug(img, i, 0)[:, :, 0].astype(float)
        ys, xs = np.nonzero(out > 60)
        centres.append((ys.mean(), xs.mean()))
    spread = np.ptp(np.array(centres), axis=0)
    assert (spread > 4).all() and (np.abs(np.array(centres) - 19.5) <= 8.5 + 1).all()


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="color must be"):
        Augmenter(color=3)
    with pytest.raises(ValueError, match="cutoff"):
        Augmenter(cutoff=-1)


def test_epoch_tags_follow_the_sampler():
    sampler = ShuffleSampler(6, seed=0)
    tagged = EpochTaggedSampler(sampler)
    sampler.set_epoch(3)
    items = list(tagged)
    assert len(tagged) == 6 and sorted(i for i, _ in items) == list(range(6)) and {e for _, e in items} == {3}
    args = tag_epochs({"sampler": sampler, "batch_size": 2})
    assert isinstance(args["sampler"], EpochTaggedSampler) and args["batch_size"] == 2


def test_options_keep_the_2018_spellings():
    cfg = parse_args(["--color", "1", "--cutoff", "20", "--rand-scale", "0.1", "--rand-shift", "0.05", "--color-jitter", "0.3"])
    aug = cfg.augmenter()
    assert (aug.color, aug.cutoff, aug.rand_scale, aug.rand_shift, aug.color_jitter) == (1, 20, 0.1, 0.05, 0.3)
    assert load_config(None, {"color": 2}).augmenter().color == 2
    with pytest.raises(ValueError, match="color"):
        load_config(None, {"color": 5})


def _losses(out) -> pd.Series:
    m = read_metrics(out)
    return m[m.kind == "train"].set_index("step")["loss"]


def test_a_resumed_run_with_augmentation_repeats_the_uninterrupted_one(tmp_path):
    # 64 images, batch 8: 8 steps an epoch, so the run crosses an epoch boundary after the resume point
    common = dict(frequent=1, deterministic=True, num_workers=1, ckpt=3, val_targets=[], color=2, color_jitter=0.3,
                  cutoff=10, rand_scale=0.1, rand_shift=0.05)
    whole = train(tiny_config(tmp_path / "a", max_steps=11, verbose=100, **common))
    part = train(tiny_config(tmp_path / "b", max_steps=5, verbose=100, **common))
    assert part.step == 5
    resumed = train(tiny_config(tmp_path / "b", max_steps=11, verbose=100, resume="auto", **common))
    assert whole.step == resumed.step == 11
    want, got = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert got.loc[6:].tolist() == want.loc[6:].tolist()
    plain = train(tiny_config(tmp_path / "c", max_steps=11, verbose=100, frequent=1, deterministic=True, num_workers=1,
                              ckpt=0, val_targets=[]))
    assert _losses(tmp_path / "c").tolist() != want.tolist()  # the augmentation did change the batches
    assert plain.step == 11
