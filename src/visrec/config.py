"""Typed, validated run configs (pydantic), loaded from YAML.

One schema for every task. The task-specific sections (`data`, `loss`) are validated by the task's own
pydantic models (see ``visrec.train.task``), so a new task adds its options without touching this file.
A bad field raises ConfigError naming the file and the field path (e.g. ``optim.lr``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic import Strict as StrictType

from visrec._structured import MAX_CONFIG_FILE_BYTES, MAX_NESTING, StructureError, check_yaml_graph
from visrec.data.text import read_text
from visrec.errors import ConfigError, shown


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# A whole number as written: ``true``, ``4.0`` or ``"8"`` is refused, not read as 1, 4 or 8; a switch is true or
# false as written (``"yes"`` or ``1`` is refused, not read as true).
Int = Annotated[int, StrictType()]
Bool = Annotated[bool, StrictType()]


def _a_number_not_a_switch(value):
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {str(value).lower()} (a switch)")
    return value


# A real number as written: ``true`` is refused, not read as 1.0 (``1`` and ``1e-3`` are the numbers they say).
Float = Annotated[float, BeforeValidator(_a_number_not_a_switch)]
# The largest ``seed``: numpy seeds take 0..2^32-1 and each process seeds with ``seed + rank``.
MAX_SEED = 2**31 - 1


class OptionError(ValueError):
    """A validator's error about one option of a section (``loss.s``): :func:`validate_section` names it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# Model sizes a config (or `budget check --set`) may ask for: a zero, negative or absurd size builds a model that
# fails later in a tensor library (a zero-width BatchNorm, a negative tensor dimension, a 200 GB allocation).
MODEL_INT_SIZES = {"embedding_size": 16384, "dim": 16384, "hidden": 16384, "num_points": 4096, "heatmap_size": 1024,
                   "scale": 64, "expand_ratio": 64}
MODEL_FLOAT_SIZES = {"width_mult": 16.0, "depth_mult": 16.0, "width": 16.0}
MODEL_COUNT_LISTS = {"layers": 1000, "blocks": 1000, "units": 1000, "modules": 1000}  # blocks per stage


