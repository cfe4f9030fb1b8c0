import pytest

from visrec.config import load_config, parse_config, parse_override
from visrec.errors import ConfigError

BASE = """
task: faces
output: {out}
model: {{name: mobilefacenet, embedding_size: 128}}
data: {{train: /tmp/x}}
schedule: {{max_steps: 10}}
"""


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_valid_config_and_model_kwargs(tmp_path):
    cfg = load_config(write(tmp_path, BASE.format(out=tmp_path / "o")))
    assert cfg.model.name == "mobilefacenet"
    assert cfg.model.kwargs == {"embedding_size": 128}
    assert cfg.optim.lr == 0.1 and cfg.schedule.max_steps == 10


def test_bad_field_names_file_and_path(tmp_path):
    path = write(tmp_path, BASE.format(out=tmp_path / "o") + "optim: {lr: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "optim.lr" in str(err.value)


def test_unknown_top_level_field_rejected(tmp_path):
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(write(tmp_path, BASE.format(out=tmp_path / "o") + "batchsize: 3\n"))


def test_schedule_needs_exactly_one_length():
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config({"model": {"name": "x"}, "schedule": {"epochs": 1, "max_steps": 3}})


def test_cuda_graph_on_and_off_mean_what_they_say_unquoted(tmp_path):
    """YAML 1.1 reads an unquoted `on` / `off` as a boolean; `cuda_graph: off` was refused as not 'off'."""
    path = write(tmp_path, BASE.format(out=tmp_path / "o"))
    path.write_text(path.read_text() + "cuda_graph: off\n")
    assert load_config(path).cuda_graph == "off"
    for text, value in (("on", "on"), ("off", "off"), ("'on'", "on"), ("auto", "auto")):
        assert load_config(path, dict([parse_override(f"cuda_graph={text}")])).cuda_graph == value
    with pytest.raises(ConfigError, match="cuda_graph"):
        load_config(path, dict([parse_override("cuda_graph=yes please")]))


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(write(tmp_path, BASE.format(out=tmp_path / "o")),
                      dict([parse_override("optim.lr=0.05"), parse_override("batch_size=16")]))
    assert cfg.optim.lr == 0.05 and cfg.batch_size == 16
    with pytest.raises(ConfigError):
        parse_override("no-equals-sign")


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(write(tmp_path, "a: [1, 2"))


def test_task_section_validated_with_field_path(tmp_path):
    from visrec.train.faces_task import FaceTask
    from visrec.train.task import RunContext
    import torch

    cfg = parse_config({"model": {"name": "mobilefacenet"}, "schedule": {"max_steps": 1},
                        "data": {"train": "/tmp/x", "flipp": True}})
    with pytest.raises(ConfigError, match=r"data\.flipp"):
        FaceTask(cfg, RunContext(device=torch.device("cpu")), "run.yaml")
    cfg = parse_config({"model": {"name": "mobilefacenet"}, "schedule": {"max_steps": 1},
                        "data": {"train": "/tmp/x"}, "loss": {"sample_rate": 2}})
    with pytest.raises(ConfigError, match=r"loss\.sample_rate"):
        FaceTask(cfg, RunContext(device=torch.device("cpu")), "run.yaml")


# --- --set overrides and YAML loading: every bad input is a ConfigError naming it, never a traceback ----------
@pytest.mark.parametrize("override, words", [
    ("schedule.max_steps.x=1", ["schedule.max_steps", "not a mapping"]),  # descending into a number
    ("data.train.0=x", ["data.train", "not a mapping"]),          # into a string
    ("a..b=1", ["not a dotted key"]),
    ("=1", ["not a dotted key"]),
])
def test_set_into_a_non_mapping_is_a_config_error(tmp_path, override, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.format(out=tmp_path / "o")), dict([parse_override(override)]))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_set_into_a_list_says_to_set_the_whole_list(tmp_path):
    text = BASE.format(out=tmp_path / "o").replace("data: {train: /tmp/x}", "data: {train: /tmp/x, val: [a.bin]}")
    with pytest.raises(ConfigError, match=r"data\.val is list .*data\.val=\[\.\.\.\]"):
        load_config(write(tmp_path, text), dict([parse_override("data.val.0=x")]))


def test_set_creates_missing_and_empty_sections(tmp_path):
    text = BASE.format(out=tmp_path / "o") + "loss:\n"
    cfg = load_config(write(tmp_path, text), dict([parse_override("loss.name=cosface"), parse_override("optim.lr=0.5")]))
    assert cfg.loss == {"name": "cosface"} and cfg.optim.lr == 0.5


