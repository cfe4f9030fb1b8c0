"""A search space as data, and the budget as a hard constraint checked before any training.

A space file (YAML; the default spaces ship in the package, ``visrec/search/spaces/{faces,landmarks}.yaml``, and
:meth:`SearchSpace.default` reads them) has the shape
of an architecture spec (:mod:`visrec.models.searched`) where any field may be a list of choices instead of
one value::

    task: faces
    input_size: 112
    stem: {channels: [16, 32], kernel: 3, stride: 2, act: [prelu, silu]}
    stages:
      - {block: [mbconv, fused_mbconv], kernel: [3, 5], expand: [1, 3, 6], repeats: [1, 2], channels: [16, 24],
         stride: 1, se: [false, true], act: prelu}
    head: {channels: [256, 512]}

:meth:`SearchSpace.sample` picks one value per field through a ``choose(name, options)`` callable (an Optuna
trial's ``suggest_categorical``, or a seeded random choice), giving a plain spec; the parameter names are
stable (``stages.2.kernel``), so a study's trials stay comparable. Every choice is checked when the space is
read: an empty list, an unknown block or a value outside a field's range is a :class:`ConfigError` naming the
file and the field.

Budget (:func:`candidate_cost`, :func:`over_budget`): a candidate is built on the meta device (shapes only, no
memory, no weights) and counted by the LFR FLOP rule (:func:`visrec.budget.lfr_flops`: 2 x MACs of every
convolution and FC, the organisers' bias rule) and by parameters x 4 bytes (float32); one over the protocol's
limits (or ``max_gflops`` / ``max_mb``) is rejected without training. :func:`smallest_cost` is the cost of the
space's least candidate, so that a budget nothing can meet is refused before the search starts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from visrec.budget import lfr_flops
from visrec.config import read_yaml_mapping
from visrec.errors import ConfigError
from visrec.models import build_backbone
from visrec.models.meta import on_meta_device
from visrec.models.searched import BLOCKS, HeadSpec, StageSpec, StemSpec, check_spec

Choose = Callable[[str, list], object]
DEFAULT_SPACES = Path(__file__).with_name("spaces")


def _options(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class SearchSpace:
    """A checked search space (module docstring). ``path`` names the file in errors."""

    def __init__(self, raw: dict, path: str | Path = "search space"):
        self.path = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.path}: a search space is a mapping (task, input_size, stem, stages, head)")
        unknown = set(raw) - {"task", "input_size", "stem", "stages", "head"}
        if unknown:
            raise ConfigError(f"{self.path}: unknown field {sorted(unknown)[0]!r}: expected task, input_size, stem, "
                              f"stages, head")
        self.task = raw.get("task", "faces")
        if self.task not in ("faces", "landmarks"):
            raise ConfigError(f"{self.path}: task: {self.task!r} is not faces or landmarks")
        self.input_size = raw.get("input_size", 112)
        self.stem = self._section("stem", raw.get("stem") or {}, StemSpec)
        self.head = self._section("head", raw.get("head") or {}, HeadSpec)
        stages = raw.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{self.path}: stages: a non-empty list of stages")
        self.stages = [self._section(f"stages[{i}]", s, StageSpec) for i, s in enumerate(stages)]
        check_spec(self.least(), f"{self.path} (its least candidate)")  # the input survives every stride

    def _section(self, where: str, raw, model) -> dict[str, list]:
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.path}: {where}: a mapping of fields to a value or a list of choices")
        out = {}
        for name, value in raw.items():
            if name not in model.model_fields:
                raise ConfigError(f"{self.path}: {where}.{name}: unknown field; expected one of "
                                  f"{', '.join(model.model_fields)}")
            options = _options(value)
            if not options:
                raise ConfigError(f"{self.path}: {where}.{name}: an empty list of choices")
            for option in options:  # each choice alone must make a valid field
                if name == "block" and option not in BLOCKS:
                    raise ConfigError(f"{self.path}: {where}.block: unknown block {option!r}: expected one of "
                                      f"{', '.join(BLOCKS)}")
                probe = {"block": "mbconv", "channels": 8} if model is StageSpec else {}
                try:
                    model.model_validate({**probe, name: option})
                except Exception as exc:  # noqa: BLE001 - pydantic's message, re-said with the field's place
                    msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
                    raise ConfigError(f"{self.path}: {where}.{name}: choice {option!r}: {msg}") from None
            out[name] = options
        if model is StageSpec and not {"block", "channels"} <= set(out):
            raise ConfigError(f"{self.path}: {where}: a stage needs block and channels")
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "SearchSpace":
        return cls(read_yaml_mapping(path), path)

    @classmethod
    def default(cls, task: str) -> "SearchSpace":
        """The space shipped for ``task`` (faces | landmarks)."""
        path = DEFAULT_SPACES / f"{task}.yaml"
        if task not in ("faces", "landmarks"):
            raise ConfigError(f"no default search space for task {task!r}: faces or landmarks")
        return cls.from_file(path)

    @property
    def text(self) -> str:
        """The space as canonical YAML (what a study records, to refuse resuming under another space)."""
        import yaml

        raw = {"task": self.task, "input_size": self.input_size, "stem": self.stem, "stages": self.stages,
               "head": self.head}
        return yaml.safe_dump(raw, sort_keys=True)

    @property
    def size(self) -> int:
        """How many distinct specs the space holds."""
        n = 1
        for section in [self.stem, self.head, *self.stages]:
            for options in section.values():
                n *= len(options)
        return n

    def sample(self, choose: Choose) -> dict:
        """One spec: ``choose(name, options)`` picks each field with more than one choice."""
        def pick(prefix, section):
            return {k: (v[0] if len(v) == 1 else choose(f"{prefix}.{k}", v)) for k, v in section.items()}

        return {"task": self.task, "input_size": self.input_size, "stem": pick("stem", self.stem),
                "stages": [pick(f"stages.{i}", s) for i, s in enumerate(self.stages)], "head": pick("head", self.head)}

    def random(self, seed: int) -> dict:
        rng = random.Random(seed)
        return self.sample(lambda _name, options: rng.choice(options))

    def least(self) -> dict:
        """Every numeric field at its least choice, every flag off, the first block listed: the space's cheapest
        corner (the least FLOPs up to the block kind, which :func:`smallest_cost` also minimises)."""
        def low(options):
            nums = [o for o in options if isinstance(o, (int, float)) and not isinstance(o, bool)]
            if nums:
                return min(nums)
            return False if False in options else options[0]

        return self.sample(lambda _name, options: low(options))


@dataclass(frozen=True)
class Cost:
    flops: int  # LFR rule, batch 1
    params: int

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def mb(self) -> float:
        """float32 weights, MB (1e6 bytes): the parameters' share of the exported file."""
        return 4 * self.params / 1e6