def model_option_problem(options: dict[str, Any], prefix: str = "") -> str | None:
    """What is wrong with a model's size options (``embedding_size``, ``width_mult``, ``layers``, ...), as
    ``"<option> must be ..., got ..."``, or None. Options it does not know are left to the model's builder.
    A nested model spec (``quality_fusion``'s ``backbone``) is checked too, its options named by their path."""
    for key, value in options.items():
        name = f"{prefix}{key}"
        if value is None:  # "let the model choose" (dim: null, expand_ratio: null)
            continue
        if key in MODEL_INT_SIZES:
            top = MODEL_INT_SIZES[key]
            if type(value) is not int or not 1 <= value <= top:
                return f"{name} must be an integer from 1 to {top}, got {value!r}"
        elif key in MODEL_FLOAT_SIZES:
            top = MODEL_FLOAT_SIZES[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= top:
                return f"{name} must be a number above 0 and at most {top:g}, got {value!r}"
        elif key in MODEL_COUNT_LISTS:
            top = MODEL_COUNT_LISTS[key]
            if not isinstance(value, (list, tuple)) or not value or \
                    not all(type(v) is int and 1 <= v <= top for v in value):
                return f"{name} must be a list of block counts from 1 to {top}, got {value!r}"
        elif key == "dropout":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                return f"{name} must be a number from 0 up to (not including) 1, got {value!r}"
        elif key == "backbone" and isinstance(value, dict):
            problem = model_option_problem({k: v for k, v in value.items() if k != "name"}, f"{name}.")
            if problem:
                return problem
    return None


def non_finite(tree: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN or infinite number in a config tree, or None. No option of a run
    takes one: a learning rate of .inf trains to NaN, a margin of .nan poisons every step."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return path or "<root>", tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            found = non_finite(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            found = non_finite(value, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


class ModelSpec(BaseModel):
    """A registry name plus constructor kwargs: ``{name: mobilefacenet, embedding_size: 512}``. Size options
    are bounded (:func:`model_option_problem`)."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _sane_sizes(self):
        problem = model_option_problem(self.kwargs)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.kwargs}


class OptimConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: Float = Field(0.1, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(5e-4, ge=0)
    grad_clip: Float | None = Field(5.0, gt=0)


class ScheduleConfig(Strict):
    """Length of training and the learning-rate shape. Steps are optimizer steps (global batches)."""

    epochs: Float | None = Field(None, gt=0)
    max_steps: Int | None = Field(None, gt=0)
    warmup_steps: Int = Field(0, ge=0)
    kind: Literal["poly", "cosine", "constant"] = "poly"
    power: Float = Field(2.0, gt=0, le=100, description="poly: lr * (1 - progress)^power")

    @model_validator(mode="after")
    def _one_length(self):
        if (self.epochs is None) == (self.max_steps is None):
            raise ValueError("give exactly one of schedule.epochs or schedule.max_steps")
        return self


class RunConfig(Strict):
    task: str = "faces"
    output: Path = Path("runs/default")
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="each process seeds its RNGs with seed + rank")
    deterministic: Bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    batch_size: Int = Field(128, gt=0, description="per process")
    num_workers: Int = Field(0, ge=0)
    compile: Bool = Field(False, description="torch.compile the backbone (CUDA: cuts launch overhead)")
    channels_last: Bool = Field(True, description="NHWC backbone weights and activations (faster convs on CUDA "
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
    log_every: Int = Field(10, gt=0)
    checkpoint_every: Int = Field(200, gt=0, description="optimizer steps between checkpoints")
    val_every: Int | None = Field(None, gt=0, description="optimizer steps between validations; None = at the end")

    @field_validator("cuda_graph", mode="before")
    @classmethod
    def _on_off(cls, value):
        # YAML 1.1 reads an unquoted on / off as true / false: `cuda_graph: off` means "off", as written
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @field_validator("output", "init", mode="before")
    @classmethod
    def _a_path(cls, value):
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a folder, not an empty string (which would be the current folder)")
        return value


def _message(err: dict) -> str:
    """A pydantic error's text; a validator's own ValueError without pydantic's "Value error, " prefix."""
    if err.get("type") == "value_error" and "error" in (err.get("ctx") or {}):
        return str(err["ctx"]["error"])
    return err["msg"]


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"  {loc}: {_message(err)}")
    return "\n".join(lines)


def validate_section(model: type[BaseModel], data: dict[str, Any], section: str, source: str = "config"):
    """Validate a task-owned section (``data``, ``loss``) with the field path prefixed."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            option = getattr((err.get("ctx") or {}).get("error"), "option", None)  # an OptionError's option
            loc = ".".join([section, *(str(p) for p in err["loc"]), *([option] if option else [])])
            lines.append(f"  {loc}: {_message(err)}")
        raise ConfigError("\n".join(lines)) from None


class DuplicateKey(yaml.YAMLError):
    """A mapping that names the same key twice (YAML leaves it to the loader; PyYAML keeps the last)."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first_line} and {line}); "
                         f"YAML would keep only the last value: remove one")
        self.key, self.first_line, self.line = key, first_line, line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no tags that construct Python objects) that refuses a duplicate key in a mapping, and
    a document too deep, expanded too far by its aliases or containing itself (``visrec._structured``)."""

    def construct_document(self, node):
        check_yaml_graph(node)  # before anything is built from it
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` merges are overridden by the mapping's own keys, as YAML means
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: the base constructor refuses it with its own message
        return super().construct_mapping(node, deep)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (:class:`DuplicateKey`) and a document
    nested too deep, expanded too far by aliases or containing itself (:class:`StructureError`): a YAMLError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # PyYAML composes recursively: thousands of levels end it before check_yaml_graph
        raise StructureError(f"YAML nested more than {MAX_NESTING} levels deep") from None


def read_yaml_mapping(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping with dotted-key ``overrides`` applied; errors name the file. A key given
    twice in one mapping is refused (naming the key, its lines and the file), not silently the last one."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = safe_load(read_text(path, MAX_CONFIG_FILE_BYTES)) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in (overrides or {}).items():
        try:
            set_dotted(raw, key, value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: --set {key}: {exc}") from None
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config; ``overrides`` are dotted keys (``optim.lr``) applied before validation."""
    return parse_config(read_yaml_mapping(path, overrides), source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    found = non_finite(raw)
    if found:  # every section, the task-owned ones (data, loss) and model kwargs included
        raise ConfigError(f"{source}: invalid config\n  {found[0]}: must be a finite number, got {found[1]}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating the missing ones (a key present but empty counts as
    missing). ConfigError when a part is empty or the path runs into a value that is not a mapping (a
    number, a list: a list is replaced whole, ``data.val=[a.bin, b.bin]``)."""
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"{key!r} is not a dotted key (an empty part)")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[:depth + 1])
            hint = f"; set the whole list: {where}=[...]" if isinstance(child, list) else ""
            raise ConfigError(f"{where} is {type(child).__name__} {repr(child)[:60]}, not a mapping of keys, "
                              f"so it has no {parts[depth + 1]!r}{hint}")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=0.05`` -> ("optim.lr", 0.05); the value is parsed as YAML by the safe loader (numbers,
    lists, bools, strings; a tag that would construct a Python object is refused), ConfigError naming the
    override when it is not valid YAML."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text, 120)} must look like key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or not all(p.strip() for p in key.split(".")):
        raise ConfigError(f"override {shown(text, 120)}: {shown(key, 80)} is not a dotted key")
    try:
        return key, safe_load(value)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"override {shown(text, 120)}: the value is not valid YAML ({detail[:300]})") from None
