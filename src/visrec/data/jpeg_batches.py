"""Face training batches decoded from their JPEG bytes in one call per batch, on the training device.

The usual path decodes every image in a DataLoader worker (OpenCV) and ships float tensors to the GPU: at
MobileFaceNet speeds on an H100 that needs more CPU cores than a machine has. Here the workers only read
each image's encoded bytes and check them (size bounded by the byte count, a JPEG cut short refused: the same
checks as :func:`visrec.data.images.decode_image`); the training process decodes a whole batch with
``torchvision.io.decode_jpeg`` on the device (nvJPEG on CUDA, libjpeg-turbo on a CPU, where the pixels are
identical to OpenCV's) and turns it into the float batch the backbone takes, ``(x / 255 - 0.5) / 0.5``.

Images the batched decoder would treat differently are decoded in the worker as before and travel as pixels:
anything not a JPEG (PNG, ...), a JPEG that is not 112x112 (resized as the usual path resizes it), and a JPEG
carrying EXIF data (OpenCV turns it upright by its orientation tag; the batched decoder would not).
A batch the batched decoder rejects is decoded again image by image, so a bad record is reported by name.

A batch leaves the worker as one byte tensor (every item's bytes end to end) and their lengths: a list of
hundreds of small tensors would cross to the training process one shared-memory handle each (a socket round
trip per tensor) and be pinned one by one, which costs the training process more than the decode itself
(BENCHMARKS.md: 512 items of 3.5 KB).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visrec.data.datasets import FACE_SIZE, FaceDataset
from visrec.data.images import MAX_IMAGE_FILE_BYTES, _jpeg_complete as jpeg_complete, check_encoded, decode_image
from visrec.data.text import read_bytes
from visrec.errors import DataError

_SOI = b"\xff\xd8"


def _has_exif(data: bytes) -> bool:
    """An APP1 "Exif" segment among the markers before the first scan."""
    sos = data.find(b"\xff\xda")
    return data.find(b"Exif\x00\x00", 0, sos if sos >= 0 else len(data)) >= 0


def batched_decode_available() -> str | None:
    """Why batches cannot be decoded with torchvision here, or None when they can."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError as exc:  # torchvision deprecates it for TorchCodec: a future release may drop it
        return f"torchvision.io.decode_jpeg is not available ({exc})"
    return None


class EncodedFaces(Dataset):
    """A face data set whose items are ``(uint8 1-D tensor, is_pixels, label, index)``: the JPEG bytes of a
    112x112 face, or (``is_pixels``) its decoded 112x112x3 RGB pixels, flattened. Collate with
    :func:`collate_encoded`, decode with :meth:`decode`."""

    def __init__(self, faces: FaceDataset):
        self.faces = faces
        self.source = faces.source
        self.labels = faces.labels
        self.num_classes = faces.num_classes

    def __len__(self) -> int:
        return len(self.faces)

    def where(self, i: int) -> tuple[Any, int | None]:
        """(file, record) naming item ``i`` in an error: the .rec file and record number, or the image file."""
        if hasattr(self.source, "rec_path"):
            return self.source.rec_path, int(self.source.image_records[i])
        return self.source.paths[i], None

    def encoded(self, i: int) -> bytes:
        if hasattr(self.source, "image_bytes"):
            return self.source.image_bytes(i)
        return read_bytes(self.source.paths[i], MAX_IMAGE_FILE_BYTES)

    def __getitem__(self, i: int):
        data = self.encoded(i)
        source, record = self.where(i)
        width, height = check_encoded(data, source=source, record=record)
        label = int(self.labels[i])
        if data.startswith(_SOI) and (width, height) == (FACE_SIZE, FACE_SIZE) and not _has_exif(data):
            if not jpeg_complete(data):  # decode_image's check, here where the batched decoder would not make it
                raise DataError(f"truncated JPEG: its {len(data)} bytes end before the end-of-image marker",
                                path=source, record=record)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), False, label, i
        pixels = decode_image(data, source=source, record=record)
        if pixels.shape[:2] != (FACE_SIZE, FACE_SIZE):
            import cv2

            pixels = cv2.resize(pixels, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(np.ascontiguousarray(pixels).reshape(-1)), True, label, i

    def decode(self, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch (:func:`collate_encoded`) -> (float images (B, 3, 112, 112) on ``device``, int64
        labels on ``device``)."""
        packed, lengths, is_pixels, labels, index = batch
        datas = torch.split(packed, lengths.tolist())  # views into the one buffer, each contiguous
        flags = is_pixels.tolist()
        images: list[torch.Tensor | None] = [None] * len(datas)
        jpegs = [k for k, pixels in enumerate(flags) if not pixels]
        if jpegs:
            try:
                decoded = _decode_jpegs([datas[k] for k in jpegs], device)
            except RuntimeError:
                decoded = [self._decode_one(datas[k], int(index[k]), device) for k in jpegs]
            for k, image in zip(jpegs, decoded):
                if tuple(image.shape) != (3, FACE_SIZE, FACE_SIZE):
                    source, record = self.where(int(index[k]))
                    raise DataError(f"decoded to {tuple(image.shape)}, not 3x{FACE_SIZE}x{FACE_SIZE}",
                                    path=source, record=record)
                images[k] = image
        for k, pixels in enumerate(flags):
            if pixels:
                images[k] = datas[k].view(FACE_SIZE, FACE_SIZE, 3).permute(2, 0, 1).to(device, non_blocking=True)
        batch_images = torch.stack(images).float().div_(127.5).sub_(1.0)
        return batch_images, labels.to(device, non_blocking=True)

    def _decode_one(self, data: torch.Tensor, i: int, device: torch.device) -> torch.Tensor:
        """One image the batched call could not take, through visrec's decoder: a DataError naming it."""
        source, record = self.where(i)
        pixels = decode_image(bytes(data.numpy()), source=source, record=record)
        return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


def _decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec; until that is a dependency, this is the one
        # batched GPU JPEG decoder that installs from the registries
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def collate_encoded(items: list[tuple[torch.Tensor, bool, int, int]]):
    """Items of :class:`EncodedFaces` -> (uint8 tensor of every item's bytes end to end, int64 lengths, bool
    is_pixels, int64 labels, int64 indices): five tensors per batch, whatever its size (module docstring)."""
    datas, is_pixels, labels, index = zip(*items)
    return (torch.cat(datas), torch.tensor([d.numel() for d in datas], dtype=torch.int64),
            torch.tensor(is_pixels, dtype=torch.bool), torch.tensor(labels, dtype=torch.int64),
            torch.tensor(index, dtype=torch.int64))
