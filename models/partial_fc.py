"""Partial FC: the classifier ``(C, emb)`` sharded over ranks, with class-centre sampling (Partial FC v2 idea).

Each rank keeps the class centres ``[start, stop)`` of ``shard_bounds(C, rank, world)``. A step:
all-gather the embeddings (with gradient) and labels of every rank; keep this shard's positive centres
plus a random ``sample_rate`` share of the others; cosine logits ``(N_global, sampled)`` in float32;
the margin head (labels of classes outside the shard are -1); softmax cross-entropy whose max and
denominator are all-reduced over ranks. The loss is the mean over the global batch, the same value
on every rank, and equals the un-sharded, un-sampled margin-softmax loss at ``sample_rate=1``.

Gradient convention (as arcface_torch): the gradient returned to each rank's *local* embeddings is
``world_size * dL/de``, because DDP averages the backbone's gradients over ranks; the class centres get
``dL/dW`` of their own shard (they are not wrapped in DDP). World size 1, or torch.distributed not
initialised, needs no collectives. Works with gloo (CPU) and NCCL.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.margins import MarginHead

OPTIMIZER_STATES = {"none": 0, "sgd_nomomentum": 0, "sgd": 1, "adam": 2, "adamw": 2}


def shard_bounds(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Class range ``[start, stop)`` of ``rank``: ``C // W`` classes each, the first ``C % W`` ranks one more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be sharded over {world_size} ranks (need >= 1 class each)")
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_gather_rows(local: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's ``local`` (row counts ``sizes``), padding to the largest for the collective."""
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherEmbeddings(torch.autograd.Function):
    """All-gather rows; backward all-reduces the gradient and returns this rank's rows times world size."""

    @staticmethod
    def forward(ctx, local, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose classes are split across ranks (labels -1: not here)."""

    @staticmethod
    def forward(ctx, logits, labels, world_size, group):
        with torch.no_grad():
            row_max = logits.max(dim=1).values
            if world_size > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            prob = (logits - row_max.unsqueeze(1)).exp_()
            denom = prob.sum(dim=1)
            valid = labels >= 0
            index = labels.clamp_min(0).unsqueeze(1)
            target = torch.where(valid, logits.gather(1, index).squeeze(1) - row_max, torch.zeros_like(row_max))
            if world_size > 1:
                dist.all_reduce(denom, op=dist.ReduceOp.SUM, group=group)
                dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
            prob.div_(denom.unsqueeze(1))
        ctx.save_for_backward(prob, labels)
        return (denom.log() - target).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        prob, labels = ctx.saved_tensors
        grad = prob.clone()
        valid = labels >= 0
        index = labels.clamp_min(0).unsqueeze(1)
        grad.scatter_add_(1, index, -valid.to(grad.dtype).unsqueeze(1))
        return grad * (grad_loss / prob.shape[0]), None, None, None


def gather_shards(local: torch.Tensor, num_classes: int, group=None) -> torch.Tensor:
    """The full ``(C, ...)`` tensor from every rank's shard rows (weights, biases, optimizer state)."""
    rank, world = _world(group)
    start, stop = shard_bounds(num_classes, rank, world)
    if local.shape[0] != stop - start:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, its shard of {num_classes} classes "
                         f"over {world} ranks has {stop - start}")
    if world == 1:
        return local.detach().clone()
    sizes = [b - a for a, b in (shard_bounds(num_classes, r, world) for r in range(world))]
    return _all_gather_rows(local.detach(), sizes, group)


def shard_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a full ``(C, ...)`` tensor for ``rank`` in a world of ``world_size``."""
    start, stop = shard_bounds(full.shape[0], rank, world_size)
    return full[start:stop].clone()


def memory_per_rank(num_classes: int, emb_size: int, world_size: int, sample_rate: float = 1.0,
                    dtype: torch.dtype = torch.float32, optimizer: str = "sgd", *, batch_size: int = 0,
                    bias: bool = False) -> int:
    """Bytes of Partial FC state on the busiest rank (rank 0 holds ``ceil(C / W)`` centres).

    Counts: the weight shard, its gradient and the optimizer state (``sgd`` momentum: 1 copy, ``adam``/
    ``adamw``: 2, ``none``/``sgd_nomomentum``: 0) in ``dtype``; with ``sample_rate < 1`` the sampled
    centres and their gradient; with ``batch_size`` (per rank) the float32 logits of the global batch
    (cosines, margin logits, softmax probabilities). Activations of the backbone are not included.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r} is not known (expected one of {', '.join(OPTIMIZER_STATES)})")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    num_local = math.ceil(num_classes / world_size)
    num_sample = num_local if sample_rate >= 1.0 else max(1, int(sample_rate * num_local))
    itemsize = torch.empty((), dtype=dtype).element_size()
    columns = emb_size + (1 if bias else 0)
    persistent = num_local * columns * itemsize * (2 + OPTIMIZER_STATES[optimizer])
    sampled = 2 * num_sample * columns * itemsize if sample_rate < 1.0 else 0
    logits = 3 * batch_size * world_size * num_sample * 4
    return persistent + sampled + logits


