"""The seam between the one ``Trainer`` and each task (faces, landmarks, products, ...).

A task owns its data, model(s) and loss; the Trainer owns the loop, devices, mixed precision,
distributed set-up, checkpoints, logging and resumption. A new task is one file with a ``Task``
subclass registered in ``TASKS`` plus one import line in ``visrec/train/__init__.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from visrec._structured import loads_json
from visrec.config import Float, OptionError, RunConfig, validate_section
from visrec.distributed import RunContext  # noqa: F401 (tasks take it; re-exported for them)
from visrec.errors import ConfigError
from visrec.losses import margin_option_problem
from visrec.models.model_file import default_contract
from visrec.registry import Registry
from visrec.train.step import move_to

TASKS: Registry = Registry("task")


class _Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MarginLossOptions(BaseModel):
    """A ``loss`` section that builds a margin loss under PartialFC: ``name`` picks it from
    ``visrec.losses``; other keys are its kwargs (s, m, m1, m2, m3...), each checked against the range the
    loss declares (:func:`visrec.losses.margin_option_problem`) when the config is read, not mid-step."""

    model_config = ConfigDict(extra="allow")
    name: str = "arcface"
    sample_rate: Float = Field(1.0, gt=0, le=1, description="PartialFC negative-centre sampling rate")

    @model_validator(mode="after")
    def _margin_options(self):
        problem = margin_option_problem(self.name, self.model_extra or {})
        if problem:
            raise OptionError(*problem)
        return self


class Task:
    """Base class. Subclasses set ``DataOptions``/``LossOptions`` (pydantic models validating the config's
    ``data`` and ``loss`` sections) and implement the methods below."""

    DataOptions: ClassVar[type[BaseModel]] = _Empty
    LossOptions: ClassVar[type[BaseModel]] = _Empty
    # whether the config's ``index`` section means anything to this task (products: its catalogue index)
    reads_index: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, ctx: RunContext, source: str = "config"):
        self.cfg = cfg
        self.ctx = ctx
        self.data_opts = validate_section(self.DataOptions, cfg.data, "data", source)
        self.loss_opts = validate_section(self.LossOptions, cfg.loss, "loss", source)
        if cfg.index and not self.reads_index:  # it would be kept in config.yaml and never read
            raise ConfigError(f"{source}: invalid config\n  index: the {cfg.task} task reads no index options (only "
                              "products indexes a catalogue); remove the section")

    # --- building -------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        """The training set. Items are whatever ``training_step`` expects (default-collated)."""
        raise NotImplementedError

    def build_modules(self, num_classes: int | None) -> dict[str, nn.Module]:
        """Trainable modules by checkpoint key. ``"backbone"`` is the exported model. Modules that hold
        rank-local shards (e.g. PartialFC centres) must not be wrapped in DDP: list their names in
        ``local_modules``. ``num_classes`` comes from the training set when it has labels."""
        raise NotImplementedError

    local_modules: ClassVar[tuple[str, ...]] = ()

    collate_fn: Any = None  # the DataLoader's collate function (None: PyTorch's default)

    # --- running --------------------------------------------------------------------------------
    def to_device(self, batch: Any) -> Any:
        """A collated batch onto ``ctx.device``. Runs one batch ahead of the step (on a side CUDA stream when
        training on a GPU), so it must not draw random numbers: that is :meth:`augment`'s place."""
        return move_to(batch, self.ctx.device)

    def before_training(self, modules: dict[str, nn.Module]) -> None:
        """Called once when training starts, after the modules are built and a resumed run's checkpoint is
        loaded: work that depends on the weights but not on the step (a frozen network's outputs, computed
        once). It must not draw random numbers. Default: nothing."""

    def augment(self, batch: Any) -> Any:
        """Random augmentation of a batch on the device, just before its step and outside any captured CUDA
        graph: random numbers drawn here come from the checkpointed RNG states, in step order."""
        return batch

    def capture_blocker(self) -> str | None:
        """Why ``training_step`` cannot be captured in a CUDA graph (data-dependent shapes, a value read back
        to the host, random numbers drawn on the host), or None when it can. A task declares itself safe by
        overriding this."""
        return f"task {self.cfg.task}: its step is not declared capture-safe"

    def training_step(self, modules: dict[str, nn.Module], batch: Any) -> torch.Tensor:
        """Return the scalar loss of one batch (already on ``ctx.device`` and augmented), run under autocast."""
        raise NotImplementedError

    def prepare_validation(self) -> None:
        """Open and check every validation set, once, on the main rank before the first step (before the
        training data is read): a set that is missing, unreadable, or cannot be evaluated (a pairs file with
        fewer pairs than its folds) raises a ``DataError``/``ConfigError`` naming it now, not after training.
        A task may keep what it read for :meth:`validate`. Default: nothing to check."""

    def validate(self, backbone: nn.Module) -> dict[str, float]:
        """Periodic validation on the main rank, backbone in eval mode; {} if nothing configured."""
        return {}

    def skipped_records(self) -> dict[str, Any] | None:
        """The training records this task's data skipped as unreadable (an option like ``data.skip_bad``), so
        far in this process: ``{"items": dataset indices skipped when read, "listed": how many entries were
        left out when the data set was indexed (not images, empty identities), "examples": a few 'where: why'
        lines}``; None when it skips nothing. The Trainer reports the count and keeps it in checkpoints."""
        return None

    def model_config(self) -> dict[str, Any]:
        """What rebuilds the exported backbone: {"name": ..., **kwargs} (stored in checkpoints)."""
        return self.cfg.model.as_dict()

    def model_contract(self, backbone: nn.Module):
        """The exported model's contract (``visrec.models.contract.ModelContract``), saved with every
        checkpoint. Default: derived from the model config (embedding size read off ``backbone``), faces
        aligned as the training data was prepared (:meth:`alignment`)."""
        return default_contract(backbone, self.model_config(), align_method=self.alignment(), origin="visrec-checkpoint")

    def alignment(self) -> str:
        """How the training crops were aligned: the ``align`` setting of a ``visrec data prepare`` journal
        next to the training data (``box_margin`` crops: ``none``), else ``lstsq`` (prepare's default)."""
        train = getattr(self.data_opts, "train", None)
        if train is None:
            return "lstsq"
        root = Path(train)
        for folder in (root, root.parent):
            journal = folder / "prepare_journal.jsonl"
            if journal.is_file():
                try:
                    with open(journal) as fh:
                        settings = loads_json(fh.readline()).get("settings", {})
                except (OSError, ValueError, AttributeError):
                    return "lstsq"
                if settings.get("box_margin") is not None:
                    return "none"
                return str(settings.get("align", "lstsq"))
        return "lstsq"
