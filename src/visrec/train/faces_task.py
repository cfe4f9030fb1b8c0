"""Face recognition training: backbone -> embedding -> PartialFC with a margin loss."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from visrec.data.datasets import open_face_dataset
from visrec.data.jpeg_batches import EncodedFaces, batched_decode_available, collate_encoded
from visrec.data.verification import read_verification_bin
from visrec.errors import ConfigError
from visrec.evaluate.bin_protocol import evaluate_bin_both, mirror
from visrec.losses import build_margin_loss
from visrec.losses.partial_fc import PartialFC
from visrec.models import build_backbone
from visrec.models.embed import embed_images
from visrec.train.task import TASKS, Task


class FaceData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Path = Field(description="RecordIO dir (train.rec/.idx/property), image-folder root, or CSV list")
    val: list[Path] = Field(default_factory=list, description="verification .bin files (LFW-style)")
    flip: bool = Field(True, description="random horizontal flip during training")
    skip_bad: bool = Field(False, description="skip unreadable images (counted) instead of failing")
    decode: Literal["auto", "workers", "batched"] = Field(
        "auto", description="workers: DataLoader workers decode each image (OpenCV); batched: workers read the "
                            "JPEG bytes and the training device decodes each batch at once (nvJPEG on CUDA); "
                            "auto: batched when training on CUDA")
    val_flip_test: bool = Field(True, description="the headline '<set>/accuracy' uses the flip test (image + "
                                "mirror embeddings summed, the field's convention); both figures are always "
                                "logged as '<set>/accuracy_flip' and '<set>/accuracy_no_flip'")


class FaceLoss(BaseModel):
    """``name`` picks the margin loss from visrec.losses; other keys are its kwargs (s, m, m1, m2, m3...)."""

    model_config = ConfigDict(extra="allow")
    name: str = "arcface"
    sample_rate: float = Field(1.0, gt=0, le=1, description="PartialFC negative-centre sampling rate")


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

    def train_dataset(self):
        faces = open_face_dataset(self.data_opts.train, skip_bad=self.data_opts.skip_bad)
        if not self.batched_decode():
            return faces
        self.encoded, self.collate_fn = EncodedFaces(faces), collate_encoded
        return self.encoded

    def to_device(self, batch):
        if self.collate_fn is collate_encoded:
            return self.encoded.decode(batch, self.ctx.device)
        return super().to_device(batch)

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

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        """10-fold accuracy of each ``.bin`` (``visrec.evaluate.bin_protocol``), with and without the flip
        test: ``<set>/accuracy_flip``, ``<set>/accuracy_no_flip``, and ``<set>/accuracy`` = the flip figure
        (the field's convention; the no-flip one with ``val_flip_test: false``)."""
        metrics = {}
        for path in self.data_opts.val:
            images, issame = read_verification_bin(path)
            plain = embed_images(backbone, images, device=self.ctx.device)
            mirrored = embed_images(backbone, mirror(images), device=self.ctx.device)
            both = evaluate_bin_both(plain, mirrored, issame)
            stem = Path(path).stem
            metrics[f"{stem}/accuracy_flip"] = float(both.flip.accuracy_mean)
            metrics[f"{stem}/accuracy_no_flip"] = float(both.no_flip.accuracy_mean)
            head = both.flip if self.data_opts.val_flip_test else both.no_flip
            metrics[f"{stem}/accuracy"] = float(head.accuracy_mean)
        return metrics
