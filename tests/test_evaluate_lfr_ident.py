"""LFR submission binary, CMC and open-set TPIR on crafted cases."""

import struct

import numpy as np
import pytest

from visrec.errors import DataError
from visrec.evaluate.identification import cmc, tpir_at_fpir
from visrec.evaluate.lfr import evaluate_submission, read_lfr_features, write_lfr_features


def test_lfr_binary_round_trip_and_header(tmp_path):
    feats = np.random.default_rng(0).standard_normal((5, 512)).astype(np.float32)
    path = write_lfr_features(tmp_path / "f.bin", feats)
    raw = path.read_bytes()
    assert raw[:16] == struct.pack("4i", 5, 512, 2048, 5)
    assert np.array_equal(read_lfr_features(path), feats)
    path.write_bytes(raw[:-4])
    with pytest.raises(DataError, match="header announces"):
        read_lfr_features(path)
    path.write_bytes(struct.pack("4i", 5, 512, 2048, 4) + raw[16:])
    with pytest.raises(DataError, match="type code 4"):
        read_lfr_features(path)


def test_evaluate_a_submission(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(20), 5)
    feats = rng.standard_normal((20, 64))[labels] + 0.3 * rng.standard_normal((100, 64))
    names = [f"img/{i:04d}.jpg" for i in range(100)]
    (tmp_path / "filelist.txt").write_text("\n".join(names) + "\n")
    write_lfr_features(tmp_path / "sub.bin", feats)
    res = evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", dict(zip(names, labels)), [1e-3],
                              device="cpu")
    assert res[1e-3].tpr > 0.9
    with pytest.raises(DataError, match="no ground-truth label"):
        evaluate_submission(tmp_path / "sub.bin", tmp_path / "filelist.txt", {}, [1e-3])


def test_cmc_on_a_crafted_case():
    gallery = np.eye(4, dtype=np.float32)
    gallery_labels = np.array([10, 11, 12, 13])
    probe = np.array([[1, 0, 0, 0], [0.9, 1, 0, 0], [0.5, 0.4, 0.45, 0]], np.float32)
    probe_labels = np.array([10, 10, 12])  # probe 1 ranks 2nd, probe 2 ranks 2nd
    res = cmc(probe, probe_labels, gallery, gallery_labels, ranks=(1, 2, 5))
    assert res == {1: pytest.approx(1 / 3), 2: 1.0, 5: 1.0}


def test_tpir_at_fpir_open_set():
    gallery = np.eye(3, dtype=np.float32)
    g_labels = np.array([0, 1, 2])
    rng = np.random.default_rng(2)
    mated = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]] + 0.05 * rng.standard_normal((4, 3)).astype(np.float32)
    strangers = rng.standard_normal((10, 3)).astype(np.float32)
    probe = np.concatenate([mated, strangers])
    labels = np.array([0, 1, 2, 0] + [99] * 10)
    res = tpir_at_fpir(probe, labels, gallery, g_labels, targets=[0.1, 0.5])
    assert res[0.1]["fpir"] <= 0.1 and res[0.5]["fpir"] <= 0.5
    assert res[0.5]["tpir"] >= res[0.1]["tpir"]
