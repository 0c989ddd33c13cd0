"""Training: ``train(cfg) -> TrainResult`` for one process or one rank of ``torchrun``.

    python -m tasks.training --config configs/r100-arcface.yaml --dataset data/ms1m --output runs/r100
    torchrun --standalone --nproc-per-node 8 -m tasks.training --config configs/r100-arcface.yaml ...
    python -m tasks.training --config configs/cpu-demo.yaml --resume auto      # continue exactly

A step: uint8 ``(B, 3, H, W)`` batches from :class:`datasets.RecFaceDataset` (decoded by loader
workers, pinned, copied without blocking) are normalised and mirrored on the device, the backbone
(DDP-wrapped with several ranks, optionally channels_last / ``torch.compile`` / bf16 or fp16 autocast)
maps them to ``(B, emb)`` embeddings, and the objective (:mod:`tasks.training.objectives`: Partial FC margin
softmax; :mod:`tasks.training.objectives`) gives the loss. SGD with momentum; the learning rate warms up linearly
for ``warmup`` steps and is multiplied by 0.1 at each of ``lr_steps``.

The step reads nothing back to the host (no ``.item()``, ``bool()`` or ``float()`` of a tensor): the
gradient norm is clipped to ``grad_clip`` (default 5, as arcface_torch; 0 = off), a step whose loss or
gradient norm is not finite is skipped on the device (the fused SGD kernel's ``found_inf``: no update of
weights or momentum), and the loss, gradient norm and skip counts stay on the device until the next
log point (every ``frequent`` steps), where they are read once. Partial FC checks the labels once per
data set and samples centres without host reads (:mod:`models.partial_fc`). ``compile`` is on by
default on CUDA (off on the CPU).

Divergence: skipped steps are logged at the log point; after ``nan_max_consecutive`` such steps in a
row the run stops with ``FloatingPointError`` naming the likely causes (lr, margin, clipping); a
window whose mean loss has more than doubled over the lowest so far logs a warning, and weights or
batch-norm statistics that are no longer finite stop the run before an evaluation or checkpoint (a
skipped step restores the batch-norm statistics its forward pass changed, so one bad batch does not
poison the model).

Every ``verbose`` steps and at the end, rank 0 evaluates the ``val_targets`` (the others wait) and
checkpoints are written by the ``ckpt`` policy; with ``whiten_trunk`` rank 0 first fits the whitening of
the trunk's features on the training images (:mod:`models.whitening`), and both the evaluation and the
checkpoint use the embedding it extends. A target whose evaluation fails never costs the
training: the checkpoint is written all the same, the failure (with its cause, e.g. diverged weights)
goes to the log, ``metrics.parquet`` (an ``error`` row) and ``status.json`` (``eval_errors``), and
the run goes on, or with ``on_eval_failure: stop`` ends with :class:`EvaluationFailed` after the
checkpoint (``--resume auto`` continues from it). The checkpoint policy (:mod:`tasks.checkpoint`):
0 none; 1 ``best.pt`` (first val target's accuracy) and ``last.pt``; 2 ``model-NNNN.pt`` every time
and ``last.pt``; 3 ``last.pt``. ``last.pt`` is the resume point. Every ``frequent`` steps rank 0 logs loss, lr,
samples/s, the data-wait fraction and memory, and updates ``metrics.parquet``, TensorBoard and
``status.json`` (:mod:`tasks.training.record`).

Exact resume: the checkpoint holds the model, classifier (gathered from all shards), optimizer,
scheduler, scaler, step, sampler position and every rank's RNG states; per-step random draws
(mirror mask, Partial FC sampling, triplet negatives) are seeded from ``(seed, step, rank)``. With
``deterministic: true`` on the CPU a resumed run reproduces the uninterrupted loss sequence exactly.
A different number of ranks may resume: the classifier and its optimizer state are re-sharded and
the sampler continues after the images all ranks had consumed.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from datasets.atomic import PARTIAL_SUFFIX, remove_partials
from datasets.augment import tag_epochs
from datasets.errors import FormatError
from datasets.locks import FolderBusy, folder_lock
from datasets.normalization import normalize_batch
from datasets.rec_dataset import RecFaceDataset
from models.whitening import Whitening, WhitenedTrunkEmbedding, fit_whitening, mirror_features
from tasks import checkpoint as ckpt_io
from tasks.training.distributed import DistContext, distributed
from tasks.training.objectives import Objective, make_objective, step_generator
from tasks.runtime import format_duration, logger
from tasks.training.config import TrainConfig
from tasks.training.validation import TargetError, ValidationSets, resolve_val_targets
from tasks.training.record import METRICS_FILE, STATUS_FILE, RunRecorder

__all__ = ["TrainResult", "EvaluationFailed", "train", "main", "CHECKPOINT_DIR", "LAST", "BEST"]

CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
#: ``whiten_trunk``: the whitening is fit on at most this many training images (evenly spaced).
WHITEN_MAX_IMAGES = 4096
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
#: Devices whose checkpoints are written by a background thread (the state was copied off the device first).
_ASYNC_SAVE_DEVICES = ("cuda",)


@dataclasses.dataclass
class TrainResult:
    """What a run did. Paths are absolute; metrics are fractions (accuracy in [0, 1])."""

    output: Path
    step: int
    epoch: int
    state: str  # "finished" | "stopped" (a stop request ended it early)
    final_loss: float | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best: dict[str, Any] | None  # {"target", "accuracy", "step"}
    checkpoints: list[Path]
    val: dict[str, dict[str, Any]]  # last verification rows per target
    samples_per_s: float | None  # global, median over logged windows after the first
    data_wait: float | None  # median share of time waiting for data
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("output", "last_checkpoint", "best_checkpoint"):
            out[key] = None if out[key] is None else str(out[key])
        out["checkpoints"] = [str(p) for p in self.checkpoints]
        return out


def lr_factor(step: int, warmup: int, lr_steps: list[int]) -> float:
    """Learning-rate multiplier after ``step`` optimiser steps: linear warm-up, x0.1 at each lr step."""
    warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return warm * 0.1 ** bisect.bisect_right(lr_steps, step)


def _set_backend_flags(cfg: TrainConfig, device: str) -> None:
    torch.use_deterministic_algorithms(cfg.deterministic)
    if device == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def divergence_hint(cfg: TrainConfig) -> str:
    """Likely causes of a diverging run, with this run's values (for errors and warnings)."""
    margin = "" if cfg.is_triplet else f", margin {cfg.loss} s={cfg.margin_s:g} m={cfg.margin_m if cfg.margin_m is not None else 'default'}"
    return (f"likely causes: a learning rate too high for this batch (lr {cfg.lr:g}, warmup {cfg.warmup} steps, "
            f"per_batch_size {cfg.per_batch_size}), gradient clipping off or loose (grad_clip "
            f"{cfg.grad_clip:g}{'' if cfg.grad_clip else ' = off'}; arcface_torch uses 5){margin} too large for "
            f"the data; or bad input images")


