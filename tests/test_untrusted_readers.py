"""Every reader of an untrusted file fails with a visrec error naming what is wrong (DESIGN: Untrusted input).

RecordIO labels from each image's own header in every layout InsightFace's tools write, cross-checked with
the identity ranges; verification .bin pickles that ask for a 1 TiB array; non-UTF-8 bytes in every text
format; decompression bombs; unknown model options.
"""

import os
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from visrec.data.images import decode_image, encode_jpeg
from visrec.data.recordio import MAGIC, RecordIOReader, RecordIOWriter, _encode_record, pack_payload
from visrec.data.verification import read_verification_bin
from visrec.errors import ConfigError, DataError

_JPEG = {}


def jpeg(shade: int) -> bytes:
    if shade not in _JPEG:
        _JPEG[shade] = encode_jpeg(np.full((112, 112, 3), shade, np.uint8))
    return _JPEG[shade]


def write_rec(directory, records, prop=None):
    """``records``: (index, payload) in file order; the .idx lists them in that order, as MXIndexedRecordIO
    writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "train.rec", "wb") as rec, open(directory / "train.idx", "w") as idx:
        for k, payload in records:
            idx.write(f"{k}\t{rec.tell()}\n")
            rec.write(_encode_record(payload))
    if prop is not None:
        (directory / "property").write_text(prop)
    return directory


def insightface_layout(labels, *, header_last=False, identity_labels=None):
    """Images grouped by label (as given), identity records after them, record 0 the header: first in the
    file (InsightFace's face2rec) or last (rec_builder.py, whose header also sets id2 = 1)."""
    n = len(labels)
    groups = []
    for i, lab in enumerate(labels):
        if not groups or labels[groups[-1][0]] != lab:
            groups.append([i, i + 1])
        else:
            groups[-1][1] = i + 1
    images = [(i + 1, pack_payload(float(lab), jpeg(40 + 10 * (lab % 15)), i + 1)) for i, lab in enumerate(labels)]
    first_id = n + 1
    idents = [(first_id + c, pack_payload([s + 1, e + 1], b"", first_id + c)) for c, (s, e) in enumerate(groups)]
    header = (0, pack_payload([first_id, first_id + len(groups)], b"", 0, 1 if header_last else 0))
    return images + idents + [header] if header_last else [header] + images + idents


# ------------------------------------------------------------------------------------------------- RecordIO

def test_recordio_labels_are_the_image_headers_and_stable_across_opens(tmp_path):
    """The regression: labels came from np.empty, filled only where identity ranges reached."""
    with RecordIOWriter(tmp_path) as w:
        for i, lab in enumerate([1, 0, 2, 2, 0, 1]):
            w.add(np.full((112, 112, 3), 30 * i, np.uint8), lab)
    opened = [RecordIOReader(tmp_path) for _ in range(3)]
    for r in opened:
        assert r.labels.tolist() == [0, 0, 1, 1, 2, 2] and r.num_classes == 3
        assert r.identity_ranges == [(1, 3), (3, 5), (5, 7)]
    # the label each image record carries, read independently of the reader's arrays
    assert [int(opened[0].read_record(k)[1][0]) for k in range(1, 7)] == [0, 0, 1, 1, 2, 2]


def test_header_without_identity_records_takes_labels_from_images(tmp_path):
    # record 0 says identity records 4..3 (none): the old reader's labels were uninitialised memory
    recs = [(0, pack_payload([4, 4], b""))] + [(k, pack_payload(float(lab), jpeg(90), k))
                                               for k, lab in zip((1, 2, 3), (2, 0, 2))]
    r = RecordIOReader(write_rec(tmp_path, recs, prop="3,112,112"))
    assert r.labels.tolist() == [2, 0, 2] and r.num_classes == 3 and r.identity_ranges == []


def test_rec_builder_layout_header_written_last_with_label_gaps(tmp_path):
    # rec_builder.RecBuilder: labels strictly increasing but may skip; property = max label + 1
    labels = [0, 0, 3, 7, 7, 7]
    r = RecordIOReader(write_rec(tmp_path, insightface_layout(labels, header_last=True), prop="8,112,112\n"))
    assert r.labels.tolist() == labels and r.num_classes == 8
    assert r.identity_ranges == [(1, 3), (3, 4), (4, 7)]
    assert r.read_record(0)[3] == 1  # rec_builder's header id2
    assert abs(int(r.image(3).mean()) - (40 + 10 * 7)) < 3


def test_shuffled_list_without_header(tmp_path):
    # SeqRecBuilder / im2rec: no header record, images in any label order, the .idx in shuffled order
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 12).tolist()
    recs = [(k, pack_payload(float(lab), jpeg(50), k)) for k, lab in enumerate(labels)]
    order = rng.permutation(len(recs))
    r = RecordIOReader(write_rec(tmp_path, [recs[i] for i in order]))
    assert r.labels.tolist() == labels and r.identity_ranges == []
    assert r.num_classes == max(labels) + 1 and len(r) == 12


