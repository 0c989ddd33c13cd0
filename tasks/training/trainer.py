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

Guard: a step whose loss or gradient norm is not finite is skipped (no optimiser update) and logged;
after ``nan_max_consecutive`` such steps in a row the run stops with an error.

Every ``verbose`` steps and at the end, rank 0 evaluates the ``val_targets`` (the others wait) and
checkpoints are written by the ``ckpt`` policy (:mod:`tasks.checkpoint`): 0 none; 1 ``best.pt``
(first val target's accuracy) and ``last.pt``; 2 ``model-NNNN.pt`` every time and ``last.pt``;
3 ``last.pt``. ``last.pt`` is the resume point. Every ``frequent`` steps rank 0 logs loss, lr,
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
from torch.utils.data import DataLoader

from datasets.augment import tag_epochs
from datasets.errors import FormatError
from datasets.rec_dataset import RecFaceDataset, normalize_batch
from tasks import checkpoint as ckpt_io
from tasks.training.distributed import DistContext, distributed
from tasks.training.objectives import Objective, make_objective, step_generator
from tasks.runtime import logger
from tasks.training.config import TrainConfig, parse_args
from tasks.training.validation import ValidationSets, resolve_val_targets
from tasks.training.record import RunRecorder

__all__ = ["TrainResult", "train", "main", "CHECKPOINT_DIR", "LAST", "BEST"]

CHECKPOINT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


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


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    return values[len(values) // 2] if values else None


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
            raise ValueError(f"{cfg.dataset}: images are {h}x{w} (property), but option 'image_size' is "
                             f"{cfg.image_size}; set image_size: {h},{w}")
        self.num_classes = self.dataset.num_classes
        self.val_sets = ValidationSets(resolve_val_targets(cfg.val_targets, cfg.dataset), cfg.image_hw,
                                       cfg.normalize, cfg.eval_batch_size)

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.backbone = ckpt_io.build_backbone(cfg.backbone_args()).to(self.device)
        torch.manual_seed(cfg.seed + 7919 * (ctx.rank + 1))  # each rank's classifier shard starts differently
        self.objective: Objective = make_objective(cfg, self.backbone.emb_size, self.num_classes, self.device)
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        groups = [{"params": list(self.backbone.parameters()), "lr": cfg.lr, "weight_decay": cfg.wd, "name": "backbone"}]
        groups += self.objective.param_groups(cfg)
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.mom, weight_decay=cfg.wd)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup, cfg.lr_steps))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

        self.step, self.epoch, self.consumed = 0, 0, 0
        self.best: dict[str, Any] | None = None
        self.saves = 0
        self.checkpoints: list[Path] = []
        self.last_val: dict[str, dict[str, Any]] = {}
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
        if cfg.compile:
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
        self.recorder = RunRecorder(self.output, enabled=ctx.is_main, total_steps=self.total_steps,
                                    world_size=ctx.world_size, resume_step=self.step if resume_path else None)
        self.recorder.status_fields.update(best=self.best, checkpoints=[str(p) for p in self.checkpoints],
                                           augment=self.dataset.augment.describe() if self.dataset.augment else None)
        self.flip_generator = torch.Generator()
        # Restore the random states last: nothing above may draw from them after this point.
        if rng_states:
            ckpt_io.set_rng_state(rng_states[ctx.rank] if ctx.rank < len(rng_states) else rng_states[0])
        else:
            torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)  # per-rank dropout streams

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
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "meta": meta,
                "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
                "head": head, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "progress": progress, "rng": rng, "config": cfg.model_dump(mode="json")}

    def _checkpoint_point(self, evaluate: bool = True) -> None:
        """Evaluate (rank 0) and write checkpoints by the ``ckpt`` policy; every rank takes part."""
        val: dict[str, dict[str, Any]] = {}
        improved = False
        if self.ctx.is_main and evaluate and self.val_sets.targets:
            self.recorder.status(state="evaluating", step=self.step)
            started = time.perf_counter()
            results = self.val_sets.evaluate(self.backbone, self.device, self.amp_dtype)
            for name, res in results.items():
                row = res.to_row()
                val[name] = row
                self.recorder.val_point(self.step, self.epoch, name, row)
                self.log.info("step %d %s", self.step, res.summary(name))
            first = self.val_sets.names[0]
            acc = val[first]["accuracy"]
            if self.best is None or acc >= self.best["accuracy"]:
                self.best = {"target": first, "accuracy": acc, "step": self.step}
                improved = True
            self.last_val = val
            self.log.info("step %d: verification took %.1f s; best %s accuracy %.5f at step %d", self.step,
                          time.perf_counter() - started, self.best["target"], self.best["accuracy"], self.best["step"])
        policy = self.cfg.ckpt_policy
        if policy != "none":
            numbered = None
            if policy == "all":
                self.saves += 1
                numbered = self.ckpt_dir / f"model-{self.saves:04d}.pt"
                self.checkpoints.append(numbered)
            state = self._state(val)
            if self.ctx.is_main:
                last = ckpt_io.save_checkpoint(self.ckpt_dir / LAST, state)
                if numbered is not None:
                    ckpt_io.link_checkpoint(last, numbered)
                if improved and policy in ("best", "all"):
                    target = self.ckpt_dir / BEST if policy == "best" else numbered
                    if policy == "best":
                        ckpt_io.link_checkpoint(last, target)
                    self.best["checkpoint"] = str(target)
                self.log.info("step %d: checkpoint %s%s", self.step, numbered or last,
                              " (best)" if improved and policy in ("best", "all") else "")
                self.recorder.status(last_checkpoint=str(last), best=self.best,
                                     checkpoints=[str(p) for p in self.checkpoints])
        self.recorder.status(best=self.best)
        self.recorder.flush(force=True)
        self.ctx.barrier()

    # --- the loop ---------------------------------------------------------------------------------------------
    def _batch(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize_batch(images.to(self.device, non_blocking=True), self.cfg.normalize)
        if self.cfg.flip:
            gen = step_generator(self.flip_generator, self.cfg.seed, self.step, self.ctx.rank, stream=1)
            mirror = (torch.rand(x.shape[0], generator=gen) < 0.5).to(self.device, non_blocking=True)
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[bool, float]:
        cfg = self.cfg
        x = self._batch(images)
        y = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            embeddings = self.model(x)
        loss = self.objective.loss(embeddings, y, self.step)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        check = (torch.isfinite(loss.detach()) & torch.isfinite(norm)).to(torch.int32).reshape(1)
        if self.ctx.active:
            torch.distributed.all_reduce(check, op=torch.distributed.ReduceOp.MIN)
        ok = bool(check.item())
        value = float(loss.detach())
        if ok:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.objective.after_step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return ok, value

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
        window = {"steps": 0, "wait": 0.0, "time": 0.0, "loss": 0.0, "bad": 0}
        rates: list[float] = []
        waits: list[float] = []
        consecutive_bad = 0
        last_loss: float | None = None
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
                    ok, value = self._train_step(images, labels)
                    self.step += 1
                    steps_in_epoch += 1
                    self.consumed = steps_in_epoch * self.objective.units_per_step * ctx.world_size
                    t2 = time.perf_counter()
                    window["steps"] += 1
                    window["wait"] += t1 - t0
                    window["time"] += t2 - t0
                    if ok:
                        consecutive_bad = 0
                        window["loss"] += value
                        last_loss = value
                    else:
                        consecutive_bad += 1
                        window["bad"] += 1
                        self.log.warning("step %d: non-finite loss or gradient (loss %s); optimiser step skipped "
                                         "(%d in a row)", self.step, value, consecutive_bad)
                        if consecutive_bad >= cfg.nan_max_consecutive:
                            raise FloatingPointError(
                                f"training stopped at step {self.step}: {consecutive_bad} consecutive steps had a "
                                f"non-finite loss or gradient (nan_max_consecutive={cfg.nan_max_consecutive}); "
                                f"lower lr, add warmup or grad_clip, or check the data")
                    if self.step % cfg.frequent == 0 or self.step == self.total_steps:
                        rate, wait = self._log_window(window, rates, waits)
                        window = {"steps": 0, "wait": 0.0, "time": 0.0, "loss": 0.0, "bad": 0}
                        if ctx.any(self.stop.is_set()):
                            state = "stopped"
                            break
                    if self.step % cfg.verbose == 0:
                        self._checkpoint_point()
                        saved_at = self.step
                if state == "stopped":
                    break
                if not (cfg.max_steps and self.step >= cfg.max_steps):
                    self.epoch += 1
                    self.consumed = 0
            if self.step != saved_at:
                if state == "stopped":
                    self.log.warning("stop requested: saving step %d and leaving", self.step)
                self._checkpoint_point(evaluate=state != "stopped")
        except BaseException as exc:
            self.recorder.status(state="failed", step=self.step, message=f"{type(exc).__name__}: {exc}")
            self.recorder.close()
            raise
        wall = time.perf_counter() - started
        self.recorder.status(state=state, step=self.step, epoch=self.epoch, wall_s=wall)
        self.recorder.close()
        last = self.ckpt_dir / LAST if cfg.ckpt_policy != "none" and (self.ckpt_dir / LAST).exists() else None
        best = Path(self.best["checkpoint"]) if self.best and self.best.get("checkpoint") else None
        if ctx.is_main:
            self.log.info("%s at step %d (epoch %d) in %.1f s; last loss %s", state, self.step, self.epoch, wall,
                          "n/a" if last_loss is None else f"{last_loss:.4f}")
        return TrainResult(output=self.output, step=self.step, epoch=self.epoch, state=state, final_loss=last_loss,
                           last_checkpoint=last, best_checkpoint=best, best=self.best, checkpoints=list(self.checkpoints),
                           val=self.last_val, samples_per_s=_median(rates[1:] or rates), data_wait=_median(waits[1:] or waits),
                           wall_s=wall)

    def _log_window(self, window: dict[str, float], rates: list[float], waits: list[float]) -> tuple[float, float]:
        steps = max(1, window["steps"])
        good = steps - window["bad"]
        rate = steps * self.cfg.per_batch_size * self.ctx.world_size / max(window["time"], 1e-9)
        wait = window["wait"] / max(window["time"], 1e-9)
        rates.append(rate)
        waits.append(wait)
        loss = window["loss"] / good if good else float("nan")
        lr = self.optimizer.param_groups[0]["lr"]
        memory = _memory_gib(self.device)
        values = {"loss": loss, "lr": lr, "samples_per_s": rate, "data_wait": wait, "memory_gib": memory,
                  "non_finite": float(window["bad"]), **self.objective.step_metrics()}
        self.recorder.train_point(self.step, self.epoch, values)
        remaining = max(0, self.total_steps - self.step) * window["time"] / steps
        self.recorder.status(state="running", step=self.step, epoch=self.epoch, loss=loss, lr=lr,
                             samples_per_s=rate, data_wait=wait, eta_s=remaining)
        if self.ctx.is_main:
            extra = "".join(f" {k} {v:g}" for k, v in self.objective.step_metrics().items())
            self.log.info("step %d/%d epoch %d loss %.4f lr %.6f samples/s %.1f data-wait %.1f%% mem %.2fGiB%s",
                          self.step, self.total_steps, self.epoch, loss, lr, rate, 100 * wait, memory, extra)
        return rate, wait


def train(cfg: TrainConfig, stop: threading.Event | None = None) -> TrainResult:
    """Run (or resume) training for ``cfg`` in this process: the whole run, or this rank's part under torchrun.

    ``stop``: set it (e.g. from a signal handler) to end at the next log point with a checkpoint.
    Raises ``ValueError`` / ``FileNotFoundError`` / ``FormatError`` naming the option or file for bad input,
    ``FloatingPointError`` after ``nan_max_consecutive`` non-finite steps.
    """
    device = cfg.resolve_device()
    if cfg.deterministic and device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with distributed(device) as ctx:
            return _Trainer(cfg, ctx, stop).run()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # leave the caller's process as it was


def _install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM or SIGINT: stop at the next log point with a checkpoint; a second SIGINT (Ctrl-C): exit now.

    Repeated SIGTERMs stay graceful: a parent-death signal arrives once per exiting thread of a
    multi-threaded parent, and the launcher escalates to SIGKILL after its grace period anyway.
    """

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"signal {signum}")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _die_with_launcher() -> None:
    """Under torchrun (which starts every rank in a new session): SIGTERM this rank when torchrun dies."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    _die_with_launcher()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s %(levelname)s rank{rank}: %(message)s", force=True)
    stop = threading.Event()
    _install_stop_handlers(stop)
    try:
        cfg = parse_args(argv)
        result = train(cfg, stop)
    except (ValueError, FileNotFoundError, FormatError) as exc:  # bad input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    if rank == 0:
        print("result: " + json.dumps(result.to_dict(), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
