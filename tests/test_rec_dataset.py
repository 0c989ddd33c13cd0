"""datasets.rec_dataset: items, normalisation, reproducible flips in DataLoader workers, bad records."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.errors import FormatError
from datasets.normalization import normalize_batch
from datasets.rec_dataset import RecFaceDataset
from datasets.rec_layout import InsightFaceRecWriter
from datasets.recordio import IRHeader, MXIndexedRecordIO, pack
from rec_fixtures import face_jpegs

LABELS = [0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4]


@pytest.fixture(scope="module")
def jpegs():
    return face_jpegs(len(LABELS), seed=21)


@pytest.fixture(scope="module")
def rec_dir(tmp_path_factory, jpegs):
    root = tmp_path_factory.mktemp("rec")
    with InsightFaceRecWriter(root, label_format="array") as w:
        for label, jpg in zip(LABELS, jpegs):
            w.add(label, jpg)
    return root


def _rgb(jpg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_items_uint8_and_normalised(rec_dir, jpegs):
    raw = RecFaceDataset(rec_dir, normalize=None)
    assert len(raw) == len(LABELS) and raw.num_classes == 5 and raw.labels.tolist() == LABELS
    image, label = raw[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 112, 112) and image.is_contiguous()
    assert label.dtype == torch.int64 and label.item() == 1
    expected = torch.from_numpy(np.ascontiguousarray(_rgb(jpegs[4]).transpose(2, 0, 1)))
    assert torch.equal(image, expected)
    for mode, scale in [("mxnet", 1 / 128), ("arcface", 1 / 127.5)]:
        x, _ = RecFaceDataset(rec_dir, normalize=mode)[4]
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, (expected.float() - 127.5) * scale)
        torch.testing.assert_close(normalize_batch(expected[None], mode)[0], x, atol=0, rtol=0)  # cv2.LUT path
        strided = expected[None].transpose(-1, -2).contiguous().transpose(-1, -2)  # torch arithmetic path
        torch.testing.assert_close(normalize_batch(strided, mode)[0], x, atol=0, rtol=0)


def test_arcface_normalisation_matches_torchvision(rec_dir, jpegs):
    from torchvision import transforms

    reference = transforms.Compose([transforms.ToPILImage(), transforms.ToTensor(),
                                    transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3)])
    x, _ = RecFaceDataset(rec_dir, normalize="arcface")[7]
    torch.testing.assert_close(x, reference(np.ascontiguousarray(_rgb(jpegs[7]))), atol=1e-6, rtol=0)


def _epoch(dataset, workers: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=workers, multiprocessing_context="fork" if workers else None)
    return torch.cat([torch.cat([x.flatten(1)[:, :8].float(), y[:, None].float()], 1) for x, y in loader])


def test_flip_is_random_and_reproducible_in_workers(rec_dir):
    ds = RecFaceDataset(rec_dir, normalize=None, flip=True)
    a, b, c = _epoch(ds, 2, seed=1), _epoch(ds, 2, seed=1), _epoch(ds, 2, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = RecFaceDataset(rec_dir, normalize=None)
    images = torch.stack([plain[i][0] for i in range(len(plain))])
    torch.manual_seed(0)
    flipped = torch.stack([ds[i][0] for i in range(len(ds))])
    is_flip = [torch.equal(f, im.flip(-1)) for f, im in zip(flipped, images)]
    is_same = [torch.equal(f, im) for f, im in zip(flipped, images)]
    assert all(x or y for x, y in zip(is_flip, is_same)) and any(is_flip) and any(is_same)


def test_im2rec_set_and_image_size_check(tmp_path, jpegs):
    with MXIndexedRecordIO(tmp_path / "im.idx", tmp_path / "im.rec", "w") as w:
        for key, (label, jpg) in enumerate(zip([5, 3], jpegs)):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), jpg))
    ds = RecFaceDataset(tmp_path / "im.rec", normalize=None)
    assert [ds[i][1].item() for i in range(2)] == [5, 3]
    with pytest.raises(FormatError, match=r"im\.rec: record key 0 at offset 0: image is 112x112 \(expected 112x96"):
        RecFaceDataset(tmp_path / "im.rec", image_size=(112, 96))[0]


def test_undecodable_record_names_key_and_offset(tmp_path, jpegs):
    with InsightFaceRecWriter(tmp_path) as w:
        w.add(0, jpegs[0])
        bad = w.add(0, b"\xff\xd8\xff\xe0 this is not a jpeg")
    ds = RecFaceDataset(tmp_path)
    ds[0]
    with pytest.raises(FormatError, match=rf"train\.rec: record key 2 at offset {bad.offset}: payload is not a decodable image"):
        ds[1]


def test_bad_normalize_mode(rec_dir):
    with pytest.raises(ValueError, match="normalize must be"):
        RecFaceDataset(rec_dir, normalize="imagenet")


def test_pickled_dataset_reopens_lazily(rec_dir):
    import pickle

    ds = RecFaceDataset(rec_dir, normalize=None)
    first = ds[0][0]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawn-started DataLoader worker gets
    assert copy._rec is None and torch.equal(copy[0][0], first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_normalize_batch_on_gpu_matches_cpu(rec_dir):
    ds = RecFaceDataset(rec_dir, normalize=None)
    batch = torch.stack([ds[i][0] for i in range(len(ds))])
    for mode in ("mxnet", "arcface"):
        torch.testing.assert_close(normalize_batch(batch.cuda(), mode).cpu(), normalize_batch(batch, mode), atol=1e-6, rtol=0)