@pytest.mark.parametrize("with_header", [False, True])
def test_multi_float_labels_take_the_first_float(tmp_path, with_header):
    labels = [0, 0, 1, 2]
    payloads = [pack_payload([float(lab), 33.0, 0.5], jpeg(70)) for lab in labels]  # flag 3: class, age, ...
    if with_header:
        recs = insightface_layout(labels)
        recs = [recs[0]] + [(k, p) for k, p in zip(range(1, 5), payloads)] + recs[5:]
    else:
        recs = list(enumerate(payloads))
    r = RecordIOReader(write_rec(tmp_path, recs))
    assert r.read_record(1 if with_header else 0)[0] == 3
    assert r.labels.tolist() == labels and r.num_classes == 3
    assert r.image(0).shape == (112, 112, 3)


@pytest.mark.parametrize("label, why", [(-1.0, "negative"), (2.5, "not a whole number"),
                                        (float("nan"), "NaN or inf"), (float("inf"), "NaN or inf"),
                                        (3e9, "not below 2\\^24")])
@pytest.mark.parametrize("with_header", [False, True])
def test_bad_labels_name_the_record(tmp_path, label, why, with_header):
    labels = [0, 0, 1, 1]
    recs = insightface_layout(labels) if with_header else [(k, pack_payload(float(v), jpeg(60), k))
                                                          for k, v in enumerate(labels)]
    k = 3 if with_header else 2
    recs = [(i, pack_payload(label, jpeg(60), i) if i == k else p) for i, p in recs]
    with pytest.raises(DataError, match=rf"train\.rec, record {k}: class label .*{why}"):
        RecordIOReader(write_rec(tmp_path, recs))


def test_header_label_disagreeing_with_identity_range(tmp_path):
    recs = insightface_layout([0, 0, 1, 1])
    recs[2] = (2, pack_payload(1.0, jpeg(60), 2))  # image 2 lies in identity 0's range [1, 3)
    with pytest.raises(DataError, match=r"record 2: header label 1 disagrees with identity record 5"):
        RecordIOReader(write_rec(tmp_path, recs))


def test_identity_ranges_must_cover_each_image_once_with_distinct_labels(tmp_path):
    recs = insightface_layout([0, 0, 1, 1])
    uncovered = list(recs)
    uncovered[5] = (5, pack_payload([1, 2], b""))  # image 2 in no range
    with pytest.raises(DataError, match=r"record 2: image record 2 is in no identity range"):
        RecordIOReader(write_rec(tmp_path / "a", uncovered))
    overlap = list(recs)
    overlap[6] = (6, pack_payload([2, 5], b""))  # image 2 in both ranges
    with pytest.raises(DataError, match=r"record 2: image record 2 lies in the ranges of identity records 5 and 6"):
        RecordIOReader(write_rec(tmp_path / "b", overlap))
    same = insightface_layout([0, 0, 1, 1])
    same[3:5] = [(3, pack_payload(0.0, jpeg(1), 3)), (4, pack_payload(0.0, jpeg(1), 4))]
    with pytest.raises(DataError, match=r"record 6: identity records 5 and 6 both hold label 0"):
        RecordIOReader(write_rec(tmp_path / "c", same))
    outside = list(recs)
    outside[6] = (6, pack_payload([3, 9], b""))
    with pytest.raises(DataError, match=r"record 6: identity range \[3, 9\) is not a range of the image records"):
        RecordIOReader(write_rec(tmp_path / "d", outside))