def _fused_sgd_ok(device: torch.device) -> bool:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


class _BufferGuard:
    """Puts the buffers of modules (batch-norm running statistics and counts, margin statistics) back after a
    skipped step, decided on the device: ``commit(ok)`` keeps this step's values where ``ok``, else restores
    the last committed ones. Per dtype: one ``cat``, one ``where``, one multi-tensor copy back (the
    module's own buffer tensors stay as they are, so ``torch.compile`` sees no aliased inputs)."""

    def __init__(self, *modules: nn.Module | None):
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for module in modules:
            for buf in (module.buffers() if module is not None else ()):
                if buf.numel():
                    groups.setdefault((buf.device, buf.dtype), []).append(buf)
        self.groups = [(bufs, torch.cat([b.detach().reshape(-1) for b in bufs])) for bufs in groups.values()]

    @torch.no_grad()
    def commit(self, ok: torch.Tensor) -> None:
        for bufs, saved in self.groups:
            kept = torch.where(ok, torch.cat([b.reshape(-1) for b in bufs]), saved)
            saved.copy_(kept)
            torch._foreach_copy_(bufs, [part.view_as(b) for part, b in zip(kept.split([b.numel() for b in bufs]), bufs)])


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    return values[len(values) // 2] if values else None


def set_bn_momentum(module: nn.Module, bn_mom: float) -> None:
    """Give every BatchNorm of ``module`` the MXNet momentum ``bn_mom`` (weight of the old running
    statistics; PyTorch's ``momentum`` is the weight of the new batch's: ``1 - bn_mom``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None:
            m.momentum = round(1.0 - bn_mom, 12)  # 0.9 -> exactly 0.1, the layers' default


class _Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, stop: threading.Event | None):
        if not cfg.dataset:
            raise ValueError("option 'dataset' is empty: give the training set folder (train.rec, train.idx, property)")
        if not cfg.output:
            raise ValueError("option 'output' is empty: give the run folder for checkpoints and metrics")
        self.cfg, self.ctx, self.stop = cfg, ctx, stop or threading.Event()
        self.log = logger()
        self.device = ctx.device
        self.output = Path(cfg.output).resolve()
        self.ckpt_dir = self.output / CHECKPOINT_DIR
        self.amp = cfg.amp_dtype(self.device.type)
        self.amp_dtype = _AMP[self.amp]
        _set_backend_flags(cfg, self.device.type)

        self.dataset = RecFaceDataset(cfg.dataset, normalize=None, augment=cfg.augmenter())
        if self.dataset.image_size is not None and tuple(self.dataset.image_size) != cfg.image_hw:
            h, w = self.dataset.image_size
            raise ValueError(f"{cfg.dataset}: images are {h}x{w} (property), but the run's image size is "
                             f"{cfg.image_size} (from the preset or --image-size); pass --image-size {h},{w} "
                             f"(YAML: image-size: {h},{w}; flow: -p image_size={h},{w})")
        self.num_classes = self.dataset.num_classes
        self.val_sets = ValidationSets(resolve_val_targets(cfg.val_targets, cfg.dataset), cfg.image_hw,
                                       cfg.normalize, cfg.eval_batch_size,
                                       fold_seed=cfg.seed if cfg.val_shuffle_folds else None)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.backbone = ckpt_io.build_backbone(cfg.backbone_args()).to(self.device)
        set_bn_momentum(self.backbone, cfg.bn_mom)
        torch.manual_seed(cfg.seed + 7919 * (ctx.rank + 1))  # each rank's classifier shard starts differently
        self.objective: Objective = make_objective(cfg, self.backbone.emb_size, self.num_classes, self.device)
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        groups = [{"params": list(self.backbone.parameters()), "lr": cfg.lr, "weight_decay": cfg.wd, "name": "backbone"}]
        groups += self.objective.param_groups(cfg)
        # Fused SGD where torch has it: one kernel per device and dtype, and its ``found_inf`` skips a step
        # on the device (used by _train_step); foreach otherwise (then a skip decision is read on the host).
        self.fused = _fused_sgd_ok(self.device)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.mom, weight_decay=cfg.wd,
                                         **({"fused": True} if self.fused else {"foreach": True}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.lr_steps))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

        self.step, self.epoch, self.consumed = 0, 0, 0
        self.best: dict[str, Any] | None = None
        self.saves = 0
        self.checkpoints: list[Path] = []
        self.last_val: dict[str, dict[str, Any]] = {}
        self.whitening: Whitening | None = None  # whiten_trunk: fit at each checkpoint point (rank 0)
        rng_states = None
        resume_path = self._resume_path()
        if resume_path is not None:
            rng_states = self._load_resume(resume_path)
        elif cfg.pretrained:
            self._load_pretrained(cfg.pretrained)

        self.model: nn.Module = self.backbone
        if ctx.active:
            self.model = DistributedDataParallel(self.backbone, device_ids=[ctx.local_rank] if self.device.type == "cuda" else None,
                                                 broadcast_buffers=False)
        self._init_momentum()
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.buffers = _BufferGuard(self.backbone, self.objective.module)
        self.compiled = cfg.use_compile(self.device.type)
        if self.compiled:
            self.model = torch.compile(self.model)

        self.sampler = self.objective.make_sampler(self.dataset, cfg.seed, ctx.rank, ctx.world_size)
        workers = cfg.num_workers
        self.loader = DataLoader(
            self.dataset, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(cfg.seed), **self._loader_args())
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.dataset}: {len(self.dataset)} images give no full batch of per_batch_size "
                             f"{cfg.per_batch_size} on {ctx.world_size} rank(s)")
        if resume_path is not None:
            state = self.sampler.state_dict(position=self.consumed // ctx.world_size)
            state["epoch"] = self.epoch
            self.sampler.load_state_dict(state)
        planned = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
        if ctx.is_main:
            for line in schedule_warnings(cfg, self.steps_per_epoch):
                self.log.warning("%s", line)
        self.recorder = RunRecorder(self.output, enabled=ctx.is_main, total_steps=self.total_steps,
                                    world_size=ctx.world_size, resume_step=self.step if resume_path else None)
        self.recorder.status_fields.update(best=self.best, checkpoints=[str(p) for p in self.checkpoints],
                                           augment=self.dataset.augment.describe() if self.dataset.augment else None)
        self.flip_generator = torch.Generator(device=self.device)  # the mirror mask is drawn where it is used
        self._save_thread: threading.Thread | None = None
        self._save_error: BaseException | None = None
        # Restore the random states last: nothing above may draw from them after this point.
        if rng_states:
            ckpt_io.set_rng_state(rng_states[ctx.rank] if ctx.rank < len(rng_states) else rng_states[0])
        else:
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)  # per-rank dropout streams

    def close(self) -> None:
        """Join the loader's worker processes now. Left to the garbage collector, the join runs in a
        destructor, where a second Ctrl-C can only be printed ("Exception ignored"), not end the run."""
        iterator = getattr(self.loader, "_iterator", None)  # persistent workers live in the loader's iterator
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _init_momentum(self) -> None:
        """Zero momentum buffers for parameters without one (a new run, or an old checkpoint). With
        dampening 0 the first update is then ``buf = grad`` exactly as torch's first step, and a step
        skipped by ``found_inf`` before any update leaves no uninitialised buffer behind."""
        for group in self.optimizer.param_groups:
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                state = self.optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _loader_args(self) -> dict[str, Any]:
        """The objective's sampler arguments; with augmentation the items carry the epoch (per-sample seeds)."""
        args = self.objective.loader_args(self.sampler, self.cfg.per_batch_size)
        return tag_epochs(args) if self.dataset.augment is not None else args

    # --- starting points ----------------------------------------------------------------------------------------
    def _resume_path(self) -> Path | None:
        spec = self.cfg.resume
        if spec is None:
            return None
        if spec == "auto":
            path = self.ckpt_dir / LAST
            if not path.exists():
                self.log.info("resume auto: no %s yet, starting a new run", path)
                return None
            return path
        return ckpt_io.resolve_checkpoint(spec)

    def _load_resume(self, path: Path) -> list[dict[str, Any]] | None:
        state = ckpt_io.read_checkpoint(path)
        ckpt_io.load_backbone_weights(self.backbone, state, path, "resume this run")
        meta = state["meta"]
        if meta.get("loss") != self.cfg.loss:
            raise ValueError(f"{path}: cannot resume: the checkpoint was trained with loss {meta.get('loss')!r}, "
                             f"this run uses {self.cfg.loss!r} (start a new run with pretrained: instead)")
        if meta.get("num_classes") != self.num_classes:
            raise ValueError(f"{path}: cannot resume: the checkpoint has {meta.get('num_classes')} classes, "
                             f"{self.cfg.dataset} has {self.num_classes}")
        if not self.objective.load_head_state(state.get("head"), str(path)) and state.get("head") is not None:
            raise ValueError(f"{path}: cannot resume: its classifier does not fit this run")
        saved_world = int(meta.get("world_size", 1))
        self.optimizer.load_state_dict(ckpt_io.shard_optimizer_state(state["optimizer"], self.ctx.rank, self.ctx.world_size))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        progress = state["progress"]
        self.step, self.epoch = int(progress["step"]), int(progress["sampler"]["epoch"])
        self.consumed = int(progress["sampler"]["consumed"])
        self.best, self.saves = progress.get("best"), int(progress.get("saves", 0))
        self.checkpoints = [Path(p) for p in progress.get("checkpoints", [])]
        self.log.info("resumed from %s at step %d (epoch %d), saved by %d rank(s), now %d%s", path, self.step,
                      self.epoch, saved_world, self.ctx.world_size,
                      "; classifier re-sharded" if saved_world != self.ctx.world_size and state.get("head") else "")
        rng = state.get("rng")
        return rng if saved_world == self.ctx.world_size else None

    def _load_pretrained(self, spec: str) -> None:
        imported = ckpt_io.load_published_into(self.backbone, spec, "start from it (pretrained)")
        if imported is not None:  # arcface_torch / MXNet weights: the backbone only, a new classifier
            self.log.info("pretrained: backbone from %s (%s); new classifier", spec, imported["conversion"])
            return
        path = ckpt_io.resolve_checkpoint(spec)
        state = ckpt_io.read_checkpoint(path)
        ckpt_io.load_backbone_weights(self.backbone, state, path, "start from it (pretrained)")
        head = self.objective.load_head_state(state.get("head"), str(path))
        self.log.info("pretrained: backbone from %s (step %s)%s", path, state["meta"].get("step"),
                      "; classifier too" if head else "")

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _state(self, val: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint dict (collective: gathers the classifier, optimizer state and RNG states)."""
        head = self.objective.head_state()
        optimizer = ckpt_io.gather_optimizer_state(self.optimizer, self.objective.sharded)
        rng = ckpt_io.all_rng_states(self.ctx.world_size)
        cfg = self.cfg
        meta = {"network": self.backbone.network, "emb_size": self.backbone.emb_size,
                "image_size": list(self.backbone.image_size), "normalize": cfg.normalize,
                "backbone_args": cfg.backbone_args(), "loss": cfg.loss, "num_classes": self.num_classes,
                "step": self.step, "epoch": self.epoch, "world_size": self.ctx.world_size, "val": val,
                "torch": str(torch.__version__), "created": time.time()}
        progress = {"step": self.step, "sampler": {"epoch": self.epoch, "consumed": self.consumed},
                    "best": self.best, "saves": self.saves, "checkpoints": [str(p) for p in self.checkpoints]}
        extra = {"whitening": self.whitening.state()} if self.whitening is not None else {}
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "meta": meta, **extra,
                "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
                "head": head, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "progress": progress, "rng": rng, "config": cfg.model_dump(mode="json")}

    def _checkpoint_point(self, evaluate: bool = True) -> None:
        """Evaluate (rank 0) and write checkpoints by the ``ckpt`` policy; every rank takes part.

        A failed evaluation is recorded and the checkpoint still written; with ``on_eval_failure:
        stop`` every rank then raises :class:`EvaluationFailed`."""
        val: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        improved = False
        if self.ctx.is_main and self.cfg.whiten_trunk:
            self.whitening = None
            if not evaluate:  # stopping: the checkpoint is written at once, the refit waits for the resumed run
                self.log.warning("step %d: whiten_trunk: stopping, so this checkpoint holds the backbone's embedding "
                                 "only; --resume auto fits the whitening at its next checkpoint", self.step)
            else:
                try:
                    self.whitening = self._fit_whitening()
                except Exception as exc:  # noqa: BLE001 - features that do not vary, an SVD or memory failure: the
                    # checkpoint is still written, without the branch
                    self.log.error("step %d: whiten_trunk failed (%s: %s); this checkpoint holds the backbone's "
                                   "embedding only", self.step, type(exc).__name__, exc)
        if self.ctx.is_main and evaluate and self.val_sets.targets:
            self.recorder.status(state="evaluating", step=self.step)
            started = time.perf_counter()
            results = self.val_sets.evaluate(self.embedder(), self.device, self.amp_dtype)
            for name, res in results.items():
                row = res.to_row()
                val[name] = row
                self.recorder.val_point(self.step, self.epoch, name, row)
                if isinstance(res, TargetError):
                    failures[name] = res.message
                    self.log.error("step %d %s (the checkpoint is kept)", self.step, res.summary(name))
                else:
                    self.log.info("step %d %s", self.step, res.summary(name))
            first = self.val_sets.names[0]
            acc = val[first].get("accuracy")
            if acc is None:  # the first target failed this time: the best checkpoint stays as it was
                self.log.warning("step %d: %s (the first target, which decides the best checkpoint) has no accuracy: %s",
                                 self.step, first, val[first].get("error"))
            elif self.best is None or acc >= self.best["accuracy"]:
                self.best = {"target": first, "accuracy": acc, "step": self.step}
                improved = True
            self.last_val = val
            self.recorder.status(eval_errors=failures)
            if self.best is not None:
                self.log.info("step %d: verification took %.1f s; best %s accuracy %.5f at step %d", self.step,
                              time.perf_counter() - started, self.best["target"], self.best["accuracy"], self.best["step"])
        policy = self.cfg.ckpt_policy
        if policy != "none":
            numbered = None
            if policy == "all":
                self.saves += 1
                numbered = self.ckpt_dir / f"model-{self.saves:04d}.pt"
                self.checkpoints.append(numbered)
            best_link = None
            if self.ctx.is_main and improved and policy in ("best", "all"):
                best_link = self.ckpt_dir / BEST if policy == "best" else numbered
                self.best["checkpoint"] = str(best_link)
            state = self._state(val)  # on the CPU: copies of everything the next steps change (CUDA)
            if self.ctx.is_main:
                self._wait_save()
                job = (state, numbered, best_link if policy == "best" else None, [str(p) for p in self.checkpoints],
                       dict(self.best) if self.best else None)
                if self.device.type in _ASYNC_SAVE_DEVICES:  # the device trains on while the file is written
                    self._save_thread = threading.Thread(target=self._save_job, args=job, name="checkpoint", daemon=True)
                    self._save_thread.start()
                else:  # on the CPU the tensors in ``state`` are the live ones: write before the next step
                    self._save_job(*job)
                    self._wait_save()
        self.recorder.status(best=self.best)
        self.recorder.flush(force=True)
        self.ctx.barrier()
        if self.ctx.any(bool(failures) and self.cfg.on_eval_failure == "stop"):
            where = f"{self.ckpt_dir / LAST} (resume with --resume auto)" if policy != "none" else "no checkpoint (ckpt=0)"
            raise EvaluationFailed(
                f"step {self.step}: evaluation failed and on_eval_failure=stop: "
                + "; ".join(f"{k}: {v}" for k, v in failures.items()) + f"; saved {where}")

    def embedder(self) -> nn.Module:
        """The embedding network as checkpoints rebuild it: the backbone, with its whitened trunk branch
        when ``whiten_trunk`` (:class:`models.whitening.WhitenedTrunkEmbedding`)."""
        if self.whitening is None:
            return self.backbone
        return WhitenedTrunkEmbedding(self.backbone, self.whitening).to(self.device).train(self.backbone.training)

    def _fit_whitening(self) -> Whitening:
        """``whiten_trunk``: the trunk's mirror-symmetric features of the training images (no augmentation;
        at most :data:`WHITEN_MAX_IMAGES`, evenly spaced), PCA-whitened (:mod:`models.whitening`)."""
        started = time.perf_counter()
        data = RecFaceDataset(self.cfg.dataset, normalize=None)
        n = len(data)
        picked = list(range(n)) if n <= WHITEN_MAX_IMAGES else [
            round(i * (n - 1) / (WHITEN_MAX_IMAGES - 1)) for i in range(WHITEN_MAX_IMAGES)]
        loader = DataLoader(Subset(data, picked), batch_size=self.cfg.eval_batch_size, num_workers=0)
        was_training = self.backbone.training
        self.backbone.eval()
        features = []
        try:
            with torch.no_grad():
                for images, _ in loader:
                    x = normalize_batch(images.to(self.device), self.cfg.normalize)
                    features.append(mirror_features(self.backbone.trunk, x).cpu())
        finally:
            self.backbone.train(was_training)
        whitening = fit_whitening(torch.cat(features))
        self.log.info("step %d: trunk features of %d training images whitened: %d components (%.1f s)",
                      self.step, len(picked), whitening.dim, time.perf_counter() - started)
        return whitening

    def _save_job(self, state: dict[str, Any], numbered: Path | None, best_link: Path | None,
                  checkpoints: list[str], best: dict[str, Any] | None) -> None:
        """Write ``last.pt`` (and its numbered or best link); errors are raised by :meth:`_wait_save`."""
        try:
            last = ckpt_io.save_checkpoint(self.ckpt_dir / LAST, state)
            if numbered is not None:
                ckpt_io.copy_checkpoint(last, numbered)
            if best_link is not None:
                ckpt_io.copy_checkpoint(last, best_link)
            self.log.info("step %d: checkpoint %s%s", state["progress"]["step"], numbered or last,
                          " (best)" if best and best.get("step") == state["progress"]["step"] else "")
            self.recorder.status(last_checkpoint=str(last), best=best, checkpoints=checkpoints)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread
            self._save_error = exc

    def _wait_save(self) -> None:
        """Wait for a checkpoint being written; raise its error, if any."""
        thread, self._save_thread = self._save_thread, None
        if thread is not None:
            thread.join()
        error, self._save_error = self._save_error, None
        if error is not None:
            raise error

    # --- the loop ---------------------------------------------------------------------------------------------
    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize_batch(images.to(self.device, non_blocking=True), self.cfg.normalize)
        if self.cfg.flip:
            gen = step_generator(self.flip_generator, self.cfg.seed, self.step, self.ctx.rank, stream=1)
            mirror = torch.rand(x.shape[0], generator=gen, device=self.device) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimiser step; returns 0-d device tensors ``(ok, loss, grad_norm)`` and reads none of them.

        ``ok``: loss and (pre-clip) gradient norm finite on every rank; otherwise the optimiser leaves
        weights and momentum as they were (fused SGD ``found_inf``), buffers are restored
        (:class:`_BufferGuard`), the scheduler still advances.
        """
        cfg = self.cfg
        x = self._batch(images)
        y = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            embeddings = self.model(x)
        loss = self.objective.loss(embeddings, y, self.step)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.params if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        loss = loss.detach()
        ok = torch.isfinite(loss) & torch.isfinite(norm)
        if self.ctx.active:
            check = ok.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.MIN)
            ok = check[0].bool()
        if self.fused:
            self.optimizer.found_inf = (~ok).to(torch.float32)
            self.optimizer.step()
        elif bool(ok):  # pragma: no cover - only where torch has no fused SGD for the device (a host read)
            self.optimizer.step()
        self.objective.after_step(ok)
        self.buffers.commit(ok)  # a skipped step leaves batch-norm statistics as they were, too
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return ok, loss, norm.detach()

    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        started = time.perf_counter()
        self.recorder.status(state="running", step=self.step, epoch=self.epoch)
        if ctx.is_main:
            self.log.info("training %s (%s, emb %d, %s) on %s x%d: %d images, %d classes, %d steps/epoch, "
                          "batch %d/rank, amp %s, val %s", cfg.network, cfg.loss, self.backbone.emb_size,
                          "x".join(map(str, cfg.image_hw)), self.device.type, ctx.world_size, len(self.dataset),
                          self.num_classes, self.steps_per_epoch, cfg.per_batch_size, self.amp,
                          ",".join(self.val_sets.names) or "none")
        window = self._new_window()
        rates: list[float] = []
        waits: list[float] = []
        self._consecutive_bad = 0
        self._last_loss: float | None = None
        self._loss_floor: float | None = None
        self._exploding = False
        state = "finished"
        saved_at = self.step
        try:
            while self.epoch < cfg.epochs and not (cfg.max_steps and self.step >= cfg.max_steps):
                self.sampler.set_epoch(self.epoch)
                steps_in_epoch = self.consumed // (self.objective.units_per_step * ctx.world_size)
                iterator = iter(self.loader)
                self.backbone.train()
                while not (cfg.max_steps and self.step >= cfg.max_steps):
                    t0 = time.perf_counter()
                    try:
                        images, labels = next(iterator)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    window["steps"].append(self._train_step(images, labels))  # device tensors, not read here
                    self.step += 1
                    steps_in_epoch += 1
                    self.consumed = steps_in_epoch * self.objective.units_per_step * ctx.world_size
                    t2 = time.perf_counter()
                    window["wait"] += t1 - t0
                    window["time"] += t2 - t0
                    if self.step % cfg.frequent == 0 or self.step == self.total_steps:
                        self._log_window(window, rates, waits)  # the one host read of the window
                        window = self._new_window()
                        if ctx.any(self.stop.is_set()):
                            state = "stopped"
                            break
                    elif not ctx.active and self.stop.is_set():  # one process: stop at the next step
                        state = "stopped"
                        break
                    if self.step % cfg.verbose == 0:
                        if window["steps"]:
                            self._log_window(window, rates, waits)
                            window = self._new_window()
                        self._check_weights()
                        self._checkpoint_point()
                        saved_at = self.step
                if state == "stopped":
                    break
                if not (cfg.max_steps and self.step >= cfg.max_steps):
                    self.epoch += 1
                    self.consumed = 0
            if window["steps"]:
                self._log_window(window, rates, waits)
            if self.step != saved_at:
                self._check_weights()
                if state == "stopped":
                    self.log.warning("stop requested: saving step %d and leaving", self.step)
                self._checkpoint_point(evaluate=state != "stopped")
            self._wait_save()
        except BaseException as exc:
            try:
                self._wait_save()  # a checkpoint being written is finished (or its error reported) first
            except BaseException as save_exc:  # noqa: BLE001
                self.log.error("writing a checkpoint failed too: %s", save_exc)
            try:
                self.recorder.status(state="failed", step=self.step, message=f"{type(exc).__name__}: {exc}")
                self.recorder.close()
            except Exception as record_exc:  # noqa: BLE001  the run's own error is the one to report
                self.log.error("writing the run record failed too: %s", record_exc)
            raise
        wall = time.perf_counter() - started
        self.recorder.status(state=state, step=self.step, epoch=self.epoch, wall_s=wall)
        self.recorder.close()
        last = self.ckpt_dir / LAST if cfg.ckpt_policy != "none" and (self.ckpt_dir / LAST).exists() else None
        best = Path(self.best["checkpoint"]) if self.best and self.best.get("checkpoint") else None
        if ctx.is_main:
            self.log.info("%s at step %d (epoch %d) in %.1f s; last loss %s", state, self.step, self.epoch, wall,
                          "n/a" if self._last_loss is None else f"{self._last_loss:.4f}")
        return TrainResult(output=self.output, step=self.step, epoch=self.epoch, state=state, final_loss=self._last_loss,
                           last_checkpoint=last, best_checkpoint=best, best=self.best, checkpoints=list(self.checkpoints),
                           val=self.last_val, samples_per_s=_median(rates[1:] or rates), data_wait=_median(waits[1:] or waits),
                           wall_s=wall)

    @staticmethod
    def _new_window() -> dict[str, Any]:
        return {"steps": [], "wait": 0.0, "time": 0.0}

    def _read_window(self, steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, int, float]:
        """Read a window's per-step ``(ok, loss, grad_norm)`` with one transfer; log skipped steps and stop
        after ``nan_max_consecutive`` in a row. Returns (mean loss of the good steps, bad steps, mean norm)."""
        cfg = self.cfg
        table = torch.stack([torch.stack([ok.float(), loss.float(), norm.float()]) for ok, loss, norm in steps])
        rows = table.cpu().tolist()
        first = self.step - len(rows) + 1
        good_losses, norms, bad = [], [], 0
        for i, (ok, loss, norm) in enumerate(rows):
            if ok:
                self._consecutive_bad = 0
                good_losses.append(loss)
                norms.append(norm)
                self._last_loss = loss
                continue
            bad += 1
            self._consecutive_bad += 1
            self.log.warning("step %d: non-finite loss or gradient (loss %s, gradient norm %s); optimiser step "
                             "skipped (%d in a row)", first + i, loss, norm, self._consecutive_bad)
            if self._consecutive_bad >= cfg.nan_max_consecutive:
                raise FloatingPointError(
                    f"training stopped at step {self.step}: {self._consecutive_bad} consecutive steps had a "
                    f"non-finite loss or gradient (nan_max_consecutive={cfg.nan_max_consecutive}), the last at step "
                    f"{first + i}; "
                    f"{divergence_hint(cfg)}")
        mean = sum(good_losses) / len(good_losses) if good_losses else float("nan")
        return mean, bad, (sum(norms) / len(norms) if norms else float("nan"))

    def _watch_loss(self, loss: float) -> None:
        """Warn (once per excursion) when a window's mean loss is more than twice the lowest so far."""
        if not math.isfinite(loss):
            return
        floor = self._loss_floor
        if floor is not None and loss > 2.0 * floor and loss - floor > 1.0:
            if not self._exploding:
                self.log.warning("step %d: the loss is exploding (%.4f, the lowest so far was %.4f); the run may be "
                                 "diverging: %s", self.step, loss, floor, divergence_hint(self.cfg))
            self._exploding = True
        else:
            self._exploding = False
        self._loss_floor = loss if floor is None else min(floor, loss)

    @torch.no_grad()
    def _check_weights(self) -> None:
        """Stop with FloatingPointError if a weight or batch-norm statistic is no longer finite (a host read;
        before evaluations and checkpoints only), so that a diverged model is neither evaluated nor saved."""
        tensors = [t for t in (*self.params, *self.backbone.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        finite = torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"))).float())  # max |x|
        all_finite = finite.all().to(torch.int32).reshape(1)
        if self.ctx.active:  # every rank stops together
            torch.distributed.all_reduce(all_finite, op=torch.distributed.ReduceOp.MIN)
        if bool(all_finite[0]):
            return
        if bool(finite.all()):
            raise FloatingPointError(f"training stopped at step {self.step}: another rank's weights are no longer "
                                     f"finite (the model diverged); {divergence_hint(self.cfg)}")
        names = {id(t): n for n, t in [*self.backbone.named_parameters(), *self.backbone.named_buffers()]}
        names.update({id(t): f"classifier.{n}" for n, t in (self.objective.module.named_parameters()
                                                           if self.objective.module is not None else [])})
        first = tensors[int((~finite).nonzero()[0])]
        raise FloatingPointError(
            f"training stopped at step {self.step}: {names.get(id(first), 'a parameter')} is no longer finite "
            f"(the model diverged; the last checkpoint is kept); {divergence_hint(self.cfg)}")

    def _log_window(self, window: dict[str, Any], rates: list[float], waits: list[float]) -> tuple[float, float]:
        steps = max(1, len(window["steps"]))
        loss, bad, grad_norm = self._read_window(window["steps"])
        rate = steps * self.cfg.per_batch_size * self.ctx.world_size / max(window["time"], 1e-9)
        wait = window["wait"] / max(window["time"], 1e-9)
        rates.append(rate)
        waits.append(wait)
        self._watch_loss(loss)
        lr = self.optimizer.param_groups[0]["lr"]
        memory = _memory_gib(self.device)
        values = {"loss": loss, "lr": lr, "samples_per_s": rate, "data_wait": wait, "memory_gib": memory,
                  "non_finite": float(bad), "grad_norm": grad_norm, **self.objective.step_metrics()}
        self.recorder.train_point(self.step, self.epoch, values)
        remaining = max(0, self.total_steps - self.step) * window["time"] / steps
        self.recorder.status(state="running", step=self.step, epoch=self.epoch, loss=loss, lr=lr,
                             samples_per_s=rate, data_wait=wait, eta_s=remaining)
        if self.ctx.is_main:
            extra = "".join(f" {k} {v:g}" for k, v in self.objective.step_metrics().items())
            self.log.info("step %d/%d epoch %d loss %.4f lr %.6f samples/s %.1f data-wait %.1f%% mem %.2fGiB%s, %s left",
                          self.step, self.total_steps, self.epoch, loss, lr, rate, 100 * wait, memory, extra,
                          format_duration(remaining))
        return rate, wait


class EvaluationFailed(RuntimeError):
    """Raised after the checkpoint when a val target's evaluation failed and ``on_eval_failure`` is ``stop``."""


def _output(cfg: TrainConfig) -> Path:
    if not cfg.output:
        raise ValueError("option 'output' is empty: give the run folder for checkpoints and metrics")
    return Path(cfg.output).resolve()


#: Files whose presence means the output folder holds a run (finished, stopped or killed).
_RUN_FILES = (f"{CHECKPOINT_DIR}/{LAST}", f"{CHECKPOINT_DIR}/{BEST}", METRICS_FILE, STATUS_FILE)


def _claim_output(cfg: TrainConfig) -> None:
    """Before a run writes into ``cfg.output`` (rank 0, holding the folder's lock): refuse to
    overwrite an earlier run unless it is resumed, and sweep the temporary files a killed
    checkpoint or metrics write left (``.last.pt.<pid>-<id>.partial``)."""
    output = _output(cfg)
    if cfg.resume is None:
        found = [name for name in _RUN_FILES if (output / name).exists()]
        found += sorted(p.relative_to(output).as_posix() for p in (output / CHECKPOINT_DIR).glob("model-*.pt"))
        if found:
            raise ValueError(
                f"{output} already holds a run ({', '.join(found[:4])}); refusing to overwrite it: continue it with "
                "--resume auto (resume: auto), or give another --output")
    # the checkpoint folder is the trainer's alone; in the run folder only its own files' temporaries
    # (a launcher may be writing config.yaml or the pid file there)
    ours = tuple(f".{name}." for name in (METRICS_FILE, STATUS_FILE))
    stale = remove_partials(output / CHECKPOINT_DIR)
    for path in output.glob(f".*{PARTIAL_SUFFIX}"):
        if path.name.startswith(ours):
            path.unlink(missing_ok=True)
            stale.append(path)
    for path in stale:
        logger().info("removed %s, left by an interrupted write", path)


def train(cfg: TrainConfig, stop: threading.Event | None = None) -> TrainResult:
    """Run (or resume) training for ``cfg`` in this process: the whole run, or this rank's part under torchrun.

    ``stop``: set it (e.g. from a signal handler) to end at the next log point with a checkpoint.
    Raises ``ValueError`` / ``FileNotFoundError`` / ``FormatError`` naming the option or file for bad input
    (``ValueError`` too when ``output`` holds a run and ``resume`` is not set: nothing is overwritten),
    ``FloatingPointError`` after ``nan_max_consecutive`` non-finite steps, and
    :class:`datasets.locks.FolderBusy` when another run writes ``output`` (rank 0 holds its lock).
    """
    device = cfg.resolve_device()
    if cfg.deterministic and device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with distributed(device) as ctx:
            with folder_lock(_output(cfg), "training") if ctx.is_main else contextlib.nullcontext():
                if ctx.is_main:
                    _claim_output(cfg)
                trainer = _Trainer(cfg, ctx, stop)
                try:
                    return trainer.run()
                finally:
                    trainer.close()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # leave the caller's process as it was


def schedule_warnings(cfg: TrainConfig, steps_per_epoch: int) -> list[str]:
    """What of the schedule a run cannot reach: ``epochs`` x ``steps_per_epoch`` optimiser steps end
    the run before ``max_steps`` or an ``lr_steps`` entry (a preset sized for another data set)."""
    planned = cfg.epochs * steps_per_epoch
    end = min(planned, cfg.max_steps) if cfg.max_steps else planned
    need = max([cfg.max_steps, *cfg.lr_steps])
    if planned >= need:
        return []
    epochs = -(-need // steps_per_epoch)
    missed = [str(s) for s in cfg.lr_steps if s > end]
    what = [f"max-steps {cfg.max_steps}"] if cfg.max_steps > planned else []
    what += [f"lr-steps {','.join(missed)} (the learning rate never drops there)"] if missed else []
    return [f"schedule: --epochs {cfg.epochs} x {steps_per_epoch} steps per epoch ends the run at step {end}, before "
            f"{' and '.join(what)}; pass --epochs {epochs} to reach step {need}"]


def _install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM or SIGINT: stop at the next step (one process; the next log point on several ranks, which
    must agree) with a checkpoint; a second SIGINT (Ctrl-C): exit now, without a traceback.

    Repeated SIGTERMs stay graceful: a parent-death signal arrives once per exiting thread of a
    multi-threaded parent, and the launcher escalates to SIGKILL after its grace period anyway.
    """

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked DataLoader worker: the main process decides and stops it
            return
        if stop.is_set() and signum == signal.SIGINT:
            if _in_destructor(frame):  # raised there, it would only be printed ("Exception ignored"): ask again
                threading.Timer(0.05, os.kill, (owner, signal.SIGINT)).start()
                return
            raise KeyboardInterrupt(f"signal {signum}")
        if not stop.is_set():
            try:
                print(f"{signal.Signals(signum).name}: stopping at the next step with a checkpoint "
                      f"(Ctrl-C again: stop now without one)", file=sys.stderr, flush=True)
            except OSError:  # stderr is a pipe to a parent that is gone (the parent-death signal)
                pass
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _in_destructor(frame) -> bool:
    """Whether ``frame`` (where a signal handler interrupted the main thread) runs inside a ``__del__``."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _die_with_launcher() -> None:
    """Under torchrun (which starts every rank in a new session): SIGTERM this rank when torchrun dies."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_command(args) -> int:
    """``facepipe train`` / ``python -m tasks.training`` with parsed arguments: one run, stopped cleanly by
    SIGTERM or Ctrl-C (:func:`_install_stop_handlers`). Bad input: one ``error:`` line, exit status 2;
    a second Ctrl-C: one line, exit status 130."""
    from tasks.training.config import config_from_args

    rank = int(os.environ.get("RANK", "0"))
    _die_with_launcher()
    from tasks.cli import setup_logging

    setup_logging(logging.INFO if rank == 0 else logging.WARNING, f"%(asctime)s %(levelname)s rank{rank}: %(message)s",
                  stream="stdout")
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        cfg = config_from_args(args)
        result = train(cfg, stop)
    except (ValueError, FileNotFoundError, FormatError, FolderBusy) as exc:  # bad input, busy folder: one line
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (FloatingPointError, EvaluationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # another Ctrl-C during exit: no traceback from exit hooks
        print("interrupted: stopped now; the last checkpoint written is kept (--resume auto continues from it)",
              file=sys.stderr, flush=True)
        return 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the run is over: a Ctrl-C during exit must not interrupt exit hooks
    if rank == 0:
        print("result: " + json.dumps(result.to_dict(), default=str), flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m tasks.training") -> int:
    from tasks import cli

    return run_command(cli.build_parser("train", prog).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
