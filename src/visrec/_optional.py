"""Import heavy optional dependencies where they are used, with an actionable message."""

from __future__ import annotations

import importlib
from types import ModuleType

from visrec.errors import OptionalDependencyError


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import `module` or raise telling the user to `pip install visrec[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        pkg = package or module
        raise OptionalDependencyError(
            f"{module!r} is needed for this feature but is not installed: "
            f"pip install 'visrec[{extra}]' (or pip install {pkg})"
        ) from exc