def test_one_label_header_and_absurd_header_ranges(tmp_path):
    recs = insightface_layout([0, 1])
    one = [(0, struct.pack("<IfQQ", 1, 0.0, 0, 0) + np.float32([3]).tobytes())] + recs[1:]
    with pytest.raises(DataError, match=r"record 0: face-set header .*holds 1 label; it needs 2"):
        RecordIOReader(write_rec(tmp_path / "a", one))
    huge = [(0, pack_payload([3, 1e15], b""))] + recs[1:]
    with pytest.raises(DataError, match=r"record 0: header names records up to 999999986991103, the index holds only 5"):
        RecordIOReader(write_rec(tmp_path / "b", huge))
    frac = [(0, pack_payload([2.5, 5], b""))] + recs[1:]
    with pytest.raises(DataError, match=r"record 0: header's first identity record 2.5 is not a whole record number"):
        RecordIOReader(write_rec(tmp_path / "c", frac))


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except DataError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_record_lengths_and_counts_are_bounded_by_the_file(tmp_path):
    recs = [(k, pack_payload(float(k % 2), jpeg(80), k)) for k in range(4)]
    d = write_rec(tmp_path, recs)
    data = bytearray((d / "train.rec").read_bytes())
    off = int((d / "train.idx").read_text().splitlines()[2].split("\t")[1])
    struct.pack_into("<I", data, off + 4, (1 << 29) - 1)  # lrecord: a 512 MiB record in a tiny file
    (d / "train.rec").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"record 2: truncated record: 536870911 bytes announced"):
        RecordIOReader(d)
    assert peak_bytes(lambda: RecordIOReader(d)) < 16 << 20
    struct.pack_into("<II", data, off + 4, 28, 0xFFFFFFFF)  # flag: 4 billion label floats
    (d / "train.rec").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"record 2: header announces 4294967295 labels"):
        RecordIOReader(d)
    assert peak_bytes(lambda: RecordIOReader(d)) < 16 << 20


def test_idx_and_property_errors_name_file_and_line(tmp_path):
    d = write_rec(tmp_path, [(k, pack_payload(0.0, jpeg(80), k)) for k in range(2)], prop="1,112,112")
    idx = (d / "train.idx").read_bytes()
    (d / "train.idx").write_bytes(idx + b"2\t-40\n")
    with pytest.raises(DataError, match=r"train\.idx, record line 3: index 2 / offset -40 out of range"):
        RecordIOReader(d)
    (d / "train.idx").write_bytes(idx + b"0\t0\n")
    with pytest.raises(DataError, match=r"train\.idx, record line 3: record 0 is listed twice \(first on line 1\)"):
        RecordIOReader(d)
    first_offset = idx.split(b"\n")[0].split(b"\t")[1]
    (d / "train.idx").write_bytes(idx + b"2\t" + first_offset + b"\n")  # a new index, an old record's offset
    with pytest.raises(DataError, match=r"train\.idx, record line 3: record 2 starts at byte \d+, as record 0 "
                                        r"\(line 1\) does"):
        RecordIOReader(d)
    (d / "train.idx").write_bytes(idx.replace(b"1\t", b"\xff\t"))
    with pytest.raises(DataError, match=r"train\.idx, record line 2: not UTF-8 text: byte 0xff"):
        RecordIOReader(d)
    (d / "train.idx").write_bytes(idx)
    (d / "property").write_bytes(b"\xef\xbb\xbf1,112,112\r\n")  # BOM and CRLF: fine
    assert RecordIOReader(d).num_classes == 1
    (d / "property").write_bytes(b"1,112,112\n\xc3(\n")
    with pytest.raises(DataError, match=r"property, record line 2: not UTF-8"):
        RecordIOReader(d)


def test_recordio_magic_in_payload_round_trips_through_the_header_scan(tmp_path):
    # a split record (cflag 1/3) takes the slow path of the header scan; its label must come out the same
    data = jpeg(100) + b"\x00" * (-len(jpeg(100)) % 4) + struct.pack("<I", MAGIC) + b"tail"
    recs = [(0, pack_payload(1.0, data, 0)), (1, pack_payload(0.0, jpeg(20), 1))]
    r = RecordIOReader(write_rec(tmp_path, recs))
    assert r.labels.tolist() == [1, 0] and r.read_record(0)[4] == data


# ------------------------------------------------------------------------------------------ verification .bin

TIB = 1 << 40


