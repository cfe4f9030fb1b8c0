"""Product-retrieval fine-tuning: catalogue images -> descriptor -> PartialFC with a margin loss.

Classes: the product of each catalogue image from ``labels`` (``catalogue_id,product_id`` lines, as the
synthetic generator writes ``catalogue_products.csv``), or, without labels, every catalogue image is its
own class (instance discrimination: Perfect-500K ships no product labels). Catalogue shots have plain
white backgrounds while queries are photos, so training views are made query-like: the white background
is replaced by clutter, then random rotation/scale/shift, colour gain and blur.
Validation: mAP@7 (both forms) of ``val``'s queries against its catalogue, exact search.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from visrec.data.products import (CATALOGUE_DIR, GROUND_TRUTH, list_images, pad_to_square, preprocess_product,
                                  read_image_checked, read_product_labels)
from visrec.evaluate.products import query_items, read_checked_ground_truth
from visrec.errors import DataError
from visrec.losses import build_margin_loss
from visrec.losses.partial_fc import PartialFC
from visrec.models import build_backbone
from visrec.models.contract import MAX_INPUT_SIDE
from visrec.models.inference import evaluate_descriptor
from visrec.models.model_file import default_contract
from visrec.train.task import TASKS, MarginLossOptions, Task


class ProductData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    catalogue: Path = Field(description="folder of <id>.jpg catalogue images")
    labels: Path | None = Field(None, description="catalogue_id,product_id CSV; none = one class per image")
    size: int = Field(224, gt=0, le=MAX_INPUT_SIDE, description="input side in pixels after white square padding "
                      f"(at most {MAX_INPUT_SIDE}, the model contract's bound)")
    augment: bool = True
    val: Path | None = Field(None, description="Perfect-500K root (catalogue/, query/, val.csv) for mAP@7")


class ProductLoss(MarginLossOptions):
    """``name`` picks the margin loss from visrec.losses; other keys are its kwargs (range-checked)."""


def query_like(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A catalogue shot (white background) made to look like a photo: cluttered background where the
    image is near-white, random rotation (+-25 deg), scale (0.6-1.05), shift, colour gain, blur."""
    img = pad_to_square(img, 255)
    h = img.shape[0]
    if rng.random() < 0.7:
        bg = np.empty_like(img)
        bg[:] = rng.integers(0, 256, 3)
        small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        bg = cv2.addWeighted(bg, 0.5, cv2.resize(small, (h, h), interpolation=cv2.INTER_CUBIC), 0.5, 0)
        white = (img.min(axis=2) > 235)[..., None]
        img = np.where(white, bg, img)
    angle, scale = rng.uniform(-25, 25), rng.uniform(0.6, 1.05)
    m = cv2.getRotationMatrix2D((h / 2, h / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.12, 0.12, 2) * h
    border = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = cv2.warpAffine(img, m, (h, h), flags=cv2.INTER_LINEAR, borderValue=border)
    img = np.clip(img.astype(np.float32) * rng.uniform(0.7, 1.3, 3), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (5, 5), rng.uniform(0.5, 1.5))
    return img


class CatalogueImages(Dataset):
    """(image tensor (3, size, size) ImageNet-normalised, class index) over the catalogue."""

    def __init__(self, catalogue: Path, labels: Path | None, size: int, augment: bool):
        self.items = list_images(catalogue)
        if not self.items:
            raise DataError("no catalogue images (.jpg/.jpeg/.png)", path=catalogue)
        if labels is not None:
            table = read_product_labels(labels)
            missing = [i for i, _ in self.items if i not in table]
            if missing:
                raise DataError(f"{len(missing)} catalogue images have no product label, e.g. {missing[:3]}",
                                path=labels)
            classes = sorted({table[i] for i, _ in self.items})
            index = {c: k for k, c in enumerate(classes)}
            self.labels = np.array([index[table[i]] for i, _ in self.items], np.int64)
        else:
            self.labels = np.arange(len(self.items), dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1
        self.size, self.augment = size, augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        img = read_image_checked(*self.items[i])
        if self.augment:
            # drawn from torch's RNG (checkpointed by the Trainer), so resumed runs augment alike
            img = query_like(img, np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)))))
        return torch.from_numpy(preprocess_product(img, self.size)), int(self.labels[i])


@TASKS.register("products")
class ProductTask(Task):
    DataOptions = ProductData
    LossOptions = ProductLoss
    reads_index = True  # the config's index section is what `visrec products index --config` builds with
    local_modules = ("head",)  # PartialFC keeps this rank's class shard

    def train_dataset(self):
        d = self.data_opts
        return CatalogueImages(d.catalogue, d.labels, d.size, d.augment)

    def build_modules(self, num_classes):
        backbone = build_backbone(self.cfg.model.name, **self.cfg.model.kwargs)
        margin = build_margin_loss(self.loss_opts.name, **dict(self.loss_opts.model_extra or {}))
        head = PartialFC(margin, int(backbone.dim), int(num_classes), sample_rate=self.loss_opts.sample_rate)
        return {"backbone": backbone, "head": head}

    def model_contract(self, backbone):
        """Products: the descriptor's ImageNet-normalised ``data.size`` square input, L2-normalised output."""
        return default_contract(backbone, self.model_config(), image_size=self.data_opts.size)

    def training_step(self, modules: dict[str, nn.Module], batch) -> torch.Tensor:
        images, labels = batch
        return modules["head"](modules["backbone"](images).float(), labels)

    def prepare_validation(self) -> None:
        """Check ``data.val`` before the first step as ``evaluate_descriptor`` will read it: its catalogue, its
        ground truth against that catalogue (every ground-truth id names a catalogue image:
        ``read_checked_ground_truth``) and every query's image file (the images are decoded when validating)."""
        root = self.data_opts.val
        if root is None:
            return
        catalogue = list_images(Path(root) / CATALOGUE_DIR)
        if not catalogue:
            raise DataError("no catalogue images (.jpg/.jpeg/.png)", path=Path(root) / CATALOGUE_DIR)
        gt, _ = read_checked_ground_truth(Path(root) / GROUND_TRUTH, [i for i, _ in catalogue])  # no query: refused
        query_items(Path(root), gt)

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        if self.data_opts.val is None:
            return {}

        return {f"val/{k}": v for k, v in
                evaluate_descriptor(backbone, self.data_opts.val, self.data_opts.size, device=self.ctx.device).items()}
