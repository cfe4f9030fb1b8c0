"""Networks built for their shapes only, on PyTorch's ``meta`` device (nothing allocated).

A model file's network is first built this way to be compared with the weights it holds (a 2 KB file must not
ask for gigabytes), and budgets count FLOPs and parameters of candidates that are never trained. On ``meta`` a
random initialisation (``normal_``, ``uniform_``, ...) computes nothing, but its Python reference
implementation imports TorchDynamo on first use: 1.3 s of every command that loads a checkpoint, spent on
nothing. :func:`on_meta_device` builds on ``meta`` and skips those calls.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

# in-place random fills, and the initialisers of torch.nn.init (which hand a tensor subclass or mode the call
# whole): all they change is values, and a meta tensor has none
_RANDOM_FILLS = frozenset(
    [getattr(torch.Tensor, name) for name in ("normal_", "uniform_", "random_", "bernoulli_", "exponential_",
                                              "log_normal_", "cauchy_", "geometric_")]
    + [getattr(torch.nn.init, name) for name in dir(torch.nn.init)
       if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.nn.init, name))])


class _SkipRandomFillsOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # init's take it by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta_device():
    """Tensors and modules created in the block live on ``meta`` (shapes and dtypes, no memory), and random
    fills of meta tensors are skipped."""
    with torch.device("meta"), _SkipRandomFillsOnMeta():
        yield