def long1(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def bin_cases():
    good = pickle.dumps((np.zeros(4, bool)), protocol=2)
    state_shape = good.replace(b"K\x04\x85", long1(TIB) + b"\x85")  # _reconstruct, then a 1 TiB state
    assert state_shape != good
    proto5 = pickle.dumps(np.zeros(4, bool), protocol=5)
    fromb = proto5.replace(b"K\x04\x85", long1(TIB) + b"\x85")  # _frombuffer with a 1 TiB shape
    assert fromb != proto5
    wrap = lambda body: b"\x80\x02" + body  # noqa: E731
    return {
        "bytearray": (wrap(b"c__builtin__\nbytearray\n" + long1(TIB) + b"\x85R."), "bytearray"),
        "bytes": (wrap(b"c__builtin__\nbytes\n" + long1(TIB) + b"\x85R."), "bytes"),
        "ndarray": (wrap(b"cnumpy\nndarray\n" + long1(TIB) + b"\x85\x85R."), "numpy.ndarray may only"),
        "reconstruct": (wrap(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + long1(TIB)
                             + b"\x85C\x01b\x87R."), "_reconstruct with shape"),
        "state": (state_shape, r"shape \(1099511627776,\) \(bool\) needs 1099511627776 bytes, the pickle holds 4"),
        "frombuffer": (fromb, r"shape \(1099511627776,\) \(bool\) needs 1099511627776 bytes"),
        "object_dtype": (wrap(b"cnumpy\ndtype\nX\x02\x00\x00\x00O8\x85R."), "not a plain numeric type"),
        "memo": (wrap(b"N\x72\xff\xff\xff\xff0N."), "not a verification .bin"),  # LONG_BINPUT 2^32-1
        "bytearray8": (b"\x80\x05\x96" + struct.pack("<Q", TIB) + b"\x01\x00.", "BYTEARRAY8 announces 1099511627776"),
    }


@pytest.mark.parametrize("case", sorted(bin_cases()))
def test_bin_cannot_make_a_1_tib_allocation(tmp_path, case):
    data, pattern = bin_cases()[case]
    path = tmp_path / f"{case}.bin"
    path.write_bytes(data)
    with pytest.raises(DataError, match=pattern):
        read_verification_bin(path)
    assert peak_bytes(lambda: read_verification_bin(path)) < 8 << 20


def test_a_bin_that_is_no_pickle_is_named_as_such(tmp_path):
    """Text or junk gave pickle's own words ('Memo value not found at index 101') with nothing saying what the
    file should have been."""
    for name, data in (("text.bin", b"a plain text file\nwith lines\n"), ("junk.bin", b"junk")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=rf"{name}: not a verification \.bin \(pickle of \(images, issame\)\)"):
            read_verification_bin(tmp_path / name)


def test_bin_with_numpy_arrays_still_reads(tmp_path):
    bins = [jpeg(50), jpeg(60), jpeg(70), jpeg(80)]
    for proto in (2, 4, 5):
        for issame in (np.array([True, False]), np.array([1, 0], ">i8"), [np.True_, np.False_]):
            path = tmp_path / "v.bin"
            path.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in bins], issame), protocol=proto))
            images, got = read_verification_bin(path)
            assert got.tolist() == [True, False] and len(images) == 4


# ------------------------------------------------------------------------------------------------ text files

def _text_readers(tmp_path):
    """(name, file to spoil, its good text, the reader call) for every text format."""
    from visrec.data import landmarks as L
    from visrec.data import products as P
    from visrec.data.folders import read_csv_list
    from visrec.data.video import read_frame_scores, read_video_list

    (tmp_path / "a.jpg").write_bytes(jpeg(10))
    (tmp_path / "b.jpg").write_bytes(jpeg(11))
    xy = "".join(f"{10 + i} {20 + i}\n" for i in range(3))
    wflw = " ".join(["1.0"] * 196 + ["0", "0", "50", "50"] + ["0"] * 6 + ["a.jpg"]) + "\n"
    return [
        ("landmark.txt", "3\n" + xy, lambda p: L.read_landmark_txt(p)),
        ("box.rect", "1 2 30 40\n", lambda p: L.read_rect(p)),
        ("face.pts", "version: 1\nn_points: 3\n{\n" + xy + "}\n", lambda p: L.read_pts(p)),
        ("wflw.txt", wflw * 2, lambda p: L.read_wflw(p)),
        ("pose.txt", "10.0 -5.0 2.0\n", lambda p: L.read_pose_txt(p)),
        ("videos.csv", "v1,a.jpg,alice\nv2,b.jpg,bob\n", lambda p: read_video_list(p)),
        ("scores.txt", "0.9\n0.8\n0.7\n", lambda p: read_frame_scores(p.parent, 3)),
        ("list.csv", "path,label\na.jpg,0\na.jpg,1\n", lambda p: read_csv_list(p)),
        ("val.csv", "q1,c1,c2\nq2,c3\n", lambda p: P.read_ground_truth(p)),
        ("submission.csv", "q1," + ",".join(f"c{i}" for i in range(7)) + "\n", lambda p: P.read_submission(p)),
        ("catalogue_products.csv", "c1,p1\nc2,p2\n", lambda p: P.read_product_labels(p)),
    ]


