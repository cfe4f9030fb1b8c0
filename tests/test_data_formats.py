"""RecordIO, image folders, CSV lists and verification .bin: round trips and errors that name the culprit."""

import pickle
import struct

import numpy as np
import pytest

from visrec.data.folders import read_csv_list, read_image_folder, write_csv_list, write_image_folder
from visrec.data.recordio import MAGIC, RecordIOReader, RecordIOWriter, _encode_record, pack_payload, unpack_payload
from visrec.data.verification import read_verification_bin, write_verification_bin
from visrec.errors import DataError


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    # smooth images survive JPEG well enough to compare loosely
    base = rng.integers(0, 255, (n, 1, 1, 3))
    grad = np.linspace(0, 60, 112)[None, :, None, None]
    return np.clip(base + grad + np.zeros((n, 112, 112, 3)), 0, 255).astype(np.uint8)


def test_recordio_round_trip_groups_identities(tmp_path):
    imgs = images(7)
    labels = [2, 0, 1, 0, 2, 1, 0]  # any order in; grouped by identity on disk
    with RecordIOWriter(tmp_path) as w:
        for im, lab in zip(imgs, labels):
            w.add(im, lab)
    r = RecordIOReader(tmp_path)
    assert len(r) == 7 and r.num_classes == 3
    assert list(r.labels) == [0, 0, 0, 1, 1, 2, 2]
    assert r.identity_ranges == [(1, 4), (4, 6), (6, 8)]
    flag, lab0, *_ = r.read_record(0)
    assert flag == 2 and list(lab0) == [8, 11]  # header: identity records 8..10
    # the first image of identity 1 is labels[2] == 1 -> imgs[2]
    assert np.abs(r.image(3).astype(int) - imgs[2].astype(int)).mean() < 3
    assert (tmp_path / "property").read_text() == "3,112,112"


def test_multilabel_header_and_multipart_record():
    payload = pack_payload([1.5, 2.5, 7.0], b"abc")
    flag, labels, _, _, body = unpack_payload(payload)
    assert flag == 3 and list(labels) == [1.5, 2.5, 7.0] and body == b"abc"
    # a payload that contains the magic word at an aligned offset is split into cflag parts
    data = b"\x00" * 4 + struct.pack("<I", MAGIC) + b"tail"
    enc = _encode_record(pack_payload(3.0, data))
    cflags = []
    pos = 0
    while pos < len(enc):
        magic, lrec = struct.unpack_from("<II", enc, pos)
        assert magic == MAGIC
        cflags.append(lrec >> 29)
        pos += 8 + (lrec & ((1 << 29) - 1))
        pos += -pos % 4
    assert cflags == [1, 3]


def test_multipart_record_reads_back(tmp_path):
    data = b"\x00" * 4 + struct.pack("<I", MAGIC) + b"tail"
    rec = tmp_path / "train.rec"
    enc0 = _encode_record(pack_payload(0.0, data))
    rec.write_bytes(enc0)
    (tmp_path / "train.idx").write_text("0\t0\n")
    r = RecordIOReader(tmp_path)
    assert r.read_record(0)[4] == data
    assert list(r.labels) == [0]


def test_plain_rec_without_identity_header(tmp_path):
    from visrec.data.images import encode_jpeg

    imgs = images(3)
    with open(tmp_path / "train.rec", "wb") as rec, open(tmp_path / "train.idx", "w") as idx:
        for i, (im, lab) in enumerate(zip(imgs, [4, 1, 4])):
            idx.write(f"{i}\t{rec.tell()}\n")
            rec.write(_encode_record(pack_payload(float(lab), encode_jpeg(im), i)))
    r = RecordIOReader(tmp_path)
    assert list(r.labels) == [4, 1, 4] and r.num_classes == 5 and len(r) == 3


@pytest.fixture
def small_rec(tmp_path):
    with RecordIOWriter(tmp_path) as w:
        for im, lab in zip(images(4), [0, 0, 1, 1]):
            w.add(im, lab)
    return tmp_path


