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