@pytest.mark.parametrize("index", range(11))
def test_text_formats_name_file_and_line_of_a_non_utf8_byte(tmp_path, index):
    name, text, read = _text_readers(tmp_path)[index]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # BOM + CRLF: still reads
    read(path)
    lines = text.encode().split(b"\n")
    line = 2 if len(text.splitlines()) > 1 else 1
    lines[line - 1] = lines[line - 1][:1] + b"\xe9" + lines[line - 1][1:]  # Latin-1 'e acute', column 2
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{name}, record line {line}: not UTF-8 text: byte 0xe9 at column 2"):
        read(path)


def test_jd_dir_reports_non_utf8_in_landmark_and_rect_files(tmp_path):
    from visrec.data.landmarks import read_jd_dir
    from visrec.data.synth import write_synthetic_jd

    root = write_synthetic_jd(tmp_path / "jd", 1)
    rect = next((root / "rect").glob("*.rect"))
    rect.write_bytes(b"1 2 3 \xff4\n")
    with pytest.raises(DataError, match=r"\.rect, record line 1: not UTF-8"):
        read_jd_dir(root)
    rect.unlink()
    ann = next((root / "landmark").glob("*.txt"))
    ann.write_bytes(ann.read_bytes().replace(b"\n", b"\n\x80", 1))
    with pytest.raises(DataError, match=r"\.jpg\.txt, record line 2: not UTF-8"):
        read_jd_dir(root)


# ------------------------------------------------------------------------------------------ images, configs

def test_decompression_bomb_is_refused_before_decoding():
    import zlib

    # a 100000 x 100000 grey PNG: a header and a few bytes of deflate stream
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + body)))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(DataError, match=r"record 7: image header declares 100000x100000 pixels"):
        decode_image(png, source="x.png", record=7)
    # and a JPEG whose frame header claims 60000 x 60000
    j = bytearray(jpeg(10))
    sof = j.index(b"\xff\xc0")
    struct.pack_into(">HH", j, sof + 5, 60000, 60000)
    with pytest.raises(DataError, match="declares 60000x60000"):
        decode_image(bytes(j))


def test_png_chunk_longer_than_the_file_is_refused_before_opencv_allocates_it():
    import cv2

    ok, buf = cv2.imencode(".png", np.full((112, 112, 3), 90, np.uint8))
    png = bytearray(buf.tobytes())
    idat = png.index(b"IDAT") - 4
    struct.pack_into(">I", png, idat, 0x41002000)  # OpenCV's reader would allocate these 1 GiB first
    with pytest.raises(DataError, match=r"PNG chunk b'IDAT' at byte 33 announces 1090527232 bytes"):
        decode_image(bytes(png), source="f.png")


def test_unknown_model_option_is_a_config_error_naming_it():
    import torch

    from visrec.config import parse_config
    from visrec.models import build_backbone
    from visrec.train.faces_task import FaceTask
    from visrec.train.task import RunContext

    cfg = parse_config({"model": {"name": "mobilefacenet", "embeding_size": 128}, "schedule": {"max_steps": 1},
                        "data": {"train": "/tmp/x"}})
    task = FaceTask(cfg, RunContext(device=torch.device("cpu")), "run.yaml")
    with pytest.raises(ConfigError, match=r"backbone 'mobilefacenet' has no option 'embeding_size'; its options: "
                                          r"embedding_size, blocks, scale"):
        task.build_modules(10)
    with pytest.raises(ConfigError, match=r"backbone 'iresnet' needs option 'layers'"):
        build_backbone("iresnet")


