"""InsightFace RecordIO (``train.rec`` / ``train.idx`` / ``property``), read and written without MXNet.

Binary layout (dmlc-core recordio + MXNet's ``recordio.pack``):
  record   = uint32 magic 0xced7230a, uint32 lrecord, payload, zero padding to a multiple of 4 bytes.
             lrecord's upper 3 bits are cflag (0 whole record; 1 first, 2 middle, 3 last part of a record
             split where the payload contained the magic), lower 29 bits the part's length.
  payload  = IRHeader ``struct 'IfQQ'`` (flag uint32, label float32, id uint64, id2 uint64); when flag > 0
             the single label field is ignored and ``flag`` float32 labels follow the header; then the
             image bytes (InsightFace packs JPEGs encoded by OpenCV from BGR arrays, so decoding with
             cv2.imdecode gives BGR; we return RGB).
  .idx     = text lines ``index\\toffset`` (byte offset of the record's magic).
  property = text ``num_classes,height,width``.
Face-set layout as InsightFace writes it: record 0 is a header with flag=2 and labels
(first identity-record index, end of identity records) and no image; images are records 1..N-1; records
N..end-1 hold one identity each, with labels [first image index, end image index). ``rec_builder.py``
writes record 0 last in the file (the ``.idx`` finds it anywhere). Sets without that header (record 0 an
image: ``im2rec``, ``SeqRecBuilder``, shuffled lists) are plain lists of every indexed record.
Either way an image's class is its own header label, as arcface_torch reads it (flag 0: the header's
float; flag > 0: the first of the label floats); identity records, where they exist, are cross-checked
against those labels (``RecordIOReader``).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from array import array
from pathlib import Path

import numpy as np

from visrec._files import replacing, writing_into
from visrec.data.images import decode_image
from visrec.data.text import read_lines
from visrec.errors import DataError

MAGIC = 0xCED7230A
_HEADER = struct.Struct("<IfQQ")
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
MAX_LABEL = 1 << 24  # class labels are float32: every integer below 2^24 is exact, none above is safe
# the least share of the class ids 0..max label that must hold an image: the largest label sets the class
# count (a classifier row each), so that count is bounded by the data, at most 4 rows per image
# (``RecordIOReader._class_count``); rec_builder's sets skip some labels, none skip most
MIN_CLASS_FILL = 0.25
MAX_SIDE = 1 << 15  # the largest image side a ``property`` file may declare (pixels)
# what ``RecordIOReader`` reads of each record when it opens a set: magic, lrecord, IRHeader, 2 label floats
_PEEK = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                  ("id2", "<u8"), ("l0", "<f4"), ("l1", "<f4")])


def _resolve(directory: str | Path) -> tuple[Path, Path, Path]:
    d = Path(directory)
    if d.suffix == ".rec":
        rec = d
        d = d.parent
    else:
        rec = d / "train.rec"
    return rec, rec.with_suffix(".idx"), d / "property"


def pack_payload(labels: float | list[float] | np.ndarray, data: bytes, record_id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + optional multi-label floats + data, as MXNet's recordio.pack."""
    arr = np.atleast_1d(np.asarray(labels, dtype=np.float32))
    if arr.size == 1:
        return _HEADER.pack(0, float(arr[0]), record_id, id2) + data
    return _HEADER.pack(arr.size, 0.0, record_id, id2) + arr.tobytes() + data


def unpack_payload(payload: bytes) -> tuple[int, np.ndarray, int, int, bytes]:
    if len(payload) < _HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, rid, id2 = _HEADER.unpack_from(payload)
    body = payload[_HEADER.size:]
    if flag > 0:
        need = 4 * flag
        if len(body) < need:
            raise ValueError(f"header announces {flag} labels but only {len(body)} bytes follow")
        labels = np.frombuffer(body[:need], dtype=np.float32).copy()
        body = body[need:]
    else:
        labels = np.array([label], dtype=np.float32)
    return flag, labels, rid, id2, body


