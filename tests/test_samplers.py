"""datasets.samplers: DistributedSampler parity, exact resumption, identity-balanced batches."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from datasets.samplers import IdentityBalancedSampler, ShuffleSampler


@pytest.mark.parametrize("n, world, drop_last, shuffle", [(10, 3, False, True), (10, 3, True, True), (12, 4, False, True),
                                                          (7, 2, False, False), (2, 5, False, True)])
def test_same_indices_as_distributed_sampler(n, world, drop_last, shuffle):
    for epoch in (0, 3):
        for rank in range(world):
            ours = ShuffleSampler(n, rank=rank, world_size=world, seed=7, drop_last=drop_last, shuffle=shuffle)
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=7, drop_last=drop_last, shuffle=shuffle)
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


def test_ranks_partition_an_epoch():
    world = 3
    parts = [list(ShuffleSampler(100, rank=r, world_size=world, seed=1, drop_last=True)) for r in range(world)]
    seen = sum(parts, [])
    assert len(seen) == len(set(seen)) == 99


def test_resume_mid_epoch_sees_exactly_the_rest():
    sampler = ShuffleSampler(50, rank=1, world_size=2, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    first = [next(it) for _ in range(9)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 9

    resumed = ShuffleSampler(50, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer calls this again on resume: same epoch keeps the position
    assert len(resumed) == 16
    assert first + list(resumed) == full
    resumed.set_epoch(3)
    assert len(list(resumed)) == 25  # a new epoch starts from its beginning
    explicit = sampler.state_dict(position=4)  # what the trainer really consumed (prefetching)
    again = ShuffleSampler(50, rank=1, world_size=2, seed=3)
    again.load_state_dict(explicit)
    assert list(again) == full[4:]


def test_resume_refuses_other_settings():
    state = ShuffleSampler(50, rank=0, world_size=2, seed=3).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ShuffleSampler(50, rank=0, world_size=4, seed=3).load_state_dict(state)


LABELS = np.repeat(np.arange(9), [1, 2, 3, 4, 5, 6, 7, 8, 9])  # identity i has i + 1 images


def test_identity_batches_shape_and_content():
    sampler = IdentityBalancedSampler(LABELS, identities_per_batch=2, images_per_identity=3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # 9 identities // 2
    used = []
    for batch in batches:
        assert len(batch) == 6
        groups = [batch[:3], batch[3:]]
        for g in groups:
            ids = set(LABELS[g].tolist())
            assert len(ids) == 1
            ident = ids.pop()
            used.append(ident)
            if ident + 1 >= 3:  # enough images: no repeats
                assert len(set(g)) == 3
    assert len(used) == len(set(used)) == 8
    assert list(IdentityBalancedSampler(LABELS, 2, 3, seed=0)) == batches
    assert list(IdentityBalancedSampler(LABELS, 2, 3, seed=1)) != batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_identity_small_classes_skip_or_replace():
    skip = IdentityBalancedSampler(LABELS, 1, 4, seed=0, small="skip")
    assert sorted(set(LABELS[b].tolist()[0] for b in skip)) == [3, 4, 5, 6, 7, 8]
    replace = IdentityBalancedSampler(LABELS, 1, 4, seed=0, small="replace")
    batches = list(replace)
    assert len(batches) == 9
    smallest = next(b for b in batches if LABELS[b[0]] == 0)
    assert smallest == [0, 0, 0, 0]


def test_identity_ddp_and_resume():
    world = 2
    per_rank = [list(IdentityBalancedSampler(LABELS, 2, 2, seed=5, rank=r, world_size=world)) for r in range(world)]
    assert [len(p) for p in per_rank] == [2, 2]  # 4 batches, split evenly
    identities = Counter(int(LABELS[i]) for p in per_rank for b in p for i in b[::2])
    assert all(c == 1 for c in identities.values()) and len(identities) == 8

    sampler = IdentityBalancedSampler(LABELS, 2, 2, seed=5, rank=1, world_size=world)
    it = iter(sampler)
    first = next(it)
    resumed = IdentityBalancedSampler(LABELS, 2, 2, seed=5, rank=1, world_size=world)
    resumed.load_state_dict(sampler.state_dict())
    assert [first] + list(resumed) == per_rank[1]


def test_identity_sampler_refuses_too_few_identities():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        IdentityBalancedSampler(LABELS, 5, 2, world_size=2, rank=0)