def test_missing_idx(small_rec):
    (small_rec / "train.idx").unlink()
    with pytest.raises(DataError, match=r"train\.idx.*index file missing"):
        RecordIOReader(small_rec)


def test_truncated_rec_names_record(small_rec):
    rec = small_rec / "train.rec"
    data = rec.read_bytes()
    last_image_offset = int((small_rec / "train.idx").read_text().splitlines()[4].split("\t")[1])
    rec.write_bytes(data[:last_image_offset + 20])
    with pytest.raises(DataError) as err:
        r = RecordIOReader(small_rec)
        r.image(3)
    assert "train.rec" in str(err.value) and "record" in str(err.value)


def test_bad_magic_and_undecodable_image(small_rec):
    rec = small_rec / "train.rec"
    data = bytearray(rec.read_bytes())
    off = int((small_rec / "train.idx").read_text().splitlines()[2].split("\t")[1])
    data[off + 8 + 24:off + 8 + 40] = b"\x00" * 16  # break the JPEG header of record 2
    rec.write_bytes(bytes(data))
    r = RecordIOReader(small_rec)
    with pytest.raises(DataError, match=r"record 2.*not a decodable image"):
        r.image(1)
    data[off:off + 4] = b"\x00\x00\x00\x00"
    rec.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bad magic"):
        RecordIOReader(small_rec).image(1)


def test_property_mismatch(small_rec):
    (small_rec / "property").write_text("5,112,112")
    with pytest.raises(DataError, match="declares 5 classes"):
        RecordIOReader(small_rec)


def test_image_folder_and_csv_round_trip(tmp_path):
    imgs = images(5)
    write_image_folder(tmp_path / "f", zip(imgs, ["bob", "alice", "bob", "carol", "alice"]))
    lst = read_image_folder(tmp_path / "f")
    assert lst.class_names == ["alice", "bob", "carol"] and list(lst.labels) == [0, 0, 1, 1, 2]
    assert lst.image(0).shape == (112, 112, 3)
    csv = write_csv_list(tmp_path / "list.csv", [(p.relative_to(tmp_path), l) for p, l in zip(lst.paths, lst.labels)])
    back = read_csv_list(csv)
    assert [p.resolve() for p in back.paths] == [p.resolve() for p in lst.paths]
    assert list(back.labels) == list(lst.labels)


def test_folder_errors_and_skip_bad(tmp_path):
    write_image_folder(tmp_path / "f", zip(images(2), [0, 1]))
    (tmp_path / "f" / "000001" / "notes.docx").write_text("x")
    with pytest.raises(DataError, match=r"notes\.docx.*not an image"):
        read_image_folder(tmp_path / "f")
    lst = read_image_folder(tmp_path / "f", skip_bad=True)
    assert len(lst.skipped) == 1 and len(lst.paths) == 2
    (tmp_path / "f" / "000001" / "notes.docx").unlink()
    (tmp_path / "f" / "000002").mkdir()
    with pytest.raises(DataError, match="000002.*no images"):
        read_image_folder(tmp_path / "f")
    (tmp_path / "f" / "000000" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "f" / "000002").rmdir()
    lst = read_image_folder(tmp_path / "f")
    bad = [i for i, p in enumerate(lst.paths) if p.name == "broken.jpg"][0]
    with pytest.raises(DataError, match=r"broken\.jpg.*not a decodable image"):
        lst.image(bad)
    lst = read_image_folder(tmp_path / "f", skip_bad=True, verify=True)
    assert [p.name for p, _ in lst.skipped] == ["broken.jpg"]


