"""Verification during training: the ``val_targets`` of a run (InsightFace ``--target lfw,cfp_fp,agedb_30``).

Each target is a verification ``.bin`` (``datasets.verification_bin``), decoded once at the run's
image size (112x112 or 112x96) and kept in memory as ``(2P, H, W, 3)`` uint8; every evaluation extracts
flip-fused embeddings (``tasks.evaluation.embed``) and applies the InsightFace 10-fold protocol
(``tasks.evaluation.pairs``; a set with fewer pairs than folds gets one fold per pair and a note).

A target that cannot be evaluated (a malformed pack, images of another size, non-finite embeddings)
gives a :class:`TargetError` in its place; the other targets are evaluated as usual, and training
goes on. Non-finite embeddings are diagnosed in the message: with non-finite weights the run diverged
(too high an ``lr``, a margin the loss cannot meet, no ``grad_clip``); with finite weights the
activations overflowed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from datasets.verification_bin import decode_bin
from tasks.evaluation.embed import extract_embeddings
from tasks.evaluation.pairs import VerificationResult, evaluate_verification

__all__ = ["resolve_val_targets", "ValidationSets", "TargetError", "diagnose"]


def resolve_val_targets(targets: Sequence[str] | None, dataset: str | os.PathLike) -> list[tuple[str, Path]]:
    """``[(name, path)]`` for ``targets``: a name means ``<dataset>/<name>.bin``, anything else a path.

    ``None``: every ``.bin`` in the dataset folder, sorted by name. A missing target raises
    ``FileNotFoundError`` naming it and listing the ``.bin`` files that do exist.
    """
    folder = Path(dataset)
    available = sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if targets is None:
        return [(p.stem, p) for p in available]
    out = []
    for target in targets:
        path = Path(target)
        if path.suffix.lower() != ".bin" or not path.exists():
            candidate = folder / f"{target}.bin"
            if candidate.exists():
                path = candidate
        if not path.is_file():
            have = ", ".join(p.stem for p in available) or "none"
            raise FileNotFoundError(f"val target {target!r}: neither {folder / f'{target}.bin'} nor {path} exists "
                                    f"(.bin files in {folder}: {have})")
        out.append((path.stem, path))
    return out


@dataclass(frozen=True)
class TargetError:
    """A target that could not be evaluated: its pack and the one-line reason."""

    target: str
    path: Path
    message: str

    def to_row(self) -> dict[str, Any]:
        """The target's metrics row: no metrics, ``error`` set."""
        return {"error": self.message}

    def summary(self, name: str = "") -> str:
        return f"[{name or self.target}]error: {self.message}"


def _non_finite_tensors(model: nn.Module) -> tuple[list[str], int]:
    """Names of the floating-point parameters and buffers of ``model`` holding NaN or inf, and how many were checked."""
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()]
    with torch.no_grad():
        bad = [n for n, t in tensors if not bool(torch.isfinite(t).all())]
    return bad, len(tensors)


def diagnose(model: nn.Module, exc: BaseException) -> str:
    """Why ``model`` failed an evaluation, when its weights tell (``""`` otherwise): diverged weights
    (non-finite) or overflowing activations (finite weights, non-finite embeddings)."""
    bad, checked = _non_finite_tensors(model)
    if bad:
        return (f"; the weights diverged ({len(bad)} of {checked} tensors hold NaN/inf, first {', '.join(bad[:3])}): "
                f"lower lr or add warmup, check margin_m/margin_s for this loss, or set grad_clip (arcface_torch "
                f"clips the gradient norm at 5)")
    if "non-finite" in str(exc):
        return ("; the weights are finite, so the activations overflowed: the weights grew too large (lower lr or "
                "set grad_clip) or the evaluation precision is too low (bf16, not fp16)")
    return ""


class ValidationSets:
    """Decoded verification sets; :meth:`evaluate` runs a model over all of them."""

    def __init__(self, targets: Sequence[tuple[str, Path]], image_size: tuple[int, int], normalize: str,
                 batch_size: int = 256, fold_seed: int | None = None):
        self.fold_seed = fold_seed
        self.targets = list(targets)
        self.image_size = tuple(image_size)
        self.normalize = normalize
        self.batch_size = batch_size
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.targets]

    def data(self, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """``(images (2P, H, W, 3) uint8 RGB, issame (P,) bool)``, decoded on first use."""
        if name not in self._data:
            self._data[name] = decode_bin(path, self.image_size)
        return self._data[name]

    def evaluate(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None = None
                 ) -> dict[str, VerificationResult | TargetError]:
        """Verification result per target, in target order, or a :class:`TargetError` for a target that
        failed (the model is left in its former mode)."""
        results: dict[str, VerificationResult | TargetError] = {}
        for name, path in self.targets:
            try:
                images, issame = self.data(name, path)
                emb = extract_embeddings(model, images, batch_size=self.batch_size, flip=True, device=device,
                                         normalize=self.normalize, amp_dtype=amp_dtype)
                results[name] = evaluate_verification(emb.fused, issame, raw_norms=emb.raw_norms,
                                                      fold_seed=self.fold_seed)
            except Exception as exc:  # noqa: BLE001 - one target's failure must not lose the others (or the run)
                text = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
                if str(path) not in text:
                    text = f"{path}: {text}"
                text += diagnose(model, exc)
                results[name] = TargetError(name, Path(path), text.replace("\n", " "))
        return results