@pytest.mark.parametrize("override", ["optim.lr=[1", "optim.lr={a: 1", "optim.lr='x"])
def test_malformed_yaml_value_names_the_override(override):
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        parse_override(override)
    assert override in str(err.value)


def test_a_yaml_tag_is_refused_never_constructed(tmp_path, monkeypatch):
    import os

    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    for text in ("optim.lr=!!python/name:os.system", "optim.lr=!!python/object/apply:os.system [echo hi]"):
        with pytest.raises(ConfigError, match="not valid YAML"):
            parse_override(text)
    path = write(tmp_path, BASE.format(out=tmp_path / "o") + "seed: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert called == []


@pytest.mark.parametrize("override, field", [("optim.lr=.inf", "optim.lr"), ("optim.momentum=.nan", "optim.momentum"),
                                             ("loss.s=-.inf", "loss.s"), ("model.width_mult=.inf", "model.width_mult"),
                                             ("data.extra=[1, .nan]", "data.extra.1")])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.format(out=tmp_path / "o")), dict([parse_override(override)]))
    assert f"{field}: must be a finite number" in str(err.value) and "run.yaml" in str(err.value)


@pytest.mark.parametrize("override", ["model.embedding_size=0", "model.embedding_size=-3", "model.embedding_size=10000000",
                                      "model.embedding_size=true", "model.embedding_size=1.5", "model.scale=-1",
                                      "model.width_mult=0", "model.blocks=[1, 0, 2, 2]", "model.dropout=1.0"])
def test_model_sizes_are_bounded(tmp_path, override):
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.format(out=tmp_path / "o")), dict([parse_override(override)]))
    assert f"model: {key} must be" in str(err.value)


def test_model_sizes_within_bounds_pass(tmp_path):
    cfg = load_config(write(tmp_path, BASE.format(out=tmp_path / "o")),
                      dict([parse_override("model.embedding_size=16384"), parse_override("model.blocks=[1, 2, 3, 1]")]))
    assert cfg.model.kwargs["embedding_size"] == 16384


def test_duplicate_key_is_refused_naming_key_and_file(tmp_path):
    path = write(tmp_path, BASE.format(out=tmp_path / "o") + "batch_size: 8\nbatch_size: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "'batch_size' appears twice" in str(err.value)
    nested = write(tmp_path, BASE.format(out=tmp_path / "o") + "optim:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="'lr' appears twice"):
        load_config(nested)
    # a YAML merge key is not a duplicate: the mapping's own key overrides the merged one, as YAML means
    merged = write(tmp_path, BASE.format(out=tmp_path / "o") + "base: &b {lr: 0.1, momentum: 0.5}\n"
                   "optim: {<<: *b, lr: 0.2}\n")
    from visrec.config import read_yaml_mapping
    assert read_yaml_mapping(merged)["optim"] == {"lr": 0.2, "momentum": 0.5}


def test_cli_set_errors_exit_2_without_traceback(tmp_path, monkeypatch, capsys):
    from conftest import cli_status

    path = write(tmp_path, BASE.format(out=tmp_path / "o"))
    for i, override in enumerate(("batch_size.x=1", "optim.lr=[1", "optim.lr=!!python/name:os.system",
                                  "optim.lr=.inf", "model.embedding_size=0")):
        # the real entry point once; the other cases through the function it takes its status from
        code, err = cli_status(["train", "--config", str(path), "--set", override], monkeypatch, capsys, real=i == 0)
        assert code == 2 and "error:" in err and "Traceback" not in err, (override, err)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_registry_build_errors_name_the_options():
    from visrec.models import build_backbone

    with pytest.raises(ConfigError, match=r"backbone 'mbf' cannot be built with scale=-1: RuntimeError"):
        build_backbone("mbf", scale=-1)


@pytest.mark.parametrize("override", ["embedding_size=0", "scale=-1", "embedding_size=100000000"])
def test_budget_check_set_sizes_are_config_errors(override):
    from typer.testing import CliRunner

    from visrec.cli import app

    res = CliRunner().invoke(app, ["budget", "check", "mbf", "-p", "deepglint-light", "--set", override])
    assert isinstance(res.exception, ConfigError) and override.split("=")[0] in str(res.exception)
