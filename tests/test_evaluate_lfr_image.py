"""LFR image-track submission: rows in filelist.txt order, flip-summed L2-normalised float32 features in the
organisers' binary layout (byte-level), row count = file-list entries; file-list entries are first fields."""

import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from visrec.cli import app
from visrec.data.images import read_image
from visrec.data.synth import write_face_dataset
from visrec.errors import DataError
from visrec.evaluate.lfr import read_filelist, read_lfr_features, write_image_submission
from visrec.models import build_backbone


def test_filelist_entries_are_first_fields(tmp_path):
    (tmp_path / "l.txt").write_text("a/1.jpg 0\n\n  b/2.jpg\tx y\r\nc/3.jpg\n")
    assert read_filelist(tmp_path / "l.txt") == ["a/1.jpg", "b/2.jpg", "c/3.jpg"]
    (tmp_path / "long.txt").write_text("ok.jpg\n" + "x" * 5000 + "\n")
    with pytest.raises(DataError, match="line 2"):
        read_filelist(tmp_path / "long.txt")


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    d = tmp_path_factory.mktemp("lfrimg")
    write_face_dataset(d / "images", 4, 3, format="folder", seed=3)
    names = sorted(p.relative_to(d / "images").as_posix() for p in (d / "images").rglob("*.jpg"))
    order = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    # second fields (as a list with labels would have) are ignored: the entry is the first field
    (d / "filelist.txt").write_text("".join(f"{n} {k % 2}\n" if k % 3 == 0 else f"{n}\n" for k, n in enumerate(order)))
    torch.manual_seed(0)
    torch.save({"model_config": {"name": "mbf", "embedding_size": 64},
                "backbone": build_backbone("mbf", embedding_size=64).state_dict()}, d / "model.pt")
    return d, order


def test_cli_writes_the_image_track_in_the_published_layout(testset):
    from visrec.models.loading import load_model

    d, order = testset
    res = CliRunner().invoke(app, ["eval", "faces", str(d / "model.pt"), "--data", str(d / "images"),
                                   "--filelist", str(d / "filelist.txt"), "--submission", str(d / "out.bin")])
    assert res.exit_code == 0, res.output
    raw = (d / "out.bin").read_bytes()
    n, dim = len(order), 64
    # header: four little-endian int32 = rows, cols, bytes per row, type code 5 (float32)
    assert raw[:16] == b"".join(v.to_bytes(4, "little", signed=True) for v in (n, dim, 4 * dim, 5))
    assert raw[:16] == struct.pack("<4i", n, dim, dim * 4, 5)
    assert len(raw) == 16 + n * dim * 4
    rows = np.frombuffer(raw, dtype="<f4", offset=16).reshape(n, dim)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-6)
    loaded = load_model(d / "model.pt")
    imgs = np.stack([read_image(d / "images" / name) for name in order])
    expected = loaded.embed(imgs) + loaded.embed(np.ascontiguousarray(imgs[:, :, ::-1]))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(rows, expected, atol=1e-5)  # row i = entry i of filelist.txt, flip-summed
    plain = loaded.embed(imgs)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    assert not np.allclose(rows, plain, atol=1e-3)  # the flip test changes the features
    assert np.array_equal(read_lfr_features(d / "out.bin"), rows)


def test_row_count_and_bad_entries(testset, tmp_path):
    d, order = testset

    def embed(x):
        return np.ones((len(x), 8), np.float32)

    with pytest.raises(DataError, match="1,862,120"):
        write_image_submission(embed, d / "images", d / "filelist.txt", tmp_path / "a.bin", expected_rows=1_862_120)
    assert not (tmp_path / "a.bin").exists()
    out = write_image_submission(embed, d / "images", d / "filelist.txt", tmp_path / "b.bin", batch=5,
                                 expected_rows=len(order))
    assert read_lfr_features(out).shape == (len(order), 8)  # batches of 5 cover all 12 entries once
    (tmp_path / "escape.txt").write_text(order[0] + "\n../outside.jpg\n")
    with pytest.raises(DataError, match="entry 2"):
        write_image_submission(embed, d / "images", tmp_path / "escape.txt", tmp_path / "c.bin")
    (tmp_path / "missing.txt").write_text(order[0] + "\nnot/there.jpg\n")
    with pytest.raises(DataError, match="there.jpg"):
        write_image_submission(embed, d / "images", tmp_path / "missing.txt", tmp_path / "c.bin")
    with pytest.raises(DataError, match="aligned 96x96"):
        write_image_submission(embed, d / "images", d / "filelist.txt", tmp_path / "c.bin", input_size=(96, 96))
    assert not (tmp_path / "c.bin").exists() and not list(tmp_path.glob(".c.bin.*"))  # no temporary file either