def _encode_record(payload: bytes) -> bytes:
    """Split around embedded magic words like dmlc-core does (cflag parts), then pad each part."""
    parts, start = [], 0
    while True:
        pos = payload.find(_MAGIC_BYTES, start)
        # dmlc only splits at 4-byte aligned magic occurrences
        while pos != -1 and pos % 4:
            pos = payload.find(_MAGIC_BYTES, pos + 1)
        if pos == -1:
            parts.append(payload[start:])
            break
        parts.append(payload[start:pos])
        start = pos + 4
    out = bytearray()
    for i, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if i == 0 else (3 if i == len(parts) - 1 else 2))
        if len(part) >= 1 << 29:
            raise ValueError("record part longer than 2^29 bytes")
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(part)) + part
        out += b"\x00" * (-len(part) % 4)
    return bytes(out)


class RecordIOWriter:
    """Writes an InsightFace face set. Images may arrive in any label order; they are grouped by identity
    on close (record 0 header, images 1..N, identity records), as InsightFace's packer lays them out.

    Memory holds three numbers an image, never the images: each JPEG goes to a nameless spill file beside the
    output as it arrives (the kernel frees it when the writer ends, however it ends) and is copied into
    ``train.rec`` in identity order on close. Held in a list, a 500,000-photo ``visrec data prepare faces
    --format recordio`` needed its whole JPEG bytes (gigabytes) in memory before the first record was written.
    Disk: the spill and the new ``.rec`` side by side while closing."""

    def __init__(self, directory: str | Path, *, quality: int = 95):
        self.rec, self.idx, self.prop = _resolve(directory)
        self.rec.parent.mkdir(parents=True, exist_ok=True)
        self.quality = quality
        self._spill = tempfile.TemporaryFile(dir=self.rec.parent)  # O_TMPFILE: no name a kill could leave
        self._labels, self._offsets, self._lengths = array("q"), array("q"), array("q")
        self._shape: tuple[int, int] | None = None

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(OSError):  # its buffered bytes fail again on a full disk: the first error
                self._spill.close()

    def add(self, image: np.ndarray | bytes, label: int) -> int:
        import cv2

        if isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            img = np.asarray(image)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"image must be HxWx3 uint8 RGB, got {img.dtype} {img.shape}")
            self._shape = self._shape or img.shape[:2]
            ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            if not ok:
                raise ValueError("JPEG encoding failed")
            data = buf.tobytes()
        if int(label) < 0:
            raise ValueError(f"labels must be 0..C-1 with no gaps, got {label}")
        self._offsets.append(self._spill.tell())
        self._lengths.append(len(data))
        self._labels.append(int(label))
        with writing_into(self.rec):  # the spill file has no name: the set it was going to be is what failed
            self._spill.write(data)
        return len(self._labels)

    def close(self) -> None:
        try:
            self._write()
        finally:
            with contextlib.suppress(OSError):
                self._spill.close()

    def _write(self) -> None:
        labels = np.frombuffer(self._labels, dtype=np.int64)  # empty for a writer given no image
        counts = np.bincount(labels)
        if not counts.all():
            raise ValueError("labels must be 0..C-1 with no gaps")
        n_labels = len(counts)
        order = np.argsort(labels, kind="stable")  # by identity, arrival order within one
        first_id_rec = len(order) + 1
        ends = 1 + np.cumsum(counts)
        spill = self._spill
        spill.flush()
        # each file is renamed in whole (property, .idx, then .rec, as the blocks end); a kill between two renames
        # leaves a .rec and .idx of different writes, which the reader refuses (a bad magic or a header past the
        # index, naming the record), never misreads
        with replacing(self.rec) as tmp_rec, replacing(self.idx) as tmp_idx, replacing(self.prop) as tmp_prop:
            # a refused write naming no file is the .rec's (each replacing names its own temporary file)
            with writing_into(self.rec), open(tmp_rec, "wb") as rec, open(tmp_idx, "w", encoding="ascii") as idx:
                def put(index: int, payload: bytes) -> None:
                    idx.write(f"{index}\t{rec.tell()}\n")
                    rec.write(_encode_record(payload))

                put(0, pack_payload([first_id_rec, first_id_rec + n_labels], b""))
                for k, i in enumerate(order.tolist(), start=1):
                    spill.seek(self._offsets[i])
                    put(k, pack_payload(float(self._labels[i]), spill.read(self._lengths[i]), record_id=k))
                for c in range(n_labels):
                    start, end = int(ends[c] - counts[c]), int(ends[c])
                    put(first_id_rec + c, pack_payload([start, end], b"", record_id=first_id_rec + c))
            h, w = self._shape or (112, 112)
            tmp_prop.write_text(f"{n_labels},{h},{w}", encoding="ascii")


