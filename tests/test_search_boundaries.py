"""The search's and the budget's input boundaries: a journal torn by a kill or not a journal at all, budget flags
that are not finite, a protocol that is not for this search or asks for a huge probe, a journal whose trial
records are not what a search writes, and models too large to build."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from torch import nn

pytest.importorskip("optuna")

import optuna  # noqa: E402

from test_search_study import TINY_FACES, face_settings, faces  # noqa: E402,F401  (the tiny face space and data)
from visrec.budget import MAX_BUILD_PARAMS, check  # noqa: E402
from visrec.errors import ConfigError, DataError  # noqa: E402
from visrec.search.study import (STUDY_NAME, export_spec, load_search_study, open_storage, prepare,  # noqa: E402
                                 resolve_budget, summarise)

SPEC = {"task": "faces", "input_size": 112, "stem": {"channels": 8, "kernel": 3, "stride": 2, "act": "prelu"},
        "stages": [{"block": "mbconv", "kernel": 3, "expand": 1, "repeats": 1, "channels": 8, "stride": 2}],
        "head": {"channels": 32}}
SETTINGS = {"task": "faces", "target_fpr": 0.05, "budget": {"max_gflops": 0.006}}


def journal_study(run: Path, trials: list[dict]):
    """A study journal in ``run`` as a search leaves it: its settings, and complete trials with these user
    attributes over the defaults (one categorical parameter, a spec, its cost and score)."""
    run.mkdir(parents=True, exist_ok=True)
    storage, _ = open_storage(None, run)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("settings", SETTINGS)
    dist = optuna.distributions.CategoricalDistribution([8, 16])
    for attrs in trials:
        attrs = {"spec": SPEC, "gflops": 0.003, "mb": 0.1, "score": 0.5, "trained": True, **attrs}
        values = [0.5 if not isinstance(attrs["score"], float) or math.isnan(attrs["score"]) else attrs["score"],
                  0.003]
        study.add_trial(optuna.trial.create_trial(params={"stem.channels": 8}, distributions={"stem.channels": dist},
                                                  values=values, user_attrs=attrs))
    return run / "study.journal"


# --- 1, 2: the journal file -----------------------------------------------------------------------------

def test_a_torn_last_line_left_by_a_kill_is_cut_before_the_next_write_so_no_trial_is_lost(tmp_path):
    path = journal_study(tmp_path / "run", [{}, {}])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code":8,"worker_id":"x","trial_id":1,"user_at')  # killed mid-write
    storage, _ = open_storage(None, tmp_path / "run")  # what --resume opens before it writes
    assert path.read_bytes() == whole  # only the torn bytes went
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    study.set_user_attr("after", 1)  # a write after the repair lands on a line of its own
    study, desc = load_search_study(None, tmp_path / "run")  # every later command still reads it
    assert len(summarise(study, desc).rows) == 2 and study.user_attrs["after"] == 1


def test_a_file_that_is_not_a_journal_is_refused_naming_it_and_the_line_and_left_as_it_was(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nsecond line")
    with pytest.raises(DataError, match=r"notes.txt.*line 1 is not an Optuna journal entry"):
        open_storage(str(notes), tmp_path)
    assert notes.read_text() == "my notes\nsecond line"
    one_line = tmp_path / "one.txt"  # no newline at all: not taken for a torn entry and cut
    one_line.write_text("hello")
    with pytest.raises(DataError, match=r"one.txt.*line 1"):
        open_storage(str(one_line), tmp_path)
    assert one_line.read_text() == "hello"
    path = journal_study(tmp_path / "run", [{}])
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3] + [b'{"op_code":8,"trial_id":0,"user_at\n'] + lines[3:]))
    before = path.read_bytes()
    for write in (True, False):
        with pytest.raises(DataError, match=r"study.journal.*line 4 is not an Optuna journal entry"):
            open_storage(None, tmp_path / "run", write=write)
    assert path.read_bytes() == before
    with pytest.raises(ConfigError, match=r"--storage .*run: a directory"):
        open_storage(str(tmp_path / "run"), tmp_path)


@pytest.mark.parametrize("entry, why", [
    (b'{"op_code":99,"worker_id":"x"}', r"line 4 \(op_code 99\) .*an operation this Optuna does not know"),
    (b'{"op_code":4,"worker_id":"x","trial_id":0}', r"line 4 \(op_code 4, trial_id 0\) .*KeyError: 'study_id'"),
])
def test_an_entry_optuna_cannot_replay_is_named_by_its_line(tmp_path, entry, why):
    path = journal_study(tmp_path / "run", [{}])
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3] + [entry + b"\n"] + lines[3:]))
    for write in (True, False):
        with pytest.raises(DataError, match=r"study.journal: " + why):
            open_storage(None, tmp_path / "run", write=write)


def test_report_and_export_never_create_a_journal(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"study.journal: no such journal file"):
        load_search_study(None, tmp_path / "empty")
    assert not (tmp_path / "empty" / "study.journal").exists()


# --- 3, 4, 5, 6: the budget and the protocol -------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [((math.nan, None, None), "--max-gflops"), ((None, math.inf, None), "--max-mb"),
                                          ((None, None, math.nan), "--max-ms"), ((-1.0, None, None), "--max-gflops")])
def test_a_budget_flag_that_is_not_a_finite_positive_number_is_refused_naming_it(flags, named):
    with pytest.raises(ConfigError, match=rf"{named} .*finite number > 0"):
        resolve_budget(None, *flags)
    with pytest.raises(ConfigError, match=named):  # it must not cancel the protocol's own limit either
        resolve_budget("icme21-landmarks", *flags)


@pytest.mark.parametrize("text, field", [
    ("name: x\nmax_gflops: .inf\n", "max_gflops"),
    ("name: x\nmax_size_mb: .nan\n", "max_size_mb"),
    ("name: x\ninput_size: [1, 3, 40000, 40000]\n", "input_size"),
    ("name: x\ninput_size: [1, 3, -5, 112]\n", "input_size"),
    ("name: x\ninput_size: [1, 1, 112, 112]\n", "input_size"),
    ("name: x\ninput_size: [8, 3, 112, 112]\n", "input_size"),
])
def test_a_protocol_with_an_infinite_limit_or_an_unbounded_probe_is_refused_naming_the_field(tmp_path, text, field):
    from visrec.protocols import load_protocol

    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=rf"bad.yaml: invalid protocol: {field}"):
        load_protocol(bad)


def test_the_protocols_bound_on_a_side_is_the_model_contracts():
    from visrec.models.contract import MAX_INPUT_SIDE
    from visrec.protocols import MAX_INPUT_SIDE as PROTOCOL_SIDE

    assert PROTOCOL_SIDE == MAX_INPUT_SIDE


def test_a_model_that_does_not_take_the_protocols_input_is_an_error_naming_both(tmp_path):
    p = tmp_path / "wide.yaml"
    p.write_text("name: wide\nmax_gflops: 1\ninput_size: [1, 3, 64, 64]\n")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 110 * 110, 8))  # takes 112 px only
    with pytest.raises(ConfigError, match=r"Sequential does not take the input_size \[1, 3, 64, 64\] of protocol "
                                          r".*wide.yaml"):
        check(net, str(p), with_size=False)


def test_a_protocol_for_another_task_or_input_size_is_refused_before_the_study_is_written(faces, tmp_path):
    p224 = tmp_path / "p224.yaml"
    p224.write_text("name: big\ntask: faces\nmax_gflops: 0.006\ninput_size: [1, 3, 224, 224]\n")
    marks = tmp_path / "marks.yaml"
    marks.write_text("name: marks\ntask: landmarks\nmax_gflops: 0.006\n")
    for protocol, field in ((p224, "input_size"), (marks, "task")):
        out = tmp_path / f"run-{field}"
        settings = face_settings(faces, out, budget=resolve_budget(str(protocol), None, None, None))
        with pytest.raises(ConfigError, match=rf"protocol .*{protocol.name}: {field} is"):
            prepare(settings)
        assert not (out / "study.journal").exists()


# --- 7: models too large to build -------------------------------------------------------------------------

def test_a_registry_model_over_the_parameter_cap_is_refused_before_its_weights_are_built(monkeypatch, tmp_path):
    import visrec.budget
    from visrec.commands.budget import _model_from_spec
    from visrec.search.fit import fit_to_budget

    assert MAX_BUILD_PARAMS == 2**29  # 2 GiB of float32 weights, the most one ONNX file holds
    monkeypatch.setattr(visrec.budget, "MAX_BUILD_PARAMS", 10_000)  # the cap, made small enough to test fast
    built = []
    real = nn.Conv2d.reset_parameters
    monkeypatch.setattr(nn.Conv2d, "reset_parameters", lambda self: built.append(self.weight.device.type) or real(self))
    with pytest.raises(ConfigError, match=r"mbf --set scale=2: mbf has [\d,]+ parameters .*over the 10,000"):
        _model_from_spec("mbf", ["scale=2"])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    with pytest.raises(ConfigError, match=r"spec.yaml: searched has [\d,]+ parameters"):
        _model_from_spec(str(spec), [])
    with pytest.raises(ConfigError, match=r"pfld .*the fit to icpr20-landmarks.*: pfld has"):
        fit_to_budget("pfld", "icpr20-landmarks", knobs={"width_mult": [0.25]})
    assert built and set(built) == {"meta"}  # counted on the meta device, never built with real weights
    with pytest.raises(ConfigError, match=r"--set is for a registry name"):
        _model_from_spec(str(spec), ["scale=2"])


# --- 8: trial records read from the journal ----------------------------------------------------------------

@pytest.mark.parametrize("attrs, field", [
    ({"score": math.nan}, "score"), ({"score": "0.9"}, "score"), ({"score": 1.5}, "score"),
    ({"gflops": "lots"}, "gflops"), ({"gflops": math.inf}, "gflops"), ({"mb": -1}, "mb"),
    ({"spec": {**SPEC, "stem": {"channels": 8, "kernel": 4}}}, "spec"),
    ({"spec": {**SPEC, "head": {"channels": 99999}}}, "spec"),
    ({"spec": {**SPEC, "task": "landmarks"}}, "spec"), ({"same_as": "zero"}, "same_as"),
    ({"gflops": None}, "gflops"),  # a trained trial always recorded its cost
])
def test_a_trial_record_that_is_not_what_a_search_writes_is_an_error_naming_the_storage_and_trial(tmp_path, attrs,
                                                                                                 field):
    journal_study(tmp_path / "run", [{}, attrs])
    study, desc = load_search_study(None, tmp_path / "run")
    with pytest.raises(DataError, match=rf"study.journal, record trial 1, field '{field}'"):
        summarise(study, desc)


def test_a_trial_killed_between_its_spec_and_its_cost_is_abandoned_and_the_study_still_reads(tmp_path):
    """A kill -9 landed after a worker recorded a trial's spec and before its GFLOPs (each attribute is its own
    journal write); the resume marked it abandoned and then refused the whole journal for the missing cost
    (seen in CI). An abandoned trial, or one a live worker is recording now, may lack its cost."""
    from visrec.search.study import recover_abandoned, this_worker

    run = tmp_path / "run"
    journal_study(run, [{}])
    study, _ = load_search_study(None, run)
    me = this_worker()
    killed, live = study.ask(), study.ask()
    killed.set_user_attr("worker", {**me, "start": -1})  # this pid with another start time: a dead process
    live.set_user_attr("worker", me)
    for trial in (killed, live):
        trial.set_user_attr("spec", SPEC)  # and nothing after it
    assert recover_abandoned(study) == [killed.number]
    result = summarise(*load_search_study(None, run))  # read back from the journal file
    assert [(r.number, r.status, r.gflops) for r in result.rows] == [
        (0, "complete", 0.003), (killed.number, "abandoned", None), (live.number, "running", None)]
    assert result.best.number == 0


def test_a_diverged_trials_worst_score_is_kept_and_never_best(tmp_path):
    journal_study(tmp_path / "run", [{"score": -math.inf}, {"score": 0.25}])
    result = summarise(*load_search_study(None, tmp_path / "run"))
    assert result.best.number == 1


def test_a_report_whose_protocol_file_has_moved_is_written_with_that_row_not_checked(tmp_path, monkeypatch):
    """The study records the protocol's path; when that file is gone the report stopped with 'unknown protocol'.
    The budget counted by the search is still the study's, so the report is written and says what it could not
    check."""
    from visrec.search.report import write_search_report

    proto = tmp_path / "mine.yaml"
    monkeypatch.setitem(SETTINGS, "budget", {"max_gflops": 0.006, "protocol": str(proto)})
    journal_study(tmp_path / "run", [{}])
    page = write_search_report(tmp_path / "run", summarise(*load_search_study(None, tmp_path / "run"))).read_text()
    assert f"protocol {proto}" in page and "cannot check: unknown protocol" in page and "0.0030 G" in page


def test_export_refuses_a_failed_trial(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    storage, _ = open_storage(None, run)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("settings", SETTINGS)
    dist = optuna.distributions.CategoricalDistribution([8, 16])
    study.add_trial(optuna.trial.create_trial(
        params={"stem.channels": 8}, distributions={"stem.channels": dist}, state=optuna.trial.TrialState.FAIL,
        user_attrs={"spec": SPEC, "gflops": 0.003, "trained": True, "failed": "non-finite loss at step 3"}))
    (run / "trials" / "0000").mkdir(parents=True)
    (run / "trials" / "0000" / "config.yaml").write_text("task: faces\n")
    result = summarise(*load_search_study(None, run))
    with pytest.raises(ConfigError, match=r"trial 0 is failed: only a complete, pruned or repeated trial"):
        export_spec(result, run, 0, tmp_path / "best.yaml")
    assert not (tmp_path / "best.yaml").exists()


def test_the_trials_table_says_when_it_shows_only_the_best():
    from rich.console import Console

    from visrec.commands.search import _trials_table
    from visrec.search.study import SearchResult, TrialRow

    rows = [TrialRow(n, "complete", 0.1 + n / 100, 0.02, 0.5, None, "", None) for n in range(12)]
    rows.append(TrialRow(12, "rejected", None, 0.9, 5.0, None, "over budget", None))  # not scored: not counted
    result = SearchResult("journal", {}, "nme", "minimize", rows, rows[0], [0])

    def text(table):
        console = Console(width=300, record=True)
        console.print(table)
        return " ".join(console.export_text().split())  # the caption wraps at the table's width

    shown = text(_trials_table(result, top=10))
    assert "the best 10 of 12 scored trials; visrec search report RUN lists all" in shown
    assert "│ 9 │" in shown and "│ 10 │" not in shown  # the ten lowest NMEs, best first
    every = text(_trials_table(result))
    assert "│ 11 │" in every and "scored trials" not in every
