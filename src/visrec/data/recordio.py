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
(first identity-record index, end of identity records); images are records 1..N-1; records
N..end-1 hold one identity each, with labels [first image index, end image index). Sets without that
header (record 0 with flag 0) are plain lists whose labels come from each record's header.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from visrec.errors import DataError

MAGIC = 0xCED7230A
_HEADER = struct.Struct("<IfQQ")
_MAGIC_BYTES = struct.pack("<I", MAGIC)


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
    on close (record 0 header, images 1..N, identity records), as InsightFace's packer lays them out."""

    def __init__(self, directory: str | Path, *, quality: int = 95):
        self.rec, self.idx, self.prop = _resolve(directory)
        self.rec.parent.mkdir(parents=True, exist_ok=True)
        self.quality = quality
        self._items: list[tuple[int, bytes]] = []
        self._shape: tuple[int, int] | None = None

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()

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
        self._items.append((int(label), data))
        return len(self._items)

    def close(self) -> None:
        labels = sorted({lab for lab, _ in self._items})
        if labels != list(range(len(labels))):
            raise ValueError("labels must be 0..C-1 with no gaps")
        order = sorted(range(len(self._items)), key=lambda i: (self._items[i][0], i))
        n_img = len(order)
        first_id_rec = n_img + 1
        ranges, cursor = [], 1
        counts = np.bincount([lab for lab, _ in self._items], minlength=len(labels))
        for c in counts:
            ranges.append((cursor, cursor + int(c)))
            cursor += int(c)
        tmp_rec, tmp_idx = self.rec.with_suffix(".rec.tmp"), self.idx.with_suffix(".idx.tmp")
        with open(tmp_rec, "wb") as rec, open(tmp_idx, "w") as idx:
            def put(index: int, payload: bytes) -> None:
                idx.write(f"{index}\t{rec.tell()}\n")
                rec.write(_encode_record(payload))

            put(0, pack_payload([first_id_rec, first_id_rec + len(labels)], b""))
            for k, i in enumerate(order, start=1):
                lab, data = self._items[i]
                put(k, pack_payload(float(lab), data, record_id=k))
            for c, (s, e) in enumerate(ranges):
                put(first_id_rec + c, pack_payload([s, e], b"", record_id=first_id_rec + c))
        os.replace(tmp_rec, self.rec)
        os.replace(tmp_idx, self.idx)
        h, w = self._shape or (112, 112)
        self.prop.write_text(f"{len(labels)},{h},{w}")


class RecordIOReader:
    """Random access to an InsightFace ``.rec`` through its ``.idx``. The file is opened lazily per
    process, so the reader can be handed to DataLoader workers."""

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
        flag, labels, *_ = self.read_record(0)
        if flag > 0:  # InsightFace face-set header
            first_id, end_id = int(labels[0]), int(labels[1])
            self.image_records = np.arange(1, first_id)
            self.identity_ranges = [tuple(int(x) for x in self.read_record(i)[1][:2])
                                    for i in range(first_id, end_id)]
            lab = np.empty(len(self.image_records), np.int64)
            for c, (s, e) in enumerate(self.identity_ranges):
                if not (1 <= s <= e <= first_id):
                    raise DataError(f"identity {c} range [{s}, {e}) outside the image records",
                                    path=self.rec_path, record=first_id + c)
                lab[s - 1:e - 1] = c
            self.labels = lab
        else:
            self.image_records = np.array(sorted(self.offsets), dtype=np.int64)
            self.identity_ranges = []
            self.labels = np.array([int(self.read_record(int(i))[1][0]) for i in self.image_records], np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        if self.prop_path.exists():
            try:
                declared = int(self.prop_path.read_text().strip().split(",")[0])
            except ValueError:
                raise DataError("expected 'num_classes,height,width'", path=self.prop_path) from None
            if declared != self.num_classes:
                raise DataError(f"declares {declared} classes but the records hold {self.num_classes}",
                                path=self.prop_path)

    def _read_idx(self) -> dict[int, int]:
        offsets = {}
        for lineno, line in enumerate(self.idx_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                key, off = line.split("\t")
                offsets[int(key)] = int(off)
            except ValueError:
                raise DataError(f"line {lineno} is not 'index<TAB>offset': {line!r}", path=self.idx_path) from None
        return offsets

    def __len__(self) -> int:
        return len(self.image_records)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, None
        return state

    def _file(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._fh

    def read_record(self, index: int) -> tuple[int, np.ndarray, int, int, bytes]:
        """(flag, labels, id, id2, payload bytes after the header) of record ``index``."""
        if index not in self.offsets:
            raise DataError(f"record {index} is not in the index", path=self.idx_path)
        offset = self.offsets[index]
        if offset >= self._size:
            raise DataError(f"offset {offset} is past the end of the file ({self._size} bytes)",
                            path=self.rec_path, record=index)
        fh = self._file()
        fh.seek(offset)
        payload = bytearray()
        while True:
            head = fh.read(8)
            if len(head) < 8:
                raise DataError("truncated record header", path=self.rec_path, record=index)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise DataError(f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})", path=self.rec_path,
                                record=index)
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            part = fh.read(length)
            if len(part) < length:
                raise DataError(f"truncated record: {len(part)} of {length} bytes", path=self.rec_path,
                                record=index)
            fh.read(-length % 4)
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
        from visrec.data.images import decode_image

        record = int(self.image_records[i])
        return decode_image(self.image_bytes(i), source=self.rec_path, record=record)