# what an offset that misses its record most often means: a .rec cut short, or a .idx of another write of the
# set (a copy of one file without the other, a packer killed between its renames)
APART = ("; the .idx does not describe this .rec (one was cut short or comes from another write): "
         "write the set again")


class RecordIOReader:
    """Random access to an InsightFace ``.rec`` through its ``.idx``. The file is opened lazily per
    process, so the reader can be handed to DataLoader workers.

    Labels are each image record's own header label, as arcface_torch reads them (flag 0: the header's float;
    flag > 0: the first of the label floats). Record 0 is a face-set header when it carries labels (flag >= 2)
    and no image bytes: its labels are [first identity record, end]; images are records 1 .. first - 1, in
    that order, wherever record 0 lies in the file (``rec_builder`` writes it last). Otherwise the set is a
    plain list (``im2rec``, ``SeqRecBuilder``, shuffled lists): every record in the index is an image, in
    index order. When identity records exist (each [first image, end) of one identity), they must agree
    with the image headers: every image inside exactly one range, one label per range, a different label
    per range.

    Everything is checked against the files before it sizes anything: a label must be a whole number in
    [0, 2^24) (float32 holds every integer below 2^24 exactly, and above it a label cannot name one class),
    header and identity ranges must lie inside the records the index holds, and a record's length must fit
    in the file; the class count (largest label + 1) must not leave more than 3/4 of the ids 0..max without
    an image. A violation is a ``DataError`` naming the file and the record (or the ``.idx``
    line).
    """

    def __init__(self, directory: str | Path):
        self.rec_path, self.idx_path, self.prop_path = _resolve(directory)
        if not self.rec_path.exists():
            raise DataError("RecordIO file not found", path=self.rec_path)
        if not self.idx_path.exists():
            raise DataError("index file missing (needed for random access; rebuild it with the packer)",
                            path=self.idx_path)
        self.offsets = self._read_idx()
        self._size = self.rec_path.stat().st_size
        self._fh = None
        self._pid = None
        header = self._face_set_header()
        if header is not None:
            first_id, end_id = header
            self.image_records = np.arange(1, first_id, dtype=np.int64)
            self.labels = self._image_labels(self.image_records)
            self.identity_ranges = self._identity_ranges(first_id, end_id)
        else:
            self.image_records = np.array(sorted(self.offsets), dtype=np.int64)
            self.labels = self._image_labels(self.image_records)
            self.identity_ranges = []
        self.num_classes = self._class_count()
        if self.prop_path.exists():
            declared = self._read_property()
            if declared != self.num_classes:
                raise DataError(f"declares {declared} classes but the records hold {self.num_classes}",
                                path=self.prop_path)

    # ------------------------------------------------------------------------------------------ opening

    def _read_idx(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        lines: dict[int, int] = {}
        for lineno, line in enumerate(read_lines(self.idx_path), start=1):
            if not line.strip():
                continue
            try:
                key, off = line.split("\t")
                key, off = int(key), int(off)
            except ValueError:
                raise DataError(f"not 'index<TAB>offset': {line[:80]!r}", path=self.idx_path,
                                record=f"line {lineno}") from None
            if not 0 <= key < 1 << 62 or not 0 <= off < 1 << 62:
                raise DataError(f"index {key} / offset {off} out of range", path=self.idx_path,
                                record=f"line {lineno}")
            if key in offsets:
                raise DataError(f"record {key} is listed twice (first on line {lines[key]})",
                                path=self.idx_path, record=f"line {lineno}")
            offsets[key], lines[key] = off, lineno
        # two keys at one offset would read one record twice (a face set scored over all pairs would count it as
        # a genuine pair of one image); sorted, not a second dict: millions of lines
        keys = np.fromiter(offsets, np.int64, len(offsets))
        offs = np.fromiter(offsets.values(), np.int64, len(offsets))
        order = np.argsort(offs, kind="stable")
        same = np.flatnonzero(offs[order][1:] == offs[order][:-1])
        if same.size:
            a, b = sorted((int(keys[order[same[0]]]), int(keys[order[same[0] + 1]])), key=lines.get)
            raise DataError(f"record {b} starts at byte {offsets[b]}, as record {a} (line {lines[a]}) does: one "
                            "record under two indices", path=self.idx_path, record=f"line {lines[b]}")
        return offsets

    def _read_property(self) -> int:
        lines = read_lines(self.prop_path)
        first = lines[0] if lines else ""
        try:
            fields = [int(v) for v in first.strip().split(",")]
            declared = fields[0]
            # height, width: positive pixel sides (InsightFace writes all three; older sets only the count)
            if declared < 0 or len(fields) not in (1, 3) or any(not 0 < v <= MAX_SIDE for v in fields[1:]):
                raise ValueError
        except ValueError:
            raise DataError(f"expected 'num_classes,height,width' (whole numbers, sides 1..{MAX_SIDE}), got "
                            f"{first[:80]!r}", path=self.prop_path,
                            record="line 1") from None
        return declared

    def _face_set_header(self) -> tuple[int, int] | None:
        """(first identity record, end) from record 0, or None for a plain list (module/class docstring)."""
        if 0 not in self.offsets:
            return None
        flag, labels, _, _, body = self.read_record(0)
        if flag == 0 or body:
            return None  # an image: record 0 of a list without a header
        if flag < 2:
            raise DataError(f"face-set header (labels, no image) holds {flag} label; it needs 2: the first "
                            "identity record and the end of the identity records", path=self.rec_path, record=0)
        first_id = self._whole(labels[0], "header's first identity record", 0)
        end_id = self._whole(labels[1], "header's end of identity records", 0)
        n = len(self.offsets)
        if not 1 <= first_id <= end_id:
            raise DataError(f"header labels [{first_id}, {end_id}) are not 1 <= first identity record <= end",
                            path=self.rec_path, record=0)
        if end_id > n:
            raise DataError(f"header names records up to {end_id - 1}, the index holds only {n} records"
                            + APART, path=self.rec_path, record=0)
        keys = np.fromiter(self.offsets, np.int64, n)
        inside = np.count_nonzero((keys >= 1) & (keys < end_id))
        if inside != end_id - 1:
            missing = next(k for k in range(1, end_id) if k not in self.offsets)
            raise DataError(f"record {missing} (header: images 1..{first_id - 1}, identity records "
                            f"{first_id}..{end_id - 1}) is not in the index", path=self.idx_path, record=missing)
        return first_id, end_id

    def _whole(self, value: float, what: str, record: int) -> int:
        if not math.isfinite(value) or value != math.floor(value) or not 0 <= value < 1 << 62:
            raise DataError(f"{what} {float(value)!r} is not a whole record number", path=self.rec_path,
                            record=record)
        return int(value)

    @np.errstate(invalid="ignore")  # a signalling-NaN label (bad data, reported later) warns when widened
    def _headers(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(flag, first label, second label (NaN when none), image byte count) of each record, read from the
        record headers only: one gather over a memory map for the usual whole records, ``read_record`` (which
        checks everything) for the rest."""
        n = len(records)
        flag = np.zeros(n, np.int64)
        first = np.zeros(n, np.float64)
        second = np.full(n, np.nan)
        body = np.zeros(n, np.int64)
        if n == 0:
            return flag, first, second, body
        offs = np.fromiter((self.offsets[int(r)] for r in records), np.int64, n)
        slow = np.ones(n, bool)
        if self._size >= _PEEK.itemsize:
            import mmap

            with open(self.rec_path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                buf = np.frombuffer(mm, np.uint8)
                try:
                    step = np.arange(_PEEK.itemsize)
                    for lo in range(0, n, 1 << 16):
                        o = offs[lo:lo + (1 << 16)]
                        inside = o + _PEEK.itemsize <= self._size
                        rows = np.zeros(len(o), _PEEK)
                        rows[inside] = buf[o[inside, None] + step].view(_PEEK).reshape(-1)
                        f = rows["flag"].astype(np.int64)
                        length = (rows["lrec"] & _LENGTH_MASK).astype(np.int64)
                        labels_len = _HEADER.size + 4 * f
                        ok = (inside & (rows["magic"] == MAGIC) & (rows["lrec"] >> 29 == 0)
                              & (length >= labels_len) & (o + 8 + length <= self._size)
                              & ((f == 0) | (length >= _HEADER.size + 4)))
                        sl = slice(lo, lo + len(o))
                        slow[sl] = ~ok
                        flag[sl] = f
                        first[sl] = np.where(f > 0, rows["l0"], rows["label"])
                        second[sl] = np.where((f > 1) & (length >= _HEADER.size + 8), rows["l1"], np.nan)
                        body[sl] = length - labels_len
                finally:
                    del buf
        for i in np.flatnonzero(slow):  # split, short or broken records: read in full (errors name them)
            f, labels, _, _, data = self.read_record(int(records[i]))
            flag[i], first[i], body[i] = f, labels[0], len(data)
            second[i] = labels[1] if len(labels) > 1 else np.nan
        return flag, first, second, body

    def _image_labels(self, records: np.ndarray) -> np.ndarray:
        _, label, _, _ = self._headers(records)
        bad = ~np.isfinite(label) | (label < 0) | (label != np.floor(label)) | (label >= MAX_LABEL)
        if bad.any():
            i = int(np.argmax(bad))
            v = float(label[i])
            why = ("is NaN or inf" if not math.isfinite(v) else "is negative" if v < 0 else
                   "is not a whole number" if v != math.floor(v) else
                   f"is not below 2^24 = {MAX_LABEL} (float32 labels are exact integers only below it)")
            raise DataError(f"class label {v:.9g} {why}", path=self.rec_path, record=int(records[i]))
        return label.astype(np.int64)

    def _class_count(self) -> int:
        """Classes = the largest label + 1, bounded by the images before anything is sized from it (a
        classifier row per class): at least a quarter of the labels 0..max must each be held by an image
        (:data:`MIN_CLASS_FILL`; image folders and CSV lists number their classes densely, with no gap at
        all). A ``DataError`` names the record holding the largest label."""
        if not len(self.labels):
            return 0
        top = int(np.argmax(self.labels))
        classes = int(self.labels[top]) + 1
        used = len(np.unique(self.labels))
        if used < MIN_CLASS_FILL * classes:
            raise DataError(f"class label {classes - 1} makes {classes} classes, but the {len(self.labels)} "
                            f"images hold only {used} distinct labels: labels must number the identities "
                            f"0..C-1, at least {MIN_CLASS_FILL:.0%} of them with images",
                            path=self.rec_path, record=int(self.image_records[top]))
        return classes

    def _identity_ranges(self, first_id: int, end_id: int) -> list[tuple[int, int]]:
        """Identity records first_id .. end_id - 1, checked against the image records and their labels."""
        n_img = first_id - 1
        records = np.arange(first_id, end_id, dtype=np.int64)
        flag, s, e, _ = self._headers(records)
        for c in range(len(records)):
            if flag[c] < 2 or not np.isfinite(e[c]):
                raise DataError(f"identity record holds {flag[c]} label(s); it needs 2: [first image, end)",
                                path=self.rec_path, record=int(records[c]))
        bad = ~(np.isfinite(s) & (s == np.floor(s)) & (e == np.floor(e)) & (1 <= s) & (s <= e) & (e <= first_id))
        if bad.any():
            c = int(np.argmax(bad))
            raise DataError(f"identity range [{s[c]:g}, {e[c]:g}) is not a range of the image records "
                            f"1..{n_img}", path=self.rec_path, record=int(records[c]))
        s, e = s.astype(np.int64), e.astype(np.int64)
        if len(records):
            cover = np.zeros(n_img + 1, np.int64)
            np.add.at(cover, s - 1, 1)
            np.add.at(cover, e - 1, -1)
            cover = np.cumsum(cover)[:n_img]
            if (cover > 1).any():
                img = int(np.argmax(cover > 1)) + 1
                owners = [int(r) for r, a, b in zip(records, s, e) if a <= img < b][:2]
                raise DataError(f"image record {img} lies in the ranges of identity records {owners[0]} and "
                                f"{owners[1]}", path=self.rec_path, record=img)
            if (cover == 0).any():
                img = int(np.argmax(cover == 0)) + 1
                raise DataError(f"image record {img} is in no identity range (identity records "
                                f"{first_id}..{end_id - 1})", path=self.rec_path, record=img)
            # every image in exactly one range: the owner of each image, in image order
            order = np.argsort(s, kind="stable")
            owner = np.repeat(order, (e - s)[order])
            nonempty = e > s
            id_label = np.full(len(records), -1, np.int64)
            id_label[nonempty] = self.labels[s[nonempty] - 1]
            wrong = self.labels != id_label[owner]
            if wrong.any():
                i = int(np.argmax(wrong))
                c = int(owner[i])
                raise DataError(f"header label {int(self.labels[i])} disagrees with identity record "
                                f"{int(records[c])}, whose images {s[c]}..{e[c] - 1} start with label "
                                f"{int(id_label[c])}", path=self.rec_path, record=int(i + 1))
            used = id_label[nonempty]
            uniq, first_at, counts = np.unique(used, return_index=True, return_counts=True)
            if (counts > 1).any():
                lab = int(uniq[np.argmax(counts > 1)])
                both = [int(r) for r, v in zip(records[nonempty], used) if v == lab][:2]
                raise DataError(f"identity records {both[0]} and {both[1]} both hold label {lab}",
                                path=self.rec_path, record=both[1])
        return [(int(a), int(b)) for a, b in zip(s, e)]

    # ------------------------------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.image_records)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, None
        return state

    def _file(self):
        if self._fh is None or self._pid != os.getpid():
            try:
                self._fh = open(self.rec_path, "rb")
            except OSError as exc:  # a directory, a file gone or unreadable since the index was read
                raise DataError(f"cannot open the record file: {exc.strerror or exc}", path=self.rec_path) from None
            self._pid = os.getpid()
        return self._fh

    def read_record(self, index: int) -> tuple[int, np.ndarray, int, int, bytes]:
        """(flag, labels, id, id2, payload bytes after the header) of record ``index``."""
        if index not in self.offsets:
            raise DataError(f"record {index} is not in the index", path=self.idx_path, record=index)
        offset = self.offsets[index]
        if offset >= self._size:
            raise DataError(f"offset {offset} is past the end of the file ({self._size} bytes)" + APART,
                            path=self.rec_path, record=index)
        fh = self._file()
        fh.seek(offset)
        payload = bytearray()
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise DataError("truncated record header" + APART, path=self.rec_path, record=index)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise DataError(f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})" + APART, path=self.rec_path,
                                record=index)
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            left = self._size - fh.tell()
            if length > left:  # checked before reading: read(n) allocates n bytes up front
                raise DataError(f"truncated record: {length} bytes announced, {max(left, 0)} left in the file"
                                + APART, path=self.rec_path, record=index)
            part = fh.read(length)
            if len(part) < length:
                raise DataError(f"truncated record: {len(part)} of {length} bytes" + APART, path=self.rec_path,
                                record=index)
            fh.read(-length % 4)
            # dmlc's parts: 0 whole, or 1 (first), 2... (middle), 3 (last); anything else is another record
            if (cflag in (0, 1)) != (not payload):
                raise DataError(f"split record broken: part with cflag {cflag} "
                                f"{'after' if payload else 'without'} a first part (cflag 1)",
                                path=self.rec_path, record=index)
            payload += part
            if cflag in (0, 3):
                break
            payload += _MAGIC_BYTES  # the split removed a magic word from the payload
        try:
            return unpack_payload(bytes(payload))
        except ValueError as exc:
            raise DataError(str(exc), path=self.rec_path, record=index) from None

    def image_bytes(self, i: int) -> bytes:
        return self.read_record(int(self.image_records[i]))[4]

    def image(self, i: int) -> np.ndarray:
        """The i-th image (0-based over images) as HxWx3 RGB uint8."""
        record = int(self.image_records[i])
        return decode_image(self.image_bytes(i), source=self.rec_path, record=record)

    def where(self, i: int) -> dict:
        """Where the i-th image comes from, as ``DataError``'s keywords (the ``.rec`` file and its record)."""
        return {"path": self.rec_path, "record": int(self.image_records[i])}