def test_device_or_pipe_behind_a_data_file_name_is_refused(tmp_path):
    import os

    from visrec.data.folders import read_csv_list
    from visrec.data.landmarks import read_landmark_txt

    folder = tmp_path / "faces" / "alice"
    folder.mkdir(parents=True)
    (folder / "a.jpg").symlink_to("/dev/zero")  # reading it would never end
    os.mkfifo(folder / "b.jpg")  # nor would this one (it blocks until a writer comes)
    (tmp_path / "faces" / "list.csv").write_text("alice/a.jpg,0\nalice/b.jpg,1\n")
    listing = read_csv_list(tmp_path / "faces" / "list.csv")
    for i in range(2):
        with pytest.raises(DataError, match=r"\.jpg: not a regular file"):
            listing.image(i)
    with pytest.raises(DataError, match=r"b\.jpg: not a regular file"):
        read_landmark_txt(folder / "b.jpg")
    # a video named by a video list, or handed to the tracker: said to be a pipe, not "not found"
    from visrec.data.video import read_frames
    from visrec.faces.tracking import iter_frames

    os.mkfifo(folder / "clip.mp4")
    with pytest.raises(DataError, match=r"clip\.mp4, record video v1: not a regular file"):
        read_frames(folder / "clip.mp4", "v1")
    with pytest.raises(DataError, match=r"clip\.mp4: not a regular file"):
        next(iter_frames(folder / "clip.mp4"))


def _readers_of_named_files():
    """(name, what reads a file at PATH) for every reader of a file a user names outside a data set: model
    files, a gallery export, a study journal, an index, teacher features, a gallery, a resumed prepare."""
    from visrec._npz import load_npz
    from visrec._onnx import open_session
    from visrec._torchfile import read_torch_file
    from visrec.budget import check
    from visrec.data.prepare import JOURNAL, Journal
    from visrec.index.catalogue import MANIFEST, CatalogueIndex, _read_ids
    from visrec.index.faiss_index import FaissIndex
    from visrec.index.gallery.store import GalleryFile
    from visrec.models.dlib_dnn import read_dlib_resnet
    from visrec.models.loading import load_model
    from visrec.models.zoo import graph_normalises_input
    from visrec.search.study import open_storage
    from visrec.train.distill_task import load_teacher_features

    return {
        "torch file": ("model.pt", read_torch_file),
        "model (checkpoint)": ("model.pt", load_model),
        "model (ONNX)": ("model.onnx", load_model),
        "ONNX session": ("model.onnx", open_session),
        "budget of an ONNX file": ("model.onnx", lambda p: check(p, "deepglint-light")),
        "insightface zoo ONNX": ("w600k.onnx", graph_normalises_input),
        "dlib model": ("dlib.dat", read_dlib_resnet),
        "gallery export": ("gallery.npz", lambda p: load_npz(p, "gallery export")),
        "FAISS index": ("index.faiss", FaissIndex.load),
        "catalogue manifest": (MANIFEST, lambda p: CatalogueIndex(p.parent)),
        "catalogue ids (an index whose manifest records no files)": ("ids.txt", _read_ids),
        "search journal": ("study.journal", lambda p: open_storage(str(p), p.parent)),
        "FAISS gallery file": ("gallery.sqlite", GalleryFile),
        "teacher features": ("teacher.npy", lambda p: p.with_suffix(".json").write_text("{}")  # its sidecar
                             and load_teacher_features(p, model_config={}, num_items=1, flip_average=True)),
        "prepare journal": (JOURNAL, lambda p: Journal(p.parent, {})),
    }


