"""RecordIO sizes bounded by the data: the class count a label sets, split-record parts, the property file."""

import struct

import numpy as np
import pytest

from visrec.data.images import encode_jpeg
from visrec.data.recordio import RecordIOReader, _encode_record, pack_payload
from visrec.errors import DataError

JPEG = encode_jpeg(np.full((112, 112, 3), 90, np.uint8))


def write_list(directory, labels, prop=None):
    """A plain list (no header record): one image record per label, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "train.rec", "wb") as rec, open(directory / "train.idx", "w") as idx:
        for k, lab in enumerate(labels):
            idx.write(f"{k}\t{rec.tell()}\n")
            rec.write(_encode_record(pack_payload(float(lab), JPEG, k)))
    if prop is not None:
        (directory / "property").write_text(prop)
    return directory


def test_one_label_cannot_make_millions_of_classes(tmp_path):
    # the old reader took 2^24 classes from the second label (PartialFC then sized a 32 GiB classifier)
    with pytest.raises(DataError, match=r"train\.rec, record 1: class label 16777215 makes 16777216 classes.*"
                                        r"2 distinct labels"):
        RecordIOReader(write_list(tmp_path / "a", [0, 16777215]))
    with pytest.raises(DataError, match=r"record 3: class label 99 makes 100 classes"):
        RecordIOReader(write_list(tmp_path / "b", [0, 1, 2, 99, 1]))


def test_label_gaps_of_rec_builder_sets_still_read(tmp_path):
    r = RecordIOReader(write_list(tmp_path / "a", [0, 0, 3, 7, 7, 7], prop="8,112,112"))
    assert r.num_classes == 8
    assert RecordIOReader(write_list(tmp_path / "b", [4, 1, 4])).num_classes == 5


def test_a_first_part_without_its_continuation_is_refused(tmp_path):
    d = write_list(tmp_path, [0, 1, 1])
    rec = bytearray((d / "train.rec").read_bytes())
    lrec = struct.unpack_from("<I", rec, 4)[0]
    struct.pack_into("<I", rec, 4, lrec | 1 << 29)  # record 0 says "first part of a split"
    (d / "train.rec").write_bytes(bytes(rec))
    with pytest.raises(DataError, match=r"train\.rec, record 0: split record broken"):
        RecordIOReader(d)


@pytest.mark.parametrize("text", ["2,abc,-1", "2,112,0", "2,112", "2,112,112,3", ""])
def test_property_sides_are_checked(tmp_path, text):
    with pytest.raises(DataError, match=r"property, record line 1: expected 'num_classes,height,width'"):
        RecordIOReader(write_list(tmp_path, [0, 1], prop=text))
