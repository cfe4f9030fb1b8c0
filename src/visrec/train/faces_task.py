"""Face recognition training: backbone -> embedding -> PartialFC with a margin loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from visrec.data.datasets import FACE_SIZE, open_face_dataset
from visrec.data.jpeg_batches import EncodedFaces, batched_decode_available, collate_encoded
from visrec.data.verification import read_verification_bin
from visrec.errors import ConfigError, DataError
from visrec.evaluate.bin_protocol import NFOLDS, evaluate_bin_both, fold_problem, mirror
from visrec.losses import build_margin_loss
from visrec.losses.partial_fc import PartialFC
from visrec.models import build_backbone
from visrec.models.embed import embed_images
from visrec.train.task import TASKS, MarginLossOptions, Task


class FaceData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Path = Field(description="RecordIO dir (train.rec/.idx/property), image-folder root, or CSV list")
    val: list[Path] = Field(default_factory=list, description="verification .bin files (LFW-style)")
    flip: bool = Field(True, description="random horizontal flip during training")
    skip_bad: bool = Field(False, description="skip unreadable images (counted) instead of failing: a record that "
                           "cannot be read or decoded is replaced by the next readable one; the count is printed "
                           "at the end of training and logged in metrics.jsonl")
    decode: Literal["auto", "workers", "batched"] = Field(
        "auto", description="workers: DataLoader workers decode each image (OpenCV); batched: workers read the "
                            "JPEG bytes and the training device decodes each batch at once (nvJPEG on CUDA); "
                            "auto: batched when training on CUDA")
    val_flip_test: bool = Field(True, description="the headline '<set>/accuracy' uses the flip test (image + "
                                "mirror embeddings summed, the field's convention); both figures are always "
                                "logged as '<set>/accuracy_flip' and '<set>/accuracy_no_flip'")


class SkipBad(Dataset):
    """``data.skip_bad``: a training set whose unreadable records are skipped and counted instead of failing.

    An item whose record cannot be read or decoded (a ``DataError``: a truncated or non-image file, a bad
    RecordIO record) is replaced by the next readable record (``i+1, i+2, ...``, wrapping round), the same
    every time, so batches keep their size and a resumed run reads what an uninterrupted one read. The records
    found bad are flagged in a shared-memory mask, which DataLoader workers write and the training process
    reads (:meth:`report`); a flagged record is not read again. ``MAX_RUN`` unreadable records in a row end
    the run: that is the wrong data set, not a few bad files."""

    MAX_RUN = 256

    def __init__(self, base: Dataset, source: Any):
        self.base, self.source = base, source
        self.labels, self.num_classes = base.labels, base.num_classes
        self.bad = torch.zeros(len(base), dtype=torch.uint8).share_memory_()
        self.listed = [f"{p}: {why}" for p, why in getattr(source, "skipped", [])]  # left out when indexed
        self.why: dict[int, str] = {}  # this process's messages for flagged records

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        n, first = len(self.base), None
        for k in range(min(n, self.MAX_RUN)):
            j = (i + k) % n
            if self.bad[j]:
                continue
            try:
                return self.base[j]
            except DataError as exc:
                self.bad[j] = 1
                first = first or exc
        raise DataError(f"data.skip_bad: {min(n, self.MAX_RUN)} records in a row from record {i} are unreadable"
                        f"{f' (the first: {first})' if first else ''}; is data.train the right data set?")

    def where(self, i: int) -> str:
        if hasattr(self.source, "rec_path"):
            return f"{self.source.rec_path}, record {int(self.source.image_records[i])}"
        return str(self.source.paths[i])

    def flag(self, i: int, why: str) -> None:
        self.bad[i] = 1
        self.why[i] = why

    def report(self) -> dict[str, Any]:
        items = self.bad.nonzero().flatten().tolist()
        examples = list(self.listed[:5])
        for i in items[:max(0, 5 - len(examples))]:
            if i not in self.why:  # flagged in a worker: read it once more here for its message
                try:
                    self.base[i]
                    self.why[i] = f"{self.where(i)}: unreadable"
                except DataError as exc:
                    self.why[i] = str(exc)
            examples.append(self.why[i])
        return {"items": items, "listed": len(self.listed), "examples": examples}


class FaceLoss(MarginLossOptions):
    """``name`` picks the margin loss from visrec.losses; other keys are its kwargs (s, m, m1, m2, m3...),
    range-checked when the config is read."""


def read_val_set(path: Path) -> tuple:
    """A validation ``.bin``: (images, issame), with enough pairs for the 10 folds and aligned crops of the size
    the trainer makes (:data:`FACE_SIZE`; a .bin is embedded as it is, never resized), else a DataError naming it
    (before the first step: the network would fail on other sizes only at the first validation)."""
    images, issame = read_verification_bin(path)
    problem = fold_problem(len(issame), NFOLDS)
    if problem:
        raise DataError(f"validation set: {problem}", path=path)
    h, w = images[0].shape[:2]  # one size: the reader checks every image against the first
    if (h, w) != (FACE_SIZE, FACE_SIZE):
        raise DataError(f"validation set: images are {w}x{h}; the face models train on aligned {FACE_SIZE}x"
                        f"{FACE_SIZE} crops", path=path, record=0)
    return images, issame


@TASKS.register("faces")
class FaceTask(Task):
    DataOptions = FaceData
    LossOptions = FaceLoss
    local_modules = ("head",)  # PartialFC holds this rank's class shard: never wrapped in DDP

    def batched_decode(self) -> bool:
        """Whether batches are decoded on the training device (``data.decode``)."""
        choice = self.data_opts.decode
        if choice == "workers" or (choice == "auto" and self.ctx.device.type != "cuda"):
            return False
        missing = batched_decode_available()
        if missing and choice == "batched":
            raise ConfigError(f"data.decode: batched, but {missing}")
        return missing is None

    skipping: SkipBad | None = None  # the training set's wrapper under data.skip_bad

    def train_dataset(self):
        faces = open_face_dataset(self.data_opts.train, skip_bad=self.data_opts.skip_bad)
        dataset = faces
        if self.batched_decode():
            self.encoded, self.collate_fn = EncodedFaces(faces), collate_encoded
            dataset = self.encoded
        if self.data_opts.skip_bad:
            dataset = self.skipping = SkipBad(dataset, faces.source)
        return dataset

    def to_device(self, batch):
        if self.collate_fn is collate_encoded:
            try:
                return self.encoded.decode(batch, self.ctx.device)
            except DataError:
                if self.skipping is None:
                    raise
                return self._decode_skipping(batch)
        return super().to_device(batch)

    def _decode_skipping(self, batch):
        """A batch the device could not decode, item by item: an item that fails is flagged (skipped from
        now on) and replaced by the next good item of the batch, so the batch keeps its size."""
        packed, lengths, is_pixels, labels, index = batch
        datas = torch.split(packed, lengths.tolist())
        decoded: list = []
        for k, data in enumerate(datas):
            try:
                decoded.append(self.encoded.decode((data, lengths[k:k + 1], is_pixels[k:k + 1], labels[k:k + 1],
                                                    index[k:k + 1]), self.ctx.device))
            except DataError as exc:
                self.skipping.flag(int(index[k]), str(exc))
                decoded.append(None)
        good = [k for k, d in enumerate(decoded) if d is not None]
        if not good:
            raise DataError(f"data.skip_bad: no image of a batch of {len(datas)} could be decoded")
        decoded = [d if d is not None else decoded[next((g for g in good if g > k), good[0])]
                   for k, d in enumerate(decoded)]
        return torch.cat([d[0] for d in decoded]), torch.cat([d[1] for d in decoded])

    def skipped_records(self):
        return self.skipping.report() if self.skipping is not None else None

    def build_modules(self, num_classes):
        spec = self.cfg.model
        backbone = build_backbone(spec.name, **spec.kwargs)
        emb_size = int(spec.kwargs.get("embedding_size", 512))
        margin_kwargs = dict(self.loss_opts.model_extra or {})
        margin = build_margin_loss(self.loss_opts.name, **margin_kwargs)
        head = PartialFC(margin, emb_size, int(num_classes), sample_rate=self.loss_opts.sample_rate)
        return {"backbone": backbone, "head": head}

    def capture_blocker(self) -> str | None:
        if self.loss_opts.sample_rate < 1:
            return (f"loss.sample_rate {self.loss_opts.sample_rate:g} < 1: PartialFC samples a data-dependent "
                    f"set of centres each step")
        return None

    def augment(self, batch):
        if not self.data_opts.flip:
            return batch
        images, labels = batch
        # Drawn from the global torch RNG, which checkpoints save: resumed runs flip the same images. The
        # flip itself runs on the training device.
        mask = torch.rand(images.shape[0]) < 0.5
        if images.is_cuda:
            mask = mask.pin_memory()  # a copy from pageable memory would wait for the GPU's previous step
        mask = mask.to(images.device, non_blocking=True)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
        return images, labels

    def training_step(self, modules: dict[str, nn.Module], batch) -> torch.Tensor:
        images, labels = batch
        embeddings = modules["backbone"](images)
        return modules["head"](embeddings.float(), labels)

    _val_sets: dict[str, tuple] | None = None  # what prepare_validation read: {path: (images, issame)}

    def prepare_validation(self) -> None:
        """Read every ``data.val`` file now (decoded, checked, kept for :meth:`validate`, as arcface_torch keeps
        its validation sets in memory): a missing or unreadable file, an image that does not decode or fewer
        pairs than the 10 folds need is an error before the first step. Two sets whose file names give the
        same metric names are refused."""
        stems: dict[str, Path] = {}
        for path in self.data_opts.val:
            other = stems.setdefault(Path(path).stem, Path(path))
            if other != Path(path):
                raise ConfigError(f"data.val: {other} and {path} would both log as '{Path(path).stem}/accuracy'; "
                                  f"rename one")
        self._val_sets = {str(path): read_val_set(Path(path)) for path in self.data_opts.val}

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        """10-fold accuracy of each ``.bin`` (``visrec.evaluate.bin_protocol``), with and without the flip
        test: ``<set>/accuracy_flip``, ``<set>/accuracy_no_flip``, and ``<set>/accuracy`` = the flip figure
        (the field's convention; the no-flip one with ``val_flip_test: false``)."""
        metrics = {}
        for path in self.data_opts.val:
            kept = (self._val_sets or {}).get(str(path))
            images, issame = kept if kept is not None else read_val_set(Path(path))
            plain = embed_images(backbone, images, device=self.ctx.device)
            mirrored = embed_images(backbone, mirror(images), device=self.ctx.device)
            both = evaluate_bin_both(plain, mirrored, issame)
            stem = Path(path).stem
            metrics[f"{stem}/accuracy_flip"] = float(both.flip.accuracy_mean)
            metrics[f"{stem}/accuracy_no_flip"] = float(both.no_flip.accuracy_mean)
            head = both.flip if self.data_opts.val_flip_test else both.no_flip
            metrics[f"{stem}/accuracy"] = float(head.accuracy_mean)
        return metrics
