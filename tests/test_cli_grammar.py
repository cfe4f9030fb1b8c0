"""One CLI grammar (docs/cli.md), checked over every command's parameters: one positional at most, the shared
options spelled one way, help everywhere, every command documented, `visrec --version`."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from visrec import __version__
from visrec.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
# parameter name -> the one way it is spelled when it is an option
SHARED = {"config": ["--config"], "model": ["--model"], "data": ["--data"], "out": ["--out"],
          "target_fpr": ["--target-fpr"], "target_fpir": ["--target-fpir"], "overrides": ["--set"],
          "protocol": ["--protocol", "-p"], "k": ["-k"], "gallery": ["--gallery"]}
# spellings the grammar replaced: none may come back
RETIRED = {"--checkpoint", "--from", "--onnx", "--target", "--far", "--fpir", "--root", "--json"}
NEVER_POSITIONAL = {"config", "out", "output", "data"}


def commands():
    def walk(cmd, path):
        if hasattr(cmd, "commands"):  # a group
            for name, sub in sorted(cmd.commands.items()):
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    return dict(walk(typer.main.get_command(app), []))


def test_the_walk_sees_every_command():
    found = commands()
    assert len(found) >= 30 and {"train", "budget check", "budget fit", "eval faces", "gallery export",
                                 "data synth landmarks", "products search"} <= set(found)


def test_one_positional_at_most_and_never_a_config_or_an_output():
    for name, cmd in commands().items():
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        assert len(args) <= 1, f"visrec {name}: {len(args)} positionals ({[a.name for a in args]})"
        for a in args:
            assert a.name not in NEVER_POSITIONAL, f"visrec {name}: {a.name} must be an option"


def test_shared_options_are_spelled_one_way_everywhere():
    seen = defaultdict(set)
    for name, cmd in commands().items():
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            flags = sorted([*p.opts, *p.secondary_opts])
            retired = RETIRED & set(flags)
            assert not retired, f"visrec {name}: {sorted(retired)} (docs/cli.md names the one spelling)"
            for flag in flags:
                assert re.fullmatch(r"-[a-z]|--[a-z][a-z0-9-]*", flag), f"visrec {name}: {flag!r}"
            if p.name in SHARED:
                assert p.opts == SHARED[p.name], f"visrec {name}: {p.name} spelled {p.opts}, not {SHARED[p.name]}"
            seen[p.name].add(tuple(p.opts))
    # the same parameter name is the same flags in every command (format/detector/... included)
    differing = {k: v for k, v in seen.items() if len(v) > 1}
    assert not differing, differing


def test_every_parameter_and_command_has_help():
    for name, cmd in commands().items():
        assert (cmd.help or "").strip(), f"visrec {name} has no help"
        for p in cmd.params:
            assert (getattr(p, "help", None) or "").strip(), f"visrec {name}: {p.name} has no help"


def test_every_gallery_command_takes_gallery_and_says_so_in_docs_cli_md():
    text = DOC.read_text()
    gallery_commands = {name: cmd for name, cmd in commands().items() if name.startswith("gallery ")}
    assert set(gallery_commands) == {"gallery enroll", "gallery calibrate", "gallery list", "gallery delete",
                                     "gallery export", "gallery import"}
    for name, cmd in gallery_commands.items():
        assert "gallery" in {p.name for p in cmd.params}, f"visrec {name} has no --gallery"
        row = re.search(rf"^\| `visrec {name}` \| (.*)$", text, flags=re.M)
        assert row and "[--gallery NAME]" in row.group(1), f"docs/cli.md: visrec {name} lacks [--gallery NAME]"


def test_every_command_is_in_docs_cli_md_and_every_documented_one_exists():
    text = DOC.read_text()
    documented = set(re.findall(r"^\| `visrec ([a-z ]+)` \|", text, flags=re.M))
    assert documented == set(commands()), (set(commands()) - documented, documented - set(commands()))


def test_version_and_retired_spellings_fail_clearly():
    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"visrec {__version__}"
    old = runner.invoke(app, ["export", "run", "--onnx", "m.onnx"])
    assert old.exit_code == 2 and "--onnx" in old.output
    # `budget fit` is a real subcommand: `budget MODEL` alone is no longer a command
    assert runner.invoke(app, ["budget", "mbf", "-p", "deepglint-light"]).exit_code == 2
