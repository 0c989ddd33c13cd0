"""Torch ``Dataset`` over an InsightFace or im2rec ``.rec`` set (layout: :mod:`datasets.rec_layout`).

Each item is ``(image, label)``: ``image`` a ``(3, H, W)`` tensor in RGB order -- uint8 when
``normalize=None`` (normalise whole batches later, on the GPU, with
:func:`datasets.normalization.normalize_batch`),
float32 otherwise -- and ``label`` an int64 scalar tensor.

Normalisation modes: :mod:`datasets.normalization`.
Images are decoded with OpenCV's libjpeg (bit-exact with ``mx.image.imdecode``); one strided copy
turns HWC BGR into CHW RGB (and flips), one ``cv2.LUT`` pass normalises. The optional
horizontal flip (p = 0.5) draws from torch's default generator, which the DataLoader seeds per
worker from the loader's base seed, so ``torch.manual_seed`` makes runs reproducible.

The record file is opened lazily in each process (fork- and spawn-safe); the index is held as
int64 arrays (no per-record Python objects), so workers share it copy-on-write.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import Augmenter
from .errors import FormatError
from .face_codec import decode_bgr
from .normalization import Normalization, normalization_lut
from .rec_layout import RecIndex, read_rec_index
from .recordio import MXRecordIO

NormalizeMode = Normalization | None
_IR_SIZE = 24


class RecFaceDataset(Dataset):
    """Face images of a ``.rec`` set: ``dataset[i] -> (image (3, H, W), label int64)``.

    ``root``: dataset folder (``train.rec``/``train.idx``/``property``) or a ``.rec`` path.
    ``flip``: random horizontal flip with p = 0.5. ``normalize``: ``"mxnet"``, ``"arcface"`` or
    ``None`` (uint8 output). ``image_size``: ``(H, W)`` every image must have (default: from
    ``property`` if present, else unchecked); a mismatch raises :class:`FormatError`.
    ``augment``: a :class:`datasets.augment.Augmenter` applied to every decoded image; its draws are
    seeded by ``(seed, epoch, index)``, so index the dataset with ``(index, epoch)`` tuples
    (:func:`datasets.augment.tag_epochs`); a plain index means epoch 0.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        flip: bool = False,
        normalize: NormalizeMode = "arcface",
        image_size: tuple[int, int] | None = None,
        name: str = "train",
        augment: Augmenter | None = None,
    ):
        self.augment = augment if augment is not None and augment.active else None
        self._lut = None if normalize is None else normalization_lut(normalize)  # one cv2.LUT pass normalises an image
        self.index: RecIndex = read_rec_index(root, name=name)
        self.flip = flip
        self.normalize = normalize
        prop = self.index.property
        self.image_size = tuple(image_size) if image_size else ((prop.height, prop.width) if prop else None)
        self._keys = self.index.keys
        self._offsets = self.index.offsets
        self._labels = torch.from_numpy(self.index.labels)
        self._rec: MXRecordIO | None = None
        self._pid = -1

    @property
    def labels(self) -> np.ndarray:
        """int64 ``(N,)`` class label of every item (for samplers)."""
        return self.index.labels

    @property
    def num_classes(self) -> int:
        prop = self.index.property
        return prop.num_classes if prop else int(self.index.labels.max()) + 1

    def __len__(self) -> int:
        return len(self._keys)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rec"], state["_pid"] = None, -1
        return state

    def _reader(self) -> MXRecordIO:
        if self._pid != os.getpid() or self._rec is None:
            self._rec = MXRecordIO(self.index.rec_path, "r")
            self._pid = os.getpid()
        return self._rec

    def _decode_bgr(self, i: int) -> np.ndarray:
        record = self._reader().read_at(int(self._offsets[i]))
        start = _IR_SIZE + 4 * int.from_bytes(record[:4], "little")
        payload = np.frombuffer(record, np.uint8, offset=min(start, len(record)))
        return decode_bgr(payload, self.index.rec_path, f"record key {int(self._keys[i])} at offset {int(self._offsets[i])}",
                          self.image_size)

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``(H, W, 3)`` RGB (a channel-reversed view of OpenCV's BGR)."""
        return self._decode_bgr(i)[:, :, ::-1]

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(i, tuple):  # (index, epoch) from datasets.augment.EpochTaggedSampler
            i, epoch = i
        else:
            epoch = 0
        img = self._decode_bgr(i)
        if self.augment is not None:
            img = self.augment(img, i, epoch)
        chw = img.transpose(2, 0, 1)[::-1]  # RGB planes (a view)
        if self.flip and torch.rand(()) < 0.5:
            chw = chw[:, :, ::-1]
        chw = np.ascontiguousarray(chw)  # the one copy: HWC BGR -> CHW RGB (+ flip)
        if self._lut is not None:
            chw = cv2.LUT(chw.reshape(-1, chw.shape[2]), self._lut).reshape(chw.shape)
        return torch.from_numpy(chw), self._labels[i]


__all__ = ["RecFaceDataset"]
