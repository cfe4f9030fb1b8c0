"""Typed, validated run configs (pydantic), loaded from YAML.

One schema for every task. The task-specific sections (`data`, `loss`) are validated by the task's own
pydantic models (see ``visrec.train.task``), so a new task adds its options without touching this file.
A bad field raises ConfigError naming the file and the field path (e.g. ``optim.lr``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visrec.data.text import read_text
from visrec.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(BaseModel):
    """A registry name plus constructor kwargs: ``{name: mobilefacenet, embedding_size: 512}``."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


class OptimConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)


class ScheduleConfig(Strict):
    """Length of training and the learning-rate shape. Steps are optimizer steps (global batches)."""

    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    kind: Literal["poly", "cosine", "constant"] = "poly"
    power: float = 2.0

    @model_validator(mode="after")
    def _one_length(self):
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of schedule.epochs or schedule.max_steps")
        return self


class RunConfig(Strict):
    task: str = "faces"
    output: Path = Path("runs/default")
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    batch_size: int = Field(128, gt=0, description="per process")
    num_workers: int = Field(0, ge=0)
    compile: bool = Field(False, description="torch.compile the backbone (CUDA: cuts launch overhead)")
    channels_last: bool = Field(True, description="NHWC backbone weights and activations (faster convs on CUDA "
                                                 "and on CPU: benchmarks/memory_format.py)")
    cuda_graph: Literal["auto", "on", "off"] = Field(
        "auto", description="capture the whole training step in a CUDA graph and replay it (auto: when the run "
                            "can, else one line says why; on: refuse a run that cannot)")
    model: ModelSpec
    init: Path | None = Field(None, description="start the backbone from these weights (arcface_torch "
                                                "backbone.pth, visrec model.pt or run dir); heads start fresh")
    data: dict[str, Any] = Field(default_factory=dict)
    loss: dict[str, Any] = Field(default_factory=dict)
    index: dict[str, Any] = Field(default_factory=dict, description="products: catalogue index options")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0, description="optimizer steps between checkpoints")
    val_every: int | None = Field(None, gt=0, description="optimizer steps between validations; None = at the end")


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def validate_section(model: type[BaseModel], data: dict[str, Any], section: str, source: str = "config"):
    """Validate a task-owned section (``data``, ``loss``) with the field path prefixed."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            loc = ".".join([section, *(str(p) for p in err["loc"])])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def read_yaml_mapping(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping with dotted-key ``overrides`` applied; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(read_text(path)) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config; ``overrides`` are dotted keys (``optim.lr``) applied before validation."""
    return parse_config(read_yaml_mapping(path, overrides), source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=0.05`` -> ("optim.lr", 0.05); the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
