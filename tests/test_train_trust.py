"""Training at its boundaries, as a hostile or hurried user's runs found them: a --resume that changes what the
resume file decides (the optimizer's lr, the batch size, the seed) was accepted and recorded as if used; a torn
last log line swallowed the next row; a log line was read whole however long; an output inside the data set
filled it with .pth files; `true` was read as 1.0 for a learning rate; an `index:` section meant nothing to a
face run and was kept without a word; a finished run whose model.pt was removed answered 0 without it; and
`finetune` told the user to pass a --resume it did not take."""

import json

import pytest
from conftest import cli_status

from visrec.config import parse_config
from visrec.errors import ConfigError, DataError
from visrec.train.trainer import train

MODEL = {"name": "mobilefacenet", "embedding_size": 32, "scale": 1, "blocks": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    from visrec.data.synth import write_face_dataset

    root = tmp_path_factory.mktemp("faces") / "train"
    write_face_dataset(root, 4, 4, format="recordio", seed=3, difficulty=0.2)
    return root


def cfg_dict(data_dir, out, **over) -> dict:
    raw = {"task": "faces", "output": str(out), "device": "cpu", "seed": 7, "batch_size": 4, "model": MODEL,
           "data": {"train": str(data_dir)}, "loss": {"name": "arcface", "s": 16.0, "m": 0.3},
           "optim": {"name": "sgd", "lr": 0.05}, "schedule": {"max_steps": 2}, "checkpoint_every": 1,
           "log_every": 1}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            raw[section] = {**raw[section], field: value}
        else:
            raw[key] = value
    return raw


def run(data_dir, out, resume=False, **over):
    return train(parse_config(cfg_dict(data_dir, out, **over)), resume=resume, progress=False)


@pytest.mark.parametrize("change, named", [
    ({"optim__lr": 0.01}, "optim.lr: 0.05 in the resume file, 0.01 now"),
    ({"optim__momentum": 0.0}, "optim.momentum"),
    ({"batch_size": 8}, "batch_size: 4 in the resume file, 8 now"),
    ({"seed": 8}, "seed"),
    ({"loss__m": 0.5}, "loss.m"),
])
def test_a_resume_that_changes_what_the_resume_file_decides_is_refused(face_rec, tmp_path, change, named):
    out = tmp_path / "run"
    run(face_rec, out)
    before = (out / "last.rank0.pt").read_bytes()
    with pytest.raises(ConfigError, match="--resume continues the run this file records") as err:
        run(face_rec, out, resume=True, schedule={"max_steps": 4}, **change)
    assert named in str(err.value) and "last.rank0.pt" in str(err.value)
    assert (out / "last.rank0.pt").read_bytes() == before  # nothing trained, nothing rewritten
    # what a resume may change: the length of the run, how often it logs, where its data lies
    moved = tmp_path / "moved"
    face_rec_copy = moved / "train"
    import shutil

    shutil.copytree(face_rec, face_rec_copy)
    run(face_rec_copy, out, resume=True, schedule={"max_steps": 3}, log_every=2, num_workers=1)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_torn_last_log_line_is_closed_before_the_resumed_run_appends(face_rec, tmp_path):
    out = tmp_path / "run"
    run(face_rec, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "epo')  # a kill mid-write
    run(face_rec, out, resume=True, schedule={"max_steps": 3})
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[-2] == '{"step": 2, "epo'  # kept as it was (the log is a record), on its own line
    assert json.loads(lines[-1])["step"] == 3  # the resumed run's row whole


def test_a_log_line_longer_than_any_row_is_refused_before_it_is_held(face_rec, tmp_path):
    from visrec.train.checkpoint import MAX_LOG_LINE_BYTES

    out = tmp_path / "run"
    run(face_rec, out)
    with open(out / "metrics.jsonl", "ab") as fh:
        fh.write(b"x" * (MAX_LOG_LINE_BYTES + 10))
    with pytest.raises(DataError, match=r"metrics\.jsonl, record line 3: a line of more than 1,048,576 bytes"):
        run(face_rec, out, resume=True, schedule={"max_steps": 3})


def test_an_output_inside_the_training_data_is_refused(tmp_path, monkeypatch, capsys):
    from visrec.data.synth import write_face_dataset

    data = write_face_dataset(tmp_path / "faces", 3, 3, format="folder", seed=1)
    for out in (data / "run1", data):
        with pytest.raises(DataError, match=r"output lies inside data\.train"):
            run(data, out)
    assert sorted(p.name for p in data.iterdir()) == ["000000", "000001", "000002"]


@pytest.mark.parametrize("key", ["optim.lr", "optim.weight_decay", "schedule.power", "loss.sample_rate"])
def test_a_switch_is_not_a_number(face_rec, tmp_path, key):
    import torch

    from visrec.train.faces_task import FaceTask
    from visrec.train.task import RunContext

    raw = cfg_dict(face_rec, tmp_path / "run")
    section, field = key.split(".")
    raw[section] = {**raw[section], field: True}
    with pytest.raises(ConfigError, match=rf"{field}: must be a number, got true"):
        FaceTask(parse_config(raw), RunContext(torch.device("cpu")))  # the task checks its own sections


def test_an_index_section_of_a_task_that_reads_none_is_refused(face_rec, tmp_path):
    with pytest.raises(ConfigError, match="index: the faces task reads no index options"):
        run(face_rec, tmp_path / "run", index={"size": 64})
    assert not (tmp_path / "run").exists()


def test_a_finished_run_whose_model_files_were_removed_writes_them_again_on_resume(face_rec, tmp_path):
    import torch

    out = tmp_path / "run"
    run(face_rec, out)
    first = torch.load(out / "model.pt", weights_only=True)
    (out / "model.pt").unlink()
    (out / "backbone.pth").unlink()
    run(face_rec, out, resume=True)  # nothing to train: the files come from the last step's state
    again = torch.load(out / "model.pt", weights_only=True)
    assert again["step"] == first["step"] == 2 and (out / "backbone.pth").is_file()
    assert all(torch.equal(again["backbone"][k], v) for k, v in first["backbone"].items())


def test_finetune_takes_the_resume_its_refusal_asks_for(face_rec, tmp_path, monkeypatch, capsys):
    import yaml

    pre = tmp_path / "pre"
    run(face_rec, pre)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(cfg_dict(face_rec, tmp_path / "ft")))
    args = ["finetune", "--config", str(cfg), "--model", str(pre), "--no-progress"]
    assert cli_status(args, monkeypatch, capsys)[0] == 0
    code, err = cli_status(args, monkeypatch, capsys)
    assert code == 2 and "pass --resume" in err
    code, err = cli_status([*args, "--resume", "--set", "schedule.max_steps=3"], monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
