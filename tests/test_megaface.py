"""MegaFace: devkit feature files and lists, noise removal, identification CMC and TAR@FAR on sets
whose answers are known in advance, plus agreement with the FaceX-Zoo-style reference loops."""
from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest

from bench.megaface import reference_identification, synthetic_megaface
from datasets.errors import FormatError
from datasets.megaface import (
    decode_feature,
    encode_feature,
    feature_file_name,
    feature_path,
    load_features,
    read_feature,
    read_features_list_json,
    read_image_list,
    read_noise_list,
    save_features,
    write_feature,
)
from tasks.evaluation.megaface import NOISY_DISTRACTOR_VALUE, identification, remove_noises, verification_tar_at_far
from tasks.evaluation.pairs import tar_at_far


# ---------------------------------------------------------------- feature files and lists


def test_feature_file_layout_512_and_513(tmp_path):
    vec = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    path = tmp_path / "a.jpg_r100.bin"
    write_feature(path, vec)
    data = path.read_bytes()
    assert len(data) == 2064
    # the bytes InsightFace's write_bin produces: struct '4i' header then '%df' values
    assert data == struct.pack("<4i", 512, 1, 4, 5) + struct.pack("<512f", *vec.tolist())
    np.testing.assert_array_equal(read_feature(path), vec)
    write_feature(path, np.r_[vec, 100.0])
    assert path.stat().st_size == 2068 and read_feature(path)[-1] == 100.0


def test_feature_file_cv64_and_matrix_forms():
    values = np.arange(6, dtype="<f8")
    got = decode_feature(struct.pack("<4i", 6, 1, 8, 6) + values.tobytes())
    assert got.dtype == np.float64 and np.array_equal(got, values)
    mat = decode_feature(struct.pack("<4i", 2, 3, 12, 5) + values.astype("<f4").tobytes())
    assert mat.shape == (2, 3) and mat[1, 2] == 5.0


@pytest.mark.parametrize("data,message", [
    (b"\x00" * 10, r"file is 10 bytes, shorter than the 16-byte header"),
    (struct.pack("<4i", 4, 1, 4, 7) + b"\x00" * 16, r"OpenCV type 7 at offset 12 \(expected 5 \(CV_32F\) or 6"),
    (struct.pack("<4i", 4, 1, 8, 5) + b"\x00" * 16, r"row stride 8 bytes at offset 8 \(expected 4 = cols x 4\)"),
    (struct.pack("<4i", 512, 1, 4, 5) + b"\x00" * 2044, r"file is 2060 bytes \(expected 2064 = 16-byte header \+ 512 x 1"),
    (struct.pack("<4i", -1, 1, 4, 5), r"header rows=-1, cols=1 at offset 0"),
])
def test_bad_feature_files_are_named(tmp_path, data, message):
    path = tmp_path / "bad_r100.bin"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message) as err:
        read_feature(path)
    assert str(path) in str(err.value)


