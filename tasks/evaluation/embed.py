"""Embedding extraction with the flip test (formats-spec 4.5), for torch models and ONNX exports.

``extract_embeddings(model, images)`` runs aligned faces, ``(N, H, W, 3)`` uint8 RGB, through any
callable that maps a normalised ``(B, 3, H, W)`` float32 batch to ``(B, D)`` raw embeddings, runs the
mirrored images too, sums the two raw embeddings and L2-normalises the sum (InsightFace order).
Input normalisation: :mod:`datasets.normalization` (``"arcface"`` or ``"mxnet"``).

On CUDA: uint8 batches go host -> device from pinned memory without blocking, are normalised on the
device in channels_last layout, and results come back without a per-batch synchronisation, so the
CPU prepares the next batch while the GPU computes. Iterables of batches are read one batch ahead in
a background thread (decoding overlaps inference on CPU too).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from datasets.atomic import atomic_paths
from datasets.errors import FormatError
from datasets.normalization import NORMALIZATIONS, Normalization, normalization_scale


@dataclasses.dataclass(frozen=True)
class EmbeddingResult:
    """``fused``: ``(N, D)`` float32, L2-normalised (flip-fused when ``flip``); ``raw_norms``: ``(N, 2)``
    float32 L2 norms of the raw embeddings of each image and its mirror (``(N, 1)`` without flip);
    ``raw_norm_mean``: their mean, InsightFace's XNorm."""

    fused: np.ndarray
    raw_norms: np.ndarray

    @property
    def raw_norm_mean(self) -> float:
        return float(self.raw_norms.astype(np.float64).mean()) if self.raw_norms.size else float("nan")


def _resolve_device(model: Any, device: str | torch.device) -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    preferred = getattr(model, "device", None)  # e.g. OnnxEmbedder: inputs on the host
    if preferred is not None and not isinstance(model, nn.Module):
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_batch(batch: Any, index: int) -> np.ndarray | torch.Tensor:
    if not isinstance(batch, (np.ndarray, torch.Tensor)):
        batch = np.asarray(batch)
    dtype_ok = batch.dtype == (torch.uint8 if isinstance(batch, torch.Tensor) else np.uint8)
    if batch.ndim != 4 or batch.shape[-1] != 3 or not dtype_ok:
        raise ValueError(
            f"image batch {index} has shape {tuple(batch.shape)} and dtype {batch.dtype} "
            f"(expected (N, H, W, 3) uint8 RGB)"
        )
    return batch