class PartialFC(nn.Module):
    """Sharded, sampled classifier + margin softmax loss.

    ``forward(embeddings (N, emb_size) float, labels (N,) int64 in [0, num_classes)) -> loss (0-d float32)``.
    ``weight`` is this rank's ``(stop - start, emb_size)`` shard (init N(0, 0.01)); ``bias`` exists only for
    the ``Softmax`` head (plain FC with bias, not normalised), unless ``bias=False`` (2018 ``--fc7-no-bias``).
    ``last_sample_index`` holds the shard rows
    used by the last step. The margin head's per-step state (``step()``) is the caller's to advance.
    """

    def __init__(self, margin: MarginHead, emb_size: int, num_classes: int, sample_rate: float = 1.0, *,
                 process_group=None, generator: torch.Generator | None = None, bias: bool | None = None):
        super().__init__()
        if not isinstance(margin, MarginHead):
            raise TypeError(f"margin must be a models.margins.MarginHead (see get_margin), got {type(margin).__name__}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.margin = margin
        self.emb_size, self.num_classes, self.sample_rate = int(emb_size), int(num_classes), float(sample_rate)
        self.group, self.generator = process_group, generator
        self.rank, self.world_size = _world(process_group)
        self.start, self.stop = shard_bounds(self.num_classes, self.rank, self.world_size)
        self.num_local = self.stop - self.start
        self.num_sample = self.num_local if sample_rate >= 1.0 else max(1, int(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.num_local, self.emb_size)))
        if bias and margin.normalized:
            raise ValueError(f"PartialFC: a bias applies to the plain Softmax head only, not to {type(margin).__name__}")
        has_bias = (not margin.normalized) if bias is None else bool(bias)
        self.bias = nn.Parameter(torch.zeros(self.num_local)) if has_bias else None
        self.last_sample_index: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (f"classes={self.num_classes} shard=[{self.start}, {self.stop}) rank={self.rank}/{self.world_size} "
                f"emb_size={self.emb_size} sample_rate={self.sample_rate}")

    @torch.no_grad()
    def _sample(self, local: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Shard rows to use (positives always) and the labels re-indexed into them."""
        valid = local >= 0
        positive = torch.unique(local[valid])
        count = max(self.num_sample, positive.numel())
        if count >= self.num_local:
            return None, local
        device = self.weight.device if self.generator is None else self.generator.device
        keys = torch.rand(self.num_local, generator=self.generator, device=device).to(self.weight.device)
        keys[positive] = 2.0
        index = keys.topk(count).indices.sort().values
        remapped = local.clone()
        remapped[valid] = torch.searchsorted(index, local[valid])
        return index, remapped

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.emb_size:
            raise ValueError(f"PartialFC: embeddings must be (N, {self.emb_size}), got {tuple(embeddings.shape)}")
        if (labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]
                or labels.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"PartialFC: labels must be int64 of shape ({embeddings.shape[0]},), "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
        if self.world_size > 1:
            count = torch.tensor([embeddings.shape[0]], device=embeddings.device)
            counts = [torch.zeros_like(count) for _ in range(self.world_size)]
            dist.all_gather(counts, count, group=self.group)
            sizes = [int(c) for c in counts]
            all_embeddings = _GatherEmbeddings.apply(embeddings, sizes, self.rank, self.group)
            all_labels = _all_gather_rows(labels, sizes, self.group)
        else:
            all_embeddings, all_labels = embeddings, labels
        bad = (all_labels < 0) | (all_labels >= self.num_classes)
        if bool(bad.any()):  # one host sync per step; out-of-range labels would otherwise train silently
            value = int(all_labels[bad][0])
            raise ValueError(f"PartialFC: label {value} is out of range (expected 0..{self.num_classes - 1})")
        local = all_labels - self.start
        local = torch.where((local >= 0) & (local < self.num_local), local, torch.full_like(local, -1))
        weight, bias = self.weight, self.bias
        if self.num_sample < self.num_local:
            index, local = self._sample(local)
            if index is not None:
                weight = weight[index]
                bias = None if bias is None else bias[index]
            self.last_sample_index = index
        with torch.autocast(device_type=all_embeddings.device.type, enabled=False):
            x, w = all_embeddings.float(), weight.float()
            norms = target_logit = None
            if self.margin.normalized:
                logits = F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1)).clamp(-1.0, 1.0)
                if self.margin.needs_norms:
                    norms = x.norm(dim=1)
                if self.margin.needs_target_logit:
                    target_logit = self._target_logit(logits.detach(), local)
            else:
                logits = F.linear(x, w, None if bias is None else bias.float())
            scaled = self.margin(logits, local, norms, target_logit)
            return _ShardedCrossEntropy.apply(scaled, local, self.world_size, self.group)

    def _target_logit(self, logits: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        valid = local >= 0
        value = torch.where(valid, logits.gather(1, local.clamp_min(0).unsqueeze(1)).squeeze(1),
                            torch.zeros(local.shape, dtype=logits.dtype, device=logits.device))
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return value

    def full_weight(self) -> torch.Tensor:
        """The full ``(num_classes, emb_size)`` class centres, gathered from all ranks (collective)."""
        return gather_shards(self.weight, self.num_classes, self.group)

    def full_bias(self) -> torch.Tensor | None:
        """The full ``(num_classes,)`` bias (Softmax head only; collective), else None."""
        return None if self.bias is None else gather_shards(self.bias, self.num_classes, self.group)

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's rows of a full ``(num_classes, emb_size)`` weight (e.g. saved with another world size)."""
        if tuple(weight.shape) != (self.num_classes, self.emb_size):
            raise ValueError(f"PartialFC: full weight must be ({self.num_classes}, {self.emb_size}), "
                             f"got {tuple(weight.shape)}")
        self.weight.copy_(weight[self.start:self.stop])
        if bias is not None:
            if self.bias is None:
                raise ValueError("PartialFC: this head has no bias (only the Softmax head keeps one)")
            if tuple(bias.shape) != (self.num_classes,):
                raise ValueError(f"PartialFC: full bias must be ({self.num_classes},), got {tuple(bias.shape)}")
            self.bias.copy_(bias[self.start:self.stop])