def test_encode_rejects_non_vectors_and_nan(tmp_path):
    with pytest.raises(ValueError, match=r"non-empty \(D,\) vector, got shape \(2, 3\)"):
        encode_feature(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x.bin: feature value 3 is not finite"):
        write_feature(tmp_path / "x.bin", np.array([0, 1, 2, np.nan, 4.0]))
    assert not (tmp_path / "x.bin").exists()


def test_feature_names_and_batch_save_load(tmp_path):
    assert feature_file_name("4174611825_0.jpg", "r100ii") == "4174611825_0.jpg_r100ii.bin"
    assert feature_file_name("Aaron_Eckhart_136.png", "insightface", (112, 112)) == "Aaron_Eckhart_136.png_insightface_112x112.bin"
    rel = "375/37531198@N00/4174611825_0.jpg"
    assert feature_path(tmp_path, rel, "r100") == tmp_path / "375/37531198@N00/4174611825_0.jpg_r100.bin"
    with pytest.raises(ValueError, match="algorithm name 'a/b'"):
        feature_file_name("x.jpg", "a/b")
    feats = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    rels = [rel, "Aaron_Eckhart/Aaron_Eckhart_1.png", "x/y/z.jpg"]
    save_features(tmp_path, rels, feats, "r100", (112, 112))
    np.testing.assert_array_equal(load_features(tmp_path, rels, "r100", (112, 112)), feats)
    (tmp_path / "x/y/z.jpg_r100_112x112.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"z.jpg_r100_112x112.bin: feature file of 'x/y/z.jpg' not found"):
        load_features(tmp_path, rels, "r100", (112, 112))


def test_noise_and_image_lists(tmp_path):
    noise = tmp_path / "megaface_noises.txt"
    noise.write_text("# comment line\n375/37531198@N00/4174611825_0.jpg\n\n7\t12/34@N00/5_0.jpg\nAaron_Eckhart_136.png\n")
    assert read_noise_list(noise) == {"375/37531198@N00/4174611825_0.jpg", "12/34@N00/5_0.jpg", "Aaron_Eckhart_136.png"}
    noise.write_text("a.jpg\nbad\t\n")
    with pytest.raises(FormatError, match=r"line 2: empty second field"):
        read_noise_list(noise)
    lst = tmp_path / "facescrub_lst"
    lst.write_text("Aaron_Eckhart/Aaron_Eckhart_1.png\r\n\nAdam_Brody/Adam_Brody_2.png\n")
    assert read_image_list(lst) == ["Aaron_Eckhart/Aaron_Eckhart_1.png", "Adam_Brody/Adam_Brody_2.png"]
    lst.write_text("a/b.png\n/abs/c.png\n")
    with pytest.raises(FormatError, match=r"facescrub_lst: line 2: '/abs/c.png' is not a relative path"):
        read_image_list(lst)
    lst.write_bytes(b"ok.png\n\xff\xfe.png\n")
    with pytest.raises(FormatError, match="line 2 is not UTF-8"):
        read_image_list(lst)
    js = tmp_path / "facescrub_features_list.json"
    js.write_text(json.dumps({"path": ["A/A_1.png", "B/B_1.png"], "id": ["A", "B"]}))
    assert read_features_list_json(js) == (["A/A_1.png", "B/B_1.png"], ["A", "B"])
    js.write_text(json.dumps({"paths": []}))
    with pytest.raises(FormatError, match="no list of strings under key 'path'"):
        read_features_list_json(js)


# ---------------------------------------------------------------- identification


def _clusters(n_ids: int, per_id: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = np.repeat(np.arange(n_ids), per_id)
    feats = centres[ids] + spread * rng.standard_normal((ids.size, dim))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats.astype(np.float32), [f"id{i}" for i in ids]


def test_perfectly_separable_gives_rank1_of_one_and_skips_large_sizes():
    probes, ids = _clusters(6, 4, 64, 0.02, seed=0)
    distractors = np.random.default_rng(1).standard_normal((500, 64)).astype(np.float32)
    distractors /= np.linalg.norm(distractors, axis=1, keepdims=True)
    res = identification(probes, ids, distractors, sizes=(10, 100, 500, 1000), ranks=(1, 5), device="cpu")
    assert res.sizes == (10, 100, 500)
    assert res.rank1() == {10: 1.0, 100: 1.0, 500: 1.0}
    assert res.n_pairs == 6 * 4 * 3 and res.n_identities == 6
    assert res.notes == ("1,000 distractors skipped: only 500 given",)
    assert res.to_rows()[0] == {"distractors": 10, "rank_1": 1.0, "rank_5": 1.0, "pairs": 72}


def _planted(ks: list[int], n_background: int = 40, seed: int = 0):
    """Identity j: images a_j = 10 e_{3j}, b_j = a_j + 0.4 e_{3j+1}, plus one singleton probe. Planted:
    ks[j] distractors at b_j + (0.1 + 0.01 i) e_{3j+2}: closer to b_j than a_j is (0.1.. < 0.4) but
    farther from a_j than b_j is. Query b_j with gallery a_j has rank ks[j] + 1, query a_j rank 1."""
    dim = 3 * len(ks) + 3
    probes, ids, planted = [], [], []
    for j, k in enumerate(ks):
        a = np.zeros(dim)
        a[3 * j] = 10.0
        b = a.copy()
        b[3 * j + 1] = 0.4
        probes += [a, b]
        ids += [f"id{j}", f"id{j}"]
        for i in range(k):
            x = b.copy()
            x[3 * j + 2] = 0.1 + 0.01 * i
            planted.append(x)
    singleton = np.zeros(dim)
    singleton[-1] = 10.0
    probes.append(singleton)
    ids.append("alone")
    background = np.random.default_rng(seed).standard_normal((n_background, dim))
    distractors = np.concatenate([background, np.array(planted)])  # first n_background: no look-alikes
    return np.array(probes, np.float32), ids, distractors.astype(np.float32)


def test_planted_look_alikes_give_exact_cmc():
    ks = [0, 1, 2, 3, 5, 9]
    probes, ids, distractors = _planted(ks)
    ranks = (1, 2, 3, 4, 6, 10)
    res = identification(probes, ids, distractors, sizes=(40, len(distractors)), ranks=ranks, device="cpu")
    assert res.n_pairs == 2 * len(ks)  # the singleton identity contributes no pair
    for i, r in enumerate(ranks):
        expected = (len(ks) + sum(k + 1 <= r for k in ks)) / (2 * len(ks))
        assert res.cmc[len(distractors)][i] == expected, r
    assert res.rank1()[40] == 1.0  # the first 40 distractors hold no look-alike
    chunked = identification(probes, ids, distractors, sizes=(40, len(distractors)), ranks=ranks, device="cpu", chunk=3)
    for size in res.cmc:
        np.testing.assert_array_equal(chunked.cmc[size], res.cmc[size])


def test_matches_reference_loops_and_euclidean_equals_cosine_on_unit_features():
    probes, ids, distractors = synthetic_megaface(3000, dim=64, n_ids=12, n_probes=150, seed=4)
    ranks = (1, 2, 5, 10)
    ours = identification(probes, ids, distractors, sizes=(300, 3000), ranks=ranks, metric="cosine", device="cpu")
    for size in (300, 3000):
        ref = reference_identification(probes, ids, distractors[:size], ranks=ranks)
        assert list(ours.cmc[size]) == [ref[r] for r in ranks]
    assert 0.2 < ours.rank1()[3000] < 0.95  # a non-trivial set
    euclid = identification(probes, ids, distractors, sizes=(300, 3000), ranks=ranks, device="cpu", chunk=1000)
    for size in (300, 3000):
        np.testing.assert_allclose(euclid.cmc[size], ours.cmc[size], atol=1.5 / ours.n_pairs)


def test_identification_bad_input():
    probes, ids = _clusters(3, 2, 8, 0.1, seed=0)
    distractors = np.zeros((20, 8), np.float32)
    distractors[13, 4] = np.inf
    with pytest.raises(ValueError, match="distractor feature 13 is not finite"):
        identification(probes, ids, distractors, sizes=(20,), device="cpu", chunk=4)
    with pytest.raises(ValueError, match=r"probe features \(6, 8\) and distractor features \(20, 7\)"):
        identification(probes, ids, distractors[:, :7], device="cpu")
    with pytest.raises(ValueError, match="6 probe features but 5 probe identities"):
        identification(probes, ids[:5], distractors, device="cpu")
    with pytest.raises(ValueError, match="no probe identity has two or more images"):
        identification(probes[::2], ids[::2], distractors[:10], sizes=(10,), device="cpu")


# ---------------------------------------------------------------- noise removal


def _named_set():
    probes, ids = _clusters(4, 3, 16, 0.05, seed=2)
    names = [f"{i}/{i}_{n}.png" for n, i in enumerate(ids)]
    rng = np.random.default_rng(3)
    background = rng.standard_normal((30, 16)).astype(np.float32)
    background /= np.linalg.norm(background, axis=1, keepdims=True)
    # MegaFace's actual noise: photos of probe celebrities among the distractors (here exact copies)
    distractors = np.concatenate([background, probes]).astype(np.float32)
    dnames = [f"{n // 10}/{n}@N00/{n}_0.jpg" for n in range(len(distractors))]
    return probes, ids, names, distractors, dnames


def test_noisy_distractors_stop_mattering():
    probes, ids, names, distractors, dnames = _named_set()
    before = identification(probes, ids, distractors, sizes=(len(distractors),), ranks=(1,), device="cpu")
    assert before.rank1()[len(distractors)] == 0.0  # every query's own copy beats its gallery image
    noisy = set(dnames[30:])
    p513, d513 = remove_noises(probes, names, ids, distractors, dnames, set(), noisy, seed=0)
    assert p513.shape == (12, 17) and d513.shape == (len(distractors), 17) and d513.dtype == np.float32
    np.testing.assert_array_equal(d513[:, :16], distractors)
    assert np.all(d513[30:, 16] == NOISY_DISTRACTOR_VALUE) and np.all(d513[:30, 16] == 0)
    after = identification(p513, ids, d513, sizes=(len(distractors),), ranks=(1,), device="cpu")
    assert after.rank1()[len(distractors)] == 1.0


def test_noisy_probe_is_replaced_by_its_identity_centre():
    probes, ids, names, distractors, dnames = _named_set()
    probes = probes.copy()
    probes[4] = -probes[4]  # a mislabelled image in identity id1 (rows 3, 4, 5)
    noisy_name = names[4].split("/")[1]  # the list names the file, as facescrub_noises.txt does
    p513, d513 = remove_noises(probes, names, ids, distractors, dnames, {noisy_name}, set(), seed=0)
    centre = probes[3] + probes[5]
    centre /= np.linalg.norm(centre)
    assert np.abs(p513[4, :16] - centre).max() < 2e-3 and p513[4, 16] == 0.0
    assert abs(np.linalg.norm(p513[4]) - 1) < 1e-6
    np.testing.assert_array_equal(p513[[0, 1, 2, 3, 5], :16], probes[[0, 1, 2, 3, 5]])
    other_seed, _ = remove_noises(probes, names, ids, distractors, dnames, {noisy_name}, set(), seed=1)
    assert 0 < np.abs(other_seed[4] - p513[4]).max() < 4e-3
    np.testing.assert_array_equal(remove_noises(probes, names, ids, distractors, dnames, {noisy_name}, set(), seed=0)[0], p513)


def test_noise_lists_naming_unknown_images(caplog):
    probes, ids, names, distractors, dnames = _named_set()
    with pytest.raises(ValueError, match=r"2 of 3 distractor noise-list entries name no distractor image, e\.g\. '9/9@N00/x\.jpg', 'nope\.jpg'"):
        remove_noises(probes, names, ids, distractors, dnames, set(), {dnames[0], "nope.jpg", "9/9@N00/x.jpg"})
    with caplog.at_level(logging.WARNING, logger="facepipe"):
        _, d513 = remove_noises(probes, names, ids, distractors, dnames, {"Ghost_1.png"}, {dnames[0], "nope.jpg"}, strict=False)
    assert "1 of 1 probe noise-list entries" in caplog.text and "1 of 2 distractor" in caplog.text
    assert d513[0, 16] == NOISY_DISTRACTOR_VALUE
    all_of_id0 = {n.split("/")[1] for n, i in zip(names, ids) if i == "id0"}
    with pytest.raises(ValueError, match="identity 'id0' has no clean image"):
        remove_noises(probes, names, ids, distractors, dnames, all_of_id0, set())


# ---------------------------------------------------------------- verification TAR@FAR


def test_tar_at_far_matches_brute_force():
    probes, ids, distractors = synthetic_megaface(500, dim=16, n_ids=8, n_probes=60, seed=6)
    res = verification_tar_at_far(probes, ids, distractors, far=1e-3, device="cpu", chunk=64)
    p = probes.astype(np.float64)
    d = distractors.astype(np.float64)
    codes = np.array(ids)
    iu = np.triu_indices(len(p), 1)
    same = codes[iu[0]] == codes[iu[1]]
    genuine = -((p[iu[0]] - p[iu[1]]) ** 2).sum(1)[same]
    impostor = -((p[:, None, :] - d[None, :, :]) ** 2).sum(2).ravel()
    brute = tar_at_far(genuine, impostor, 1e-3)
    assert res.n_genuine == genuine.size and res.n_impostor == impostor.size == 30_000
    assert abs(res.tar - brute.tar) <= 1 / genuine.size and res.far <= 1e-3
    assert 0.05 < res.tar < 1.0
    assert verification_tar_at_far(probes, ids, distractors, far=1e-6, device="cpu") is None  # 30,000 pairs < 1e6


def test_tar_at_far_separable_set_is_perfect():
    probes, ids = _clusters(5, 4, 32, 0.01, seed=8)
    distractors = -np.repeat(probes, 20, axis=0)  # opposite directions: every impostor far away
    res = verification_tar_at_far(probes, ids, distractors, far=1e-3, device="cpu")
    assert res.tar == 1.0 and res.far <= 1e-3 and res.n_impostor == 20 * 400