def _batches(images: Any, batch_size: int) -> Iterator[np.ndarray | torch.Tensor]:
    """Slices of at most ``batch_size`` images from an array or from an iterable of arrays."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        images = [images]
    for index, batch in enumerate(images):
        batch = _check_batch(batch, index)
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start:start + batch_size]


def _read_ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead; exceptions reach the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((done, exc))

    thread = threading.Thread(target=work, name="embed-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def _to_device(batch: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _forward(model: Callable, x: torch.Tensor, amp_dtype: torch.dtype | None, n: int) -> torch.Tensor:
    if amp_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=amp_dtype):
            out = model(x)
    else:
        out = model(x)
    out = torch.as_tensor(out, device=x.device).float()
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"model returned shape {tuple(out.shape)} for a batch of {n} images (expected ({n}, D))")
    return out


def extract_embeddings(
    model: Callable[[torch.Tensor], Any],
    images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    *,
    batch_size: int = 256,
    flip: bool = True,
    device: str | torch.device = "auto",
    normalize: Normalization = "arcface",
    amp_dtype: torch.dtype | None = None,
) -> EmbeddingResult:
    """Embeddings of ``images`` (``(N, H, W, 3)`` uint8 RGB, or an iterable of such batches).

    ``model``: an ``nn.Module`` (put in eval mode for the call and moved to ``device`` in place) or any
    callable, e.g. :class:`OnnxEmbedder`, mapping ``(B, 3, H, W)`` float32 to ``(B, D)``.
    ``device="auto"``: the callable's ``device`` attribute if it has one, else CUDA when available.
    ``amp_dtype``: e.g. ``torch.bfloat16`` for autocast; embeddings are summed and normalised in float32.
    Raises ``ValueError`` naming the batch for malformed input and the image for a non-finite embedding.
    """
    scale = normalization_scale(normalize)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mean = NORMALIZATIONS[normalize][0]
    dev = _resolve_device(model, device)
    cuda = dev.type == "cuda"
    module = model if isinstance(model, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
        module.to(dev)
        if cuda:
            module.to(memory_format=torch.channels_last)

    batches = _batches(images, batch_size)
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        batches = _read_ahead(batches)
    fused_parts: list[torch.Tensor] = []
    norm_parts: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for batch in batches:
                n = batch.shape[0]
                x = _to_device(batch, dev).permute(0, 3, 1, 2).float().sub_(mean).mul_(scale)
                x = x.contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
                raw = _forward(model, x, amp_dtype, n)
                norms = [raw.norm(dim=1)]
                if flip:
                    x_flip = x.flip(3).contiguous(memory_format=torch.channels_last if cuda else torch.contiguous_format)
                    raw_flip = _forward(model, x_flip, amp_dtype, n)
                    norms.append(raw_flip.norm(dim=1))
                    raw = raw + raw_flip
                fused = torch.nn.functional.normalize(raw, dim=1)
                fused_parts.append(fused.to("cpu", non_blocking=cuda))
                norm_parts.append(torch.stack(norms, dim=1).to("cpu", non_blocking=cuda))
        if cuda:
            torch.cuda.synchronize(dev)
    finally:
        if module is not None:
            module.train(was_training)

    if not fused_parts:
        return EmbeddingResult(np.zeros((0, 0), np.float32), np.zeros((0, 2 if flip else 1), np.float32))
    fused_all = torch.cat(fused_parts).numpy()
    norms_all = torch.cat(norm_parts).numpy()
    finite = np.isfinite(fused_all).all(axis=1) & np.isfinite(norms_all).all(axis=1)
    if not finite.all():
        raise ValueError(f"the model produced a non-finite embedding for image {int(np.flatnonzero(~finite)[0])}")
    return EmbeddingResult(fused_all, norms_all)


class OnnxEmbedder:
    """An ONNX embedding model as a callable: ``(B, 3, H, W)`` float32 (tensor or array) -> ``(B, D)``
    float32 numpy, with the contract of :func:`extract_embeddings`.

    ``providers``: onnxruntime execution providers; default CUDA when onnxruntime has it, then CPU.
    A model exported with a fixed batch size is fed in chunks of that size (the last one zero-padded).
    Inputs are given to onnxruntime from host memory, so ``device`` is ``"cpu"``.
    """

    device = "cpu"

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise FormatError(self.path, f"not a loadable ONNX model ({exc})") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = [(i.name, i.shape) for i in inputs]
            raise FormatError(self.path, f"model inputs {shapes}", "one input of rank 4 (B, 3, H, W)")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        arr = x.detach().to("cpu").numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        arr = np.ascontiguousarray(arr, dtype=self.input_dtype)
        if self.fixed_batch is None:
            return self._run(arr)
        b, parts = self.fixed_batch, []
        for start in range(0, arr.shape[0], b):
            chunk = arr[start:start + b]
            if chunk.shape[0] < b:
                chunk = np.concatenate([chunk, np.zeros((b - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)])
            parts.append(self._run(chunk)[: min(b, arr.shape[0] - start)])
        return np.concatenate(parts)

    def _run(self, arr: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: arr})[0]
        return np.asarray(out, dtype=np.float32)


def write_embeddings(path: str | os.PathLike, names: Sequence[str], emb: np.ndarray) -> None:
    """Write ``names`` and ``emb`` ``(N, D)`` float32 as Parquet (``name`` string, ``embedding``
    fixed-size list of D float32), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {emb.shape}")
    if len(names) != emb.shape[0]:
        raise ValueError(f"{len(names)} names for {emb.shape[0]} embeddings")
    values = pa.array(emb.reshape(-1), type=pa.float32())
    table = pa.table({
        "name": pa.array([str(n) for n in names], type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(values, emb.shape[1]),
    })
    with atomic_paths(path) as (tmp,):
        pq.write_table(table, tmp)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read a file written by :func:`write_embeddings`: ``(names, (N, D) float32)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for column in ("name", "embedding"):
        if column not in table.column_names:
            raise FormatError(path, f"no column {column!r} (has {table.column_names})", "columns 'name' and 'embedding'")
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise FormatError(path, f"column 'embedding' has type {col.type}", "fixed_size_list<float>")
    dim = col.type.list_size
    emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return table.column("name").to_pylist(), emb
