"""The README's shell blocks run as written, in order, in the environment the README tells the user to activate.

A ```bash block runs unless an HTML comment right above it says `not run: <reason>` (set-up commands, 8 GPUs,
the organisers' files, a long-running server). Every `visrec` line of a block that is not run is still parsed
against the command tree, so it cannot drift from the CLI. The run happens in a scratch folder holding a copy
of `configs/` and a `.venv` link to this interpreter's environment, so `data/`, `runs/` and reports land there.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer.main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\s*\n)?```bash\n(?P<body>.*?)```", re.S)


def blocks() -> list[tuple[str | None, str]]:
    """(reason it is not run or None, body) for each ```bash block, in README order."""
    out = []
    for m in BLOCK.finditer(README.read_text()):
        marker = m.group("marker")
        reason = None
        if marker is not None:
            assert marker.startswith("not run:") and marker[len("not run:"):].strip(), \
                f"a comment above a bash block must say 'not run: <reason>', got {marker!r}"
            reason = marker[len("not run:"):].strip()
        out.append((reason, m.group("body")))
    return out


def command_lines(body: str) -> list[list[str]]:
    """The shell words of each command line (continuations joined, comments dropped)."""
    joined = body.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def parse_visrec(words: list[str]) -> None:
    """Resolve `visrec a b ...` down the command tree and parse its parameters (nothing runs)."""
    from visrec.cli import app

    cmd = typer.main.get_command(app)
    args = list(words)
    if args == ["--version"]:
        return
    path = ["visrec"]
    while hasattr(cmd, "commands"):
        assert args and args[0] in cmd.commands, f"{' '.join(words)}: no command {args[:1]} under {' '.join(path)}"
        path.append(args[0])
        cmd = cmd.commands[args.pop(0)]
    cmd.make_context(" ".join(path), args)  # raises on an unknown option or a missing required parameter


def visrec_calls(body: str) -> list[list[str]]:
    calls = []
    for words in command_lines(body):
        for i, w in enumerate(words):
            if w == "visrec":
                calls.append(words[i + 1:])
            elif w == "visrec.cli" and i > 0 and words[i - 1] == "-m":
                calls.append(words[i + 1:])
    return calls


def test_readme_blocks_are_marked_and_every_visrec_line_parses():
    found = blocks()
    assert sum(reason is None for reason, _ in found) >= 6, "the README's examples are meant to run"
    calls = [c for _, body in found for c in visrec_calls(body)]
    assert len(calls) >= 30
    for call in calls:
        if "|" in " ".join(call):  # a `list|export|import` shorthand is prose, not a command
            continue
        parse_visrec(call)


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path):
    work = tmp_path / "readme"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), NO_COLOR="1", COLUMNS="200")
    timings = []
    for n, (reason, body) in enumerate(blocks()):
        if reason is not None:
            continue
        t0 = time.perf_counter()
        done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + body], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900)
        timings.append((n, time.perf_counter() - t0, " / ".join(l for l in body.strip().splitlines()[1:3])))
        (tmp_path / f"block{n}.log").write_text(done.stdout + done.stderr)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"README block {n} failed:\n{body}\n--- output ---\n{out[-4000:]}"
        assert "Traceback" not in out, f"README block {n}:\n{out[-4000:]}"
        # the README's data are large enough for the targets it names, and nothing warns
        assert "not estimable" not in out, f"README block {n} names a target its data cannot estimate:\n{out[-3000:]}"
        assert "Warning" not in out, f"README block {n} warns:\n{out[-3000:]}"
    # the minutes the README states are these, measured where CI runs (kept beside the scratch folder)
    lines = [f"README block {n}: {seconds:6.1f} s  {first}" for n, seconds, first in timings]
    (tmp_path / "timings.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
