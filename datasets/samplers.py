"""Training samplers: DDP-aware, deterministic per (seed, epoch), resumable in the middle of an epoch.

* :class:`ShuffleSampler` -- dataset indices, like ``DistributedSampler`` (same permutation:
  ``torch.randperm`` seeded with ``seed + epoch``; same padding / ``drop_last`` rules), plus
  :meth:`state_dict` / :meth:`load_state_dict` so a resumed run sees exactly the remaining indices.
* :class:`IdentityBalancedSampler` -- a batch sampler: every batch holds ``identities_per_batch``
  identities x ``images_per_identity`` images (for triplet or pair losses).

Resuming: ``state_dict()`` records the epoch and how many items (indices or batches) this rank
has handed out in it. A DataLoader pulls ahead of training (prefetching), so a trainer that wants
the exact point passes what it really consumed: ``state_dict(position=steps_done_in_epoch * per_step)``.
After ``load_state_dict`` the next iteration of that epoch starts at the stored position; a
different epoch (``set_epoch``) or a completed pass starts at 0 again.
"""
from __future__ import annotations

import math
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


class _ResumableEpochs:
    """Epoch / position bookkeeping shared by the samplers."""

    seed: int
    world_size: int
    epoch: int = 0
    _start: int = 0  # where the next pass over ``epoch`` begins
    _handed_out: int = 0  # items handed out in the current pass (including ``_start``)

    def _identity(self) -> dict:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the order); a new epoch starts at its beginning."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = int(epoch)

    def state_dict(self, position: int | None = None) -> dict:
        """``{"epoch", "position", ...}``; ``position`` defaults to the items handed out so far."""
        return {"epoch": self.epoch, "position": self._handed_out if position is None else int(position), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next pass over ``state["epoch"]`` skips its first ``state["position"]`` items."""
        mine = self._identity()
        differs = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differs:
            raise ValueError(f"sampler state was saved with other settings {differs} (saved, now)")
        self.epoch = int(state["epoch"])
        self._start = self._handed_out = int(state["position"])

    def _pass(self, items: Sequence) -> Iterator:
        start = min(self._start, len(items))
        self._handed_out = start
        for j in range(start, len(items)):
            item = items[j]
            self._handed_out = j + 1
            yield item
        self._start = 0


class ShuffleSampler(_ResumableEpochs, Sampler[int]):
    """Indices ``0..n-1`` for this rank, shuffled per ``(seed, epoch)``; resumable.

    ``data`` is the dataset or its length. Like ``DistributedSampler``: the permutation is padded
    with its own first indices to a multiple of ``world_size`` (or, with ``drop_last``, its tail is
    dropped), and rank ``r`` takes every ``world_size``-th index from ``r``. ``rank`` and
    ``world_size`` default to the initialised process group, else 0 and 1.
    """

    def __init__(
        self,
        data,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ):
        self.size = data if isinstance(data, int) else len(data)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        if drop_last and self.size % self.world_size:
            self.num_samples = math.ceil((self.size - self.world_size) / self.world_size)
        else:
            self.num_samples = math.ceil(self.size / self.world_size)
        self.total_size = self.num_samples * self.world_size

    def _identity(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "num_samples": self.num_samples, "shuffle": self.shuffle}

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.total_size]
        elif self.total_size > len(order) and order:
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return self._pass(self.indices())

    def __len__(self) -> int:
        return self.num_samples - min(self._start, self.num_samples)


class IdentityBalancedSampler(_ResumableEpochs, Sampler[list[int]]):
    """Batches of ``identities_per_batch`` (K) identities x ``images_per_identity`` (M) images.

    ``labels``: int class of every dataset item, shape ``(N,)``. Per epoch the identities are
    shuffled (seeded by ``(seed, epoch)``) and cut into groups of K; every identity appears in at
    most one batch per epoch; a last incomplete group is dropped, and the batch count is cut to a
    multiple of ``world_size`` so every rank gets the same number; rank ``r`` takes batches
    ``r, r + world_size, ...``. The M images of an identity are drawn without replacement, seeded
    by ``(seed, epoch, batch)``, so resuming needs no replay. Identities with fewer than M images:
    ``small="replace"`` (default) draws their M images with replacement (repeats), ``"skip"``
    leaves them out of every batch. Each batch is a list of K*M dataset indices, identity by
    identity.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        identities_per_batch: int,
        images_per_identity: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        small: Literal["replace", "skip"] = "replace",
    ):
        if identities_per_batch < 1 or images_per_identity < 1:
            raise ValueError("identities_per_batch and images_per_identity must be >= 1")
        if small not in ("replace", "skip"):
            raise ValueError(f"small must be 'replace' or 'skip', got {small!r}")
        labels = np.asarray(labels, dtype=np.int64)
        self.k, self.m, self.seed, self.small = int(identities_per_batch), int(images_per_identity), int(seed), small
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self._members = np.argsort(labels, kind="stable")
        _, self._starts, self._counts = np.unique(labels[self._members], return_index=True, return_counts=True)
        keep = self._counts >= (self.m if small == "skip" else 1)
        self._eligible = np.flatnonzero(keep)
        self.num_identities = len(self._eligible)
        self.num_batches = (self.num_identities // self.k) // self.world_size
        if self.num_batches == 0:
            raise ValueError(
                f"{self.num_identities} usable identities cannot fill one batch of {self.k} identities on each of "
                f"{self.world_size} ranks"
            )

    def _identity(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "num_batches": self.num_batches, "k": self.k, "m": self.m}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *key])))

    def _batch(self, order: np.ndarray, epoch: int, b: int) -> list[int]:
        rng = self._rng(epoch, b)
        out = []
        for ident in order[b * self.k : (b + 1) * self.k]:
            start, count = self._starts[ident], self._counts[ident]
            if count >= self.m:
                pick = rng.choice(count, self.m, replace=False)
            else:
                pick = rng.integers(0, count, self.m)
            out.extend(self._members[start + pick].tolist())
        return out

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one), all of them."""
        epoch = self.epoch if epoch is None else epoch
        return list(_LazyBatches(self, epoch))

    def __iter__(self) -> Iterator[list[int]]:
        return self._pass(_LazyBatches(self, self.epoch))

    def __len__(self) -> int:
        return self.num_batches - min(self._start, self.num_batches)


class _LazyBatches(Sequence):
    """This rank's batches of one epoch, drawn on access (so skipping ahead costs nothing)."""

    def __init__(self, sampler: IdentityBalancedSampler, epoch: int):
        self.sampler, self.epoch = sampler, epoch
        self.order = sampler._rng(epoch).permutation(sampler._eligible)

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __getitem__(self, j: int) -> list[int]:
        if not 0 <= j < len(self):
            raise IndexError(j)
        s = self.sampler
        return s._batch(self.order, self.epoch, j * s.world_size + s.rank)


__all__ = ["ShuffleSampler", "IdentityBalancedSampler"]
