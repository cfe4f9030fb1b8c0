"""JSON and YAML from outside visrec, parsed within bounds.

Manifests, sidecars, journals, gallery files and exports, model metadata, configs and requests are text that
someone else may have written. Three shapes of such text used to end a command in a bare ``RecursionError`` or
stall it for good, whatever the reader's own checks:

* nesting: ``[[[[...]]]]`` fifty thousand deep fails Python's recursive parsers (``json.loads``, PyYAML's
  composer) and every recursive walk after them; a value nested less deep than the parser's limit can still
  fail a walk that starts deeper in the stack. Nothing visrec reads needs more than a few levels, so a value
  is refused above :data:`MAX_NESTING` levels, with a message that says so.
* YAML aliases that expand: ten lines of ``b: &b [*a, *a, ...]`` make a tree of 10^9 values that the loader
  builds in kilobytes (each alias is one shared object) and every walk over it visits 10^9 times ("billion
  laughs"). A YAML document is refused when its aliases expand it beyond :data:`MAX_YAML_VALUES` values.
* a YAML alias inside the node it names (``a: &a [*a]``) builds a list that contains itself: refused.

Both raise ``ValueError`` (:class:`StructureError` for YAML, a ``yaml.YAMLError`` too), what each caller
already catches for malformed text, so each reader keeps naming its own file, record and field.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

MAX_NESTING = 100  # levels of objects/arrays (mappings/sequences): visrec's own files use fewer than ten
MAX_YAML_VALUES = 100_000  # values a YAML document may hold once its aliases are expanded (a config has ~100)
# Whole files read before parsing, refused from their size first. A config or protocol in configs/ is under
# 3 KB; a catalogue manifest grows with the catalogue's unreadable images (a reason of at most 4 KB each).
MAX_CONFIG_FILE_BYTES = 1 << 20
MAX_METADATA_FILE_BYTES = 64 << 20


def nesting_problem(value: Any, limit: int = MAX_NESTING) -> str | None:
    """Why ``value`` (what ``json.loads`` returns: dicts, lists and scalars) is nested too deep, or None. Walks
    without recursion, so it cannot fail where the value came from deep in the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return f"nested more than {limit} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


class NestingError(ValueError):
    """JSON nested more than :data:`MAX_NESTING` levels deep."""


def loads_json(text: str | bytes, *, nesting: int = MAX_NESTING, **kwargs) -> Any:
    """``json.loads(text, **kwargs)``, with a :class:`NestingError` (a ``ValueError``, not a ``RecursionError``)
    for a value nested more than ``nesting`` levels deep (a file that holds values of the bound one level
    down, as a gallery export holds each identity's metadata, passes one more)."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise NestingError(f"JSON nested more than {nesting} levels deep") from None
    problem = nesting_problem(value, nesting)
    if problem is not None:
        raise NestingError(f"JSON {problem}")
    return value


class StructureError(yaml.YAMLError, ValueError):
    """A YAML document nested too deep, expanded too far by its aliases, or containing itself."""


def check_yaml_graph(root: yaml.Node) -> None:
    """Raise :class:`StructureError` when the node graph PyYAML composed (aliases are shared nodes) contains
    itself, nests more than :data:`MAX_NESTING` levels, or expands to more than :data:`MAX_YAML_VALUES` values.
    Linear in the distinct nodes: each node's expanded size is computed once."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            on_path.discard(key)
            if depth[key] > MAX_NESTING:
                raise StructureError(f"YAML nested more than {MAX_NESTING} levels deep{_where(node)}")
            if size[key] > MAX_YAML_VALUES:
                raise StructureError(f"YAML of more than {MAX_YAML_VALUES:,} values once its aliases are "
                                     f"expanded{_where(node)}")
            continue
        if key in size:
            continue
        if key in on_path:
            raise StructureError(f"a YAML alias inside the node it names (a value that contains itself)"
                                 f"{_where(node)}")
        on_path.add(key)
        stack.append((node, True))
        # a child still on the path is a cycle, found when it is popped; finished children are skipped
        stack.extend((child, False) for child in _children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f" (line {mark.line + 1})" if mark is not None else ""
