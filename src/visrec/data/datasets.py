"""Torch datasets over the face formats: items are (float32 3x112x112 in [-1, 1] RGB, int label)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from visrec.data.folders import read_csv_list, read_image_folder
from visrec.data.recordio import RecordIOReader
from visrec.errors import DataError

FACE_SIZE = 112


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 HWC -> float CHW, (x/255 - 0.5)/0.5 as arcface_torch. Non-112 images are resized (the
    face formats hold aligned 112x112 crops; anything else is almost certainly a mistake worth a resize
    rather than a crash deep in the backbone)."""
    if image.shape[:2] != (FACE_SIZE, FACE_SIZE):
        import cv2

        image = cv2.resize(image, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class FaceDataset(Dataset):
    """Wraps a source with ``__len__``, ``labels``, ``num_classes`` and ``image(i)``."""

    def __init__(self, source, *, train: bool = False):
        self.source = source
        self.labels = np.asarray(source.labels)
        self.num_classes = int(source.num_classes)
        self.train = train

    def __len__(self) -> int:
        return len(self.labels)

    def crop(self, i: int, size: tuple[int, int] | None, whom: str = "the model") -> np.ndarray:
        """The i-th image as stored, which a scored set must hold as an aligned crop of ``size`` (height, width,
        pixels; None: any): it is embedded as it is, never resized (as a ``.bin`` and the LFR image track), else
        ``DataError`` naming its file (and record). Training resizes instead (:func:`to_tensor`)."""
        img = self.source.image(i)
        if size and img.shape[:2] != tuple(size):
            (h, w), (sh, sw) = img.shape[:2], size
            raise DataError(f"image is {w}x{h}; {whom} takes aligned {sw}x{sh} crops (a scored set is embedded as "
                            f"it is, never resized: `visrec data prepare faces` aligns photos to crops)",
                            **self.source.where(i))
        return img

    def __getitem__(self, i: int):
        img = self.source.image(i)
        if self.train and np.random.rand() < 0.5:
            img = img[:, ::-1]
        return to_tensor(img), int(self.labels[i])


def open_face_dataset(path: str | Path, *, skip_bad: bool = False, train: bool = False,
                      also_accepted: str = "", scored: bool = False) -> FaceDataset:
    """Autodetect: a directory holding ``train.rec`` (or a ``.rec`` path) -> RecordIO; a ``.csv`` -> CSV
    list; a directory of sub-folders -> image folder. ``also_accepted`` names what else the caller takes
    (e.g. "a .bin pairs file"), so the error for a path of no known kind lists every kind. ``scored``: the set
    is scored over all its pairs (evaluation, calibration, a search's held-out set), so a CSV list may name
    each image once (a RecordIO index refuses a record listed twice in any case; a folder cannot repeat)."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", path=path)
    if path.suffix == ".rec" or (path.is_dir() and (path / "train.rec").exists()):
        return FaceDataset(RecordIOReader(path), train=train)
    if path.suffix.lower() == ".csv":
        return FaceDataset(read_csv_list(path, skip_bad=skip_bad, each_image_once=scored), train=train)
    if path.is_dir():
        return FaceDataset(read_image_folder(path, skip_bad=skip_bad), train=train)
    kinds = ["a RecordIO dir (train.rec/.idx)", "an image folder", "a .csv list"]
    kinds += [also_accepted] if also_accepted else []
    raise DataError(f"not a face data set: expected {', '.join(kinds[:-1])} or {kinds[-1]}", path=path)