def model_cost(name: str, kwargs: dict, input_size=(1, 3, 112, 112)) -> Cost:
    """LFR FLOPs and parameters of a registry model built on the meta device (shapes only, no memory): the one
    count every candidate of a search, or of ``budget fit``'s grid, is judged by."""
    with on_meta_device():
        net = build_backbone(name, **kwargs)
        return Cost(lfr_flops(net, tuple(input_size)), sum(p.numel() for p in net.parameters()))


def candidate_cost(spec: dict, *, embedding_size: int = 512, num_points: int = 106) -> Cost:
    """LFR FLOPs and parameters of the network ``spec`` builds, counted on the meta device."""
    side = check_spec(spec).input_size
    return model_cost("searched", {"spec": spec, "embedding_size": embedding_size, "num_points": num_points},
                      (1, 3, side, side))


def over_budget(cost: Cost, max_gflops: float | None, max_mb: float | None) -> str | None:
    """Why ``cost`` breaks the budget (GFLOPs at most ``max_gflops``; weights under ``max_mb``), or None."""
    if max_gflops is not None and cost.gflops > max_gflops:
        return f"{cost.gflops:.4f} GFLOPs > {max_gflops:g}"
    if max_mb is not None and cost.mb >= max_mb:
        return f"{cost.mb:.2f} MB of float32 weights >= {max_mb:g}"
    return None


def smallest_cost(space: SearchSpace, **kwargs) -> Cost:
    """The cost of the space's least candidate: :meth:`SearchSpace.least`, then per stage the block kind
    (of those listed) that costs least with the rest fixed."""
    spec = space.least()
    for i, stage in enumerate(space.stages):
        costs = []
        for block in stage["block"]:
            trial = {**spec, "stages": [dict(s) for s in spec["stages"]]}
            trial["stages"][i]["block"] = block
            costs.append((candidate_cost(trial, **kwargs).flops, block))
        spec["stages"][i]["block"] = min(costs)[1]
    return candidate_cost(spec, **kwargs)


def check_budget_reachable(space: SearchSpace, max_gflops: float | None, max_mb: float | None, **kwargs) -> Cost:
    """The least candidate's cost, or a :class:`ConfigError` when even it breaks the budget."""
    least = smallest_cost(space, **kwargs)
    why = over_budget(least, max_gflops, max_mb)
    if why is not None:
        raise ConfigError(f"{space.path}: no candidate can meet the budget: the least one has {why} (its "
                          f"{least.params:,} parameters); allow more, or shrink the space")
    return least
