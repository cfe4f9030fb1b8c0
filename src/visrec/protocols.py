"""Named evaluation protocols as data: compute budgets, metric and data contract.

Budgets (the LFR 2019 rules and the later landmark tracks):
  deepglint-light / iqiyi-light   <= 1 GFLOPs (LFR rule, see ``visrec.budget``), model < 20 MB
  deepglint-large / iqiyi-large   <= 30 GFLOPs
  all four: float32 weights, 512-d feature; images ranked by TPR@FPR=1e-8, videos by TPR@FPR=1e-4
  icpr20-landmarks                <= 1 GFLOPs, <= 20 MB   (106-point landmarks, ICPR 2020)
  icme21-landmarks                <= 100 MFLOPs, <= 2 MB  (ICME 2021)
Size is the byte count of the exported float32 ONNX file in MB = 10^6 bytes (the stricter reading of
"20 MB"); "< 20 MB" is strict, "<= 2 MB" is not. A FLOP limit passes exactly at the limit.
User-defined protocols are YAML files with the same fields (``configs/protocols/example.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visrec._structured import MAX_CONFIG_FILE_BYTES
from visrec.config import safe_load
from visrec.data.text import read_text
from visrec.errors import ConfigError


# visrec.models.contract.MAX_INPUT_SIDE and MAX_EMBEDDING_DIM, the model contract's bounds (importing it loads
# every model)
MAX_INPUT_SIDE = 4096
MAX_EMBEDDING_DIM = 1 << 16
# The largest limits a protocol may set: finite is not enough (1e300 GFLOPs overflows the count it is compared
# with in bytes or FLOPs). 1e6 GFLOPs is a petaFLOP per image, 1e6 MB a terabyte: far above any model visrec
# builds or measures (visrec.budget.MAX_BUILD_PARAMS: 2 GiB of weights).
MAX_GFLOPS = 1e6
MAX_SIZE_MB = 1e6


class Protocol(BaseModel):
    # a limit of .inf or .nan would pass everything (or nothing) silently: numbers are finite
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str
    task: Literal["faces", "faces-video", "landmarks", "products"] = "faces"
    max_gflops: float | None = Field(None, gt=0, le=MAX_GFLOPS,
                                     description="LFR-rule FLOPs (2 x MACs of conv/FC), in 1e9")
    max_size_mb: float | None = Field(None, gt=0, le=MAX_SIZE_MB,
                                      description="float32 ONNX file size, MB = 1e6 bytes")
    size_strict: bool = Field(False, description="True: size must be < limit; False: <= limit")
    dtype: Literal["float32", "any"] = "float32"
    embedding_dim: int | None = Field(None, gt=0, le=MAX_EMBEDDING_DIM)
    input_size: tuple[int, int, int, int] = Field((1, 3, 112, 112), description="(batch, channels, height, width) "
                                                  "of the probe every count runs: 1, 3, sides in pixels")
    metric: str = ""
    targets: tuple[float, ...] = ()

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        # a rate of impostor pairs: 0 would need infinitely many of them (every command reading the protocol
        # refuses it when the file loads, not the one that happens to use the targets)
        for i, t in enumerate(value):
            if not 0.0 < t <= 1.0:
                raise ValueError(f"targets[{i}] must be a false positive rate in (0, 1], got {t!r}")
        return value

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, value: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        # counts are per image (batch 1) of an RGB image; a side is bounded like a model contract's, so a
        # protocol file cannot make the probe a 19 GB tensor
        n, c, h, w = value
        if n != 1 or c != 3 or not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
            raise ValueError(f"must be [1, 3, height, width] with sides of 1-{MAX_INPUT_SIDE} pixels, got "
                             f"{list(value)}")
        return value


_LFR = dict(dtype="float32", embedding_dim=512, metric="TPR@FPR")
BUILTIN: dict[str, Protocol] = {p.name: p for p in [
    Protocol(name="deepglint-light", max_gflops=1.0, max_size_mb=20.0, size_strict=True, targets=(1e-8,), **_LFR),
    Protocol(name="deepglint-large", max_gflops=30.0, targets=(1e-8,), **_LFR),
    Protocol(name="iqiyi-light", task="faces-video", max_gflops=1.0, max_size_mb=20.0, size_strict=True,
             targets=(1e-4,), **_LFR),
    Protocol(name="iqiyi-large", task="faces-video", max_gflops=30.0, targets=(1e-4,), **_LFR),
    Protocol(name="icpr20-landmarks", task="landmarks", max_gflops=1.0, max_size_mb=20.0, metric="NME/AUC@0.08"),
    Protocol(name="icme21-landmarks", task="landmarks", max_gflops=0.1, max_size_mb=2.0, metric="NME/AUC@0.08"),
]}


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A built-in protocol by name, or a user-defined one from a YAML file."""
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key]
    path = Path(key)
    if not path.suffix in (".yaml", ".yml") or not path.exists():
        raise ConfigError(f"unknown protocol {key!r}: built-in ones are {', '.join(BUILTIN)}; "
                          f"or give a .yaml file")
    try:
        raw = safe_load(read_text(path, MAX_CONFIG_FILE_BYTES)) or {}  # a key given twice is refused too
        return Protocol.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: invalid protocol: {details}") from None
