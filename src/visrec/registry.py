"""Name -> constructor registries: every pluggable kind of thing (backbones, margin / distillation / landmark
losses, training tasks, poolings, post-processing stages, alignment methods, face detectors, foreign model
adapters, gallery backends) is one ``Registry``.

A new component is one file that decorates its class/function with ``@REGISTRY.register("name")``, plus one
import line in its package ``__init__`` so the decorator runs - or, from another package, a Python entry
point in the group ``visrec.plugins`` naming the module that registers it::

    # the plugin's pyproject.toml
    [project.entry-points."visrec.plugins"]
    my_backbone = "my_package.backbone"

Entry points are loaded the first time a registry is asked for a name it does not hold (or for its list of
names), so an installed plugin's names work in configs and on the command line with no import by the user.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Generic, TypeVar

from visrec.errors import ConfigError

T = TypeVar("T")


def check_options(factory: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    """``ConfigError`` when keyword ``options`` do not fit ``factory``'s signature: an unknown option (named,
    with the known ones), or a required option left out. Factories without a readable signature pass."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(f"{what} has no option {unknown[0]!r}; its options: {', '.join(known) or 'none'}")
    missing = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.default is p.empty and p.name not in options]
    if missing:
        raise ConfigError(f"{what} needs option {missing[0]!r}; its options: {', '.join(known)}")


PLUGIN_GROUP = "visrec.plugins"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import every module named by an entry point in :data:`PLUGIN_GROUP` (once per process); returns the
    entry-point names loaded. A plugin that fails to import is reported with a warning naming it and the
    error, and the others still load: one broken package must not break every registry lookup."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
            loaded.append(ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party module is reported, not raised
            warnings.warn(f"visrec plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                          stacklevel=3)
    return loaded


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str, *aliases: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            for key in (name, *aliases):
                key = key.lower()
                if key in self._items and self._items[key] is not obj:
                    raise ValueError(f"{self.kind} {key!r} registered twice")
                self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name.lower() not in self._items:
            load_plugins()
        try:
            return self._items[name.lower()]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> T:
        """Build ``name`` with ``kwargs`` (a config's options). An option the constructor does not take, or a
        required one missing, is a ``ConfigError`` naming it and listing the options there are, checked
        against the signature before the call. A ValueError, TypeError or RuntimeError the constructor raises
        for the options given (a negative width: "negative dimension"; a size past memory) is a
        ``ConfigError`` naming those options and the constructor's words; with no options given it stays a
        bug and propagates."""
        factory = self.get(name)
        check_options(factory, kwargs, f"{self.kind} {name!r}")
        if not kwargs:
            return factory()
        try:
            return factory(**kwargs)
        except (ValueError, TypeError, RuntimeError) as exc:
            given = ", ".join(f"{k}={v!r}"[:80] for k, v in kwargs.items())
            raise ConfigError(f"{self.kind} {name!r} cannot be built with {given}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from exc

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name.lower() not in self._items:
            load_plugins()
        return name.lower() in self._items