def test_csv_errors(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("path,label\nonlyonefield\n")
    with pytest.raises(DataError, match="line 2"):
        read_csv_list(p)
    # a third field was dropped without a word; a path holding a comma is quoted, as CSV writers do
    write_image_folder(tmp_path / "f", zip(images(1), ["ann"]))
    p.write_text("path,label\nf/ann/00000.jpg,ann,extra\n")
    with pytest.raises(DataError, match="line 2: expected 'path,label', got 3 fields"):
        read_csv_list(p)
    (tmp_path / "f" / "ann" / "00000.jpg").rename(tmp_path / "f" / "ann" / "a,b.jpg")
    p.write_text('path,label\n"f/ann/a,b.jpg",ann\n')
    assert read_csv_list(p).paths[0].name == "a,b.jpg"


def test_a_scored_csv_list_names_an_image_listed_twice(tmp_path, monkeypatch, capsys):
    """Training may list an image twice (drawn more often); a set scored over all pairs may not: its two rows
    would be a genuine pair of one image, scored 1. `eval faces` on such a list exits 2 naming both lines,
    whatever spelling of the path (./a.jpg, a.jpg, its absolute path) the repeat uses."""
    from conftest import run_cli

    from visrec.data.datasets import open_face_dataset

    write_image_folder(tmp_path / "f", zip(images(4), ["bob", "alice", "bob", "alice"]))
    rows = [(p.relative_to(tmp_path), p.parent.name) for p in read_image_folder(tmp_path / "f").paths]
    csv = write_csv_list(tmp_path / "list.csv", rows + [(f"./{rows[1][0]}", rows[1][1])])
    assert len(open_face_dataset(csv)) == 5  # training: as listed
    with pytest.raises(DataError, match=r"line 6: .* is listed twice \(first on line 3\).*genuine pair") as err:
        open_face_dataset(csv, scored=True)
    assert "list.csv" in str(err.value)
    code, out, err = run_cli(["eval", "faces", "mbf", "--data", csv], monkeypatch, capsys)
    assert code == 2 and "listed twice" in err and "Traceback" not in err, (out, err)
    # the list named by a relative path, the repeat by the image's absolute path: still one image
    write_csv_list(tmp_path / "abs.csv", rows + [(str(tmp_path / rows[1][0]), rows[1][1])])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"line 6: .* is listed twice \(first on line 3\)"):
        open_face_dataset("abs.csv", scored=True)


def test_verification_bin_round_trip(tmp_path):
    imgs = images(6)
    path = write_verification_bin(tmp_path / "v.bin", list(imgs), [True, False, True])
    back, issame = read_verification_bin(path)
    assert len(back) == 6 and list(issame) == [True, False, True]
    assert np.abs(back[4].astype(int) - imgs[4].astype(int)).mean() < 3


def test_verification_bin_numpy_issame_accepted(tmp_path):
    from visrec.data.images import encode_jpeg

    bins = [encode_jpeg(im) for im in images(2)]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((bins, np.array([True])), protocol=2))
    _, issame = read_verification_bin(path)
    assert issame.tolist() == [True]


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/visrec-pwned",))


def test_malicious_bin_is_refused_and_nothing_runs(tmp_path):
    import os

    marker = "/tmp/visrec-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(DataError, match="refusing to load"):
        read_verification_bin(path)
    assert not os.path.exists(marker)


def test_open_face_dataset_autodetects(tmp_path, small_rec):
    from visrec.data.datasets import open_face_dataset

    ds = open_face_dataset(small_rec)
    x, y = ds[0]
    assert x.shape == (3, 112, 112) and -1 <= float(x.min()) and float(x.max()) <= 1 and y == 0
    write_image_folder(tmp_path / "f", zip(images(2), [0, 1]))
    assert open_face_dataset(tmp_path / "f").num_classes == 2
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(DataError, match=r"notes.txt: not a face data set: expected .* or a \.csv list$"):
        open_face_dataset(tmp_path / "notes.txt")
    # a caller that takes another kind too names it; a path that is not there says so, not "not a data set"
    with pytest.raises(DataError, match=r"a \.csv list or a \.bin pairs file$"):
        open_face_dataset(tmp_path / "notes.txt", also_accepted="a .bin pairs file")
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        open_face_dataset(tmp_path / "nowhere")
