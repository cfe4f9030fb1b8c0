"""The package's shape holds: every import (module level or inside a function) points down the layers of
docs/design.md, and no module imports itself back through others (no circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "visrec"

# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    ["errors", "registry", "_files", "_structured", "_optional", "_torchfile", "_npz", "_onnx_check", "_onnx"],
    ["data"],  # real formats, synthetic data, the image decoder
    ["evaluate"],  # metrics over arrays: no model, trainer or index, so anything may call them
    ["config", "protocols", "distributed"],  # distributed: process groups and collectives
    ["models"],  # backbones, heads, model files and contracts, a model run over a data set
    ["losses"],
    ["export"],  # ONNX export (budget measures the file it writes)
    ["budget"],
    ["train"],  # the trainer's validation calls evaluate and models.inference
    ["search"],  # architecture search: spaces as data, budgets before training, trials that train
    ["faces"],  # the face pipeline, and evaluation runs of face models
    ["index"],  # galleries and the product catalogue, and its evaluation run
    ["serve"],
    ["api", "demo_real"],
    ["demo"],
    ["commands"],
    ["cli"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported visrec module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "visrec"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "visrec":
                continue
            for a in node.names:  # `from visrec.faces import align` imports the module visrec.faces.align
                candidate = f"{base}.{a.name}"
                found.append((candidate if (SRC.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                              or (SRC.parent / candidate.replace(".", "/")).is_dir() else base, node.lineno))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def test_every_module_is_on_a_layer():
    unplaced = sorted({layer_of(m) for m in all_modules()} - set(RANK) - {"__init__"})
    assert not unplaced, f"modules on no layer of LAYERS (add them where docs/design.md puts them): {unplaced}"


def test_no_import_points_up_a_layer():
    upward = []
    for module, path in all_modules().items():
        mine = layer_of(module)
        if mine == "__init__":  # the package root names its API lazily, by string
            continue
        for target, line in imports(path):
            theirs = layer_of(target)
            if theirs != "__init__" and RANK[theirs] > RANK[mine]:
                upward.append(f"{path.relative_to(SRC.parent)}:{line}: {mine} imports {target} ({theirs})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    modules = all_modules()
    graph = {m: sorted({t for t, _ in imports(p) if t in modules and t != m}) for m, p in modules.items()}
    # a package's __init__ that imports its own submodules to run their registrations is not a circle when the
    # submodule imports only names the __init__ defined before that line; count module-to-module edges only
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


# third-party modules heavy enough that a visrec module imports them (or a visrec module that does) inside a function
HEAVY = {"torch", "torchvision", "cv2", "onnx", "onnxruntime", "faiss", "pymilvus", "milvus", "fastapi", "starlette",
         "uvicorn", "matplotlib", "dlib", "timm", "scipy", "safetensors", "PIL", "triton"}


def function_level_lines(path: Path) -> set[int]:
    """Lines of the import statements inside a function (or lambda) body."""
    lines = set()

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            deeper = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if deeper and isinstance(child, (ast.Import, ast.ImportFrom)):
                lines.add(child.lineno)
            visit(child, deeper)

    visit(ast.parse(path.read_text(), str(path)), False)
    return lines


def third_party_at_load(path: Path) -> set[str]:
    """Top-level names of the non-visrec modules the file imports when it is loaded (outside any function)."""
    inside = function_level_lines(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and node.lineno not in inside:
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.lineno not in inside and not node.level:
            found.add(node.module.split(".")[0])
    return found - {"visrec"}


def test_function_level_imports_defer_a_heavy_dependency():
    """A visrec import inside a function must keep a heavy dependency out of the importing module's load: the
    imported module loads one (itself or through the visrec modules it imports at load, packages' __init__
    included) that the importer does not. Never to dodge a circle: there are none to dodge. The CLI and its commands
    import inside each command on purpose (a fast `visrec --help`) and are not held to this."""
    modules = all_modules()
    at_load = {}
    for module, path in modules.items():
        inside = function_level_lines(path)
        at_load[module] = ([t for t, line in imports(path) if line not in inside], third_party_at_load(path))

    def loads(module: str) -> tuple[set[str], set[str]]:
        """(visrec modules, third-party top-level names) that `import module` runs."""
        seen, third, todo = set(), set(), [module]
        while todo:
            parts = todo.pop().split(".")
            for end in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                name = ".".join(parts[:end])
                if name in modules and name not in seen:
                    seen.add(name)
                    todo += at_load[name][0]
                    third |= at_load[name][1]
        return seen, third

    unjustified = []
    for module, path in sorted(modules.items()):
        if module == "visrec.cli" or module.startswith("visrec.commands"):
            continue
        mine = loads(module)[1]
        inside = function_level_lines(path)
        for target, line in imports(path):
            if line not in inside:
                continue
            if (loads(target)[1] - mine) & HEAVY:
                continue  # it keeps a heavy dependency out of this module's load
            unjustified.append(f"{path.relative_to(SRC.parent)}:{line}: {target} (import it at module level)")
    assert not unjustified, "function-level imports that defer no heavy dependency:\n" + "\n".join(unjustified)


def test_every_module_imports_first():
    """Whichever module a user imports first, it loads: the package __init__ files import their submodules in an
    order that works from every entry point (module-level imports only, so a wrong order fails here, not later)."""
    code = """
import sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "visrec" or m.startswith("visrec.")]:
        del sys.modules[loaded]
    try:
        __import__(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    names = sorted(all_modules())
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"modules that fail when imported first:\n{done.stdout}{done.stderr[-2000:]}"