@pytest.mark.parametrize("kind", ["pipe", "device"])
def test_a_pipe_or_device_where_a_model_gallery_journal_or_index_file_belongs_is_refused(tmp_path, kind):
    """A FIFO named like a model file hung `visrec budget check` (and eval, export, gallery import, search
    report, products search) forever: its reader waited for a writer; a device never ends. Every reader of a
    file a user names outside a data set refuses it first, naming the file. SIGALRM turns a hang into a
    failure."""
    import signal

    def hung(signum, frame):
        raise TimeoutError("the reader blocked on the pipe")

    previous = signal.signal(signal.SIGALRM, hung)
    try:
        for name, (file_name, reader) in _readers_of_named_files().items():
            folder = tmp_path / kind / name.replace(" ", "_").replace("(", "").replace(")", "")
            folder.mkdir(parents=True)
            path = folder / file_name
            os.mkfifo(path) if kind == "pipe" else path.symlink_to("/dev/zero")
            signal.alarm(20)
            try:
                with pytest.raises(DataError, match="not a regular file") as caught:
                    reader(path)
            finally:
                signal.alarm(0)
            assert file_name in str(caught.value), (name, str(caught.value))
    finally:
        signal.signal(signal.SIGALRM, previous)
    from visrec.index.gallery.milvus import MilvusGallery

    with pytest.raises(DataError, match="a Milvus Lite gallery is a folder"):  # its database is a folder
        MilvusGallery(uri=path)  # the last pipe or device: the prepare journal's


def test_evaluation_lists_and_yaml_configs_are_utf8_with_errors_naming_file_and_line(tmp_path):
    from visrec.config import read_yaml_mapping
    from visrec.errors import VisrecError
    from visrec.evaluate.ijb import read_1n_csv, read_template_pairs, read_tid_mid
    from visrec.evaluate.lfr import read_filelist
    from visrec.protocols import load_protocol

    cases = {
        "filelist.txt": (read_filelist, b"a.jpg\nb\xff.jpg\n"),
        "tid_mid.txt": (read_tid_mid, b"a.jpg 1 1\nb\xfe.jpg 2 2\n"),
        "pairs.txt": (read_template_pairs, b"1 2 1\n3 4 \xff\n"),
        "gallery.csv": (read_1n_csv, b"TEMPLATE_ID,SUBJECT_ID\n1,\xff\n"),
        "run.yaml": (read_yaml_mapping, b"task: faces\nname: \xff\n"),
        "proto.yaml": (load_protocol, b"name: x\nnote: \xff\n"),
    }
    for name, (reader, raw) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(VisrecError) as err:
            reader(tmp_path / name)
        assert name in str(err.value) and "line 2" in str(err.value), (name, str(err.value))


def _progressive_jpeg(side: int, extra_scans: int) -> bytes:
    """A grey progressive JPEG whose last scan is repeated ``extra_scans`` more times: each copy is a few bytes,
    and each makes a decoder pass over every pixel again."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    end = data.rindex(b"\xff\xd9")
    last = data[data.rindex(b"\xff\xda"):end]
    return data[:end] + last * extra_scans + b"\xff\xd9"


def test_a_jpeg_of_endless_scans_is_refused_before_decoding():
    from visrec.data.images import MAX_JPEG_SCANS, jpeg_scans

    honest = _progressive_jpeg(512, 0)
    assert jpeg_scans(honest) == 6 and decode_image(honest).shape == (512, 512, 3)  # libjpeg's grey script
    assert jpeg_scans(jpeg(10)) == 1
    at_limit = _progressive_jpeg(512, MAX_JPEG_SCANS - 6)
    assert jpeg_scans(at_limit) == MAX_JPEG_SCANS and decode_image(at_limit).shape == (512, 512, 3)
    bomb = _progressive_jpeg(512, MAX_JPEG_SCANS - 5)
    with pytest.raises(DataError, match=rf"x.jpg: JPEG holds more than {MAX_JPEG_SCANS} scans"):
        decode_image(bomb, source="x.jpg")
    # start-of-scan bytes inside a comment segment (metadata) are not scans
    j = jpeg(10)
    comment = b"\xff\xda" * 300
    noisy = j[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + j[2:]
    assert jpeg_scans(noisy) == 1 and decode_image(noisy).shape == (112, 112, 3)


def test_decoder_refusals_over_http_name_the_bomb(tiny_face_model):
    pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
    from fastapi.testclient import TestClient

    from visrec.serve.app import create_app
    from visrec.serve.config import ServeConfig

    c = TestClient(create_app(ServeConfig(faces={"model": str(tiny_face_model), "aligned": True,
                                                 "gallery": {"backend": "faiss"}})))
    r = c.post("/v1/faces/detect", files={"image": _progressive_jpeg(256, 500)})
    assert r.status_code == 413 and "scans" in r.json()["error"], r.text
