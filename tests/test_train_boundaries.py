"""Untrusted training inputs: a resume file of another run or a malformed one, and config options (loss
margins, seed, schedule power) checked at load rather than failing mid-step."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import small_face_rec  # noqa: E402
from visrec.errors import ConfigError, DataError
from visrec.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import MODEL, make_cfg  # noqa: E402  (the trainer tests' tiny face config)


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    return small_face_rec(tmp_path_factory, 4, 4, seed=3)


@pytest.fixture(scope="module")
def checkpointed(face_rec, tmp_path_factory):
    """A run stopped after its checkpoint at step 1; each test edits a copy of its resume file."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(make_cfg(face_rec, out, schedule={"max_steps": 2, "warmup_steps": 0}, checkpoint_every=1,
                   batch_size=4), progress=False, stop_after_steps=1)
    return out


def _copy(run, tmp_path, edit=None):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    if edit is not None:
        state = torch.load(out / "last.rank0.pt", weights_only=False)
        state = edit(state)
        torch.save(state, out / "last.rank0.pt")
    return out


def _resume(face_rec, out, **over):
    cfg = dict(schedule={"max_steps": 2, "warmup_steps": 0}, checkpoint_every=1, batch_size=4)
    cfg.update(over)
    return train(make_cfg(face_rec, out, **cfg), resume=True, progress=False)


def _without_recorded_config(state):
    """A resume file as versions before the config was saved with it wrote it: only its tensors can tell."""
    return {k: v for k, v in state.items() if k != "config"}


def test_resume_under_another_embedding_size_names_the_file_and_the_shapes(face_rec, checkpointed, tmp_path):
    out = _copy(checkpointed, tmp_path)
    # the recorded config says it first, by name (tests/test_train_trust.py); without one, the shapes do
    with pytest.raises(ConfigError, match=r"last\.rank0\.pt: --resume .*model\.embedding_size: 64 in the resume "
                                          r"file, 128 now"):
        _resume(face_rec, out, model={**MODEL, "embedding_size": 128})
    out = _copy(checkpointed, tmp_path / "old", _without_recorded_config)
    with pytest.raises(DataError, match=r"last\.rank0\.pt.*this checkpoint's backbone has .* of shape "
                                        r"\(64.*where the config builds \(128"):
        _resume(face_rec, out, model={**MODEL, "embedding_size": 128})


@pytest.mark.parametrize("edit, match", [
    (lambda s: {"world_size": 1}, r"last\.rank0\.pt.*field 'modules'.*holds the modules none"),
    (lambda s: {**s, "global_step": "abc"}, r"last\.rank0\.pt.*field 'global_step'.*'abc'"),
    (lambda s: {**s, "world_size": "abc"}, r"last\.rank0\.pt.*field 'world_size'"),
    (lambda s: {**s, "modules": {**s["modules"], "head": {"weight": torch.zeros(3)}}},
     r"last\.rank0\.pt.*this checkpoint's head"),
    (lambda s: {**s, "optimizer": "x"}, r"last\.rank0\.pt.*field 'optimizer'"),
    (lambda s: {**s, "rng": {}}, r"last\.rank0\.pt.*field 'rng'"),
    (lambda s: [1, 2], r"last\.rank0\.pt.*not a resume file"),
])
def test_a_malformed_resume_file_is_a_data_error_naming_it(face_rec, checkpointed, tmp_path, edit, match):
    out = _copy(checkpointed, tmp_path, edit)
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(DataError, match=match):
        _resume(face_rec, out)
    assert (out / "metrics.jsonl").read_text() == log  # refused before anything was written


@pytest.mark.parametrize("saved, resumed", [("adamw", "sgd"), ("sgd", "adamw")])
def test_a_resume_under_another_optimizer_is_a_data_error_not_a_key_error_mid_step(face_rec, tmp_path, saved, resumed):
    """The optimizer's state of another optimizer loads without complaint (the weights' shapes match), then the
    first step wanted the group's 'momentum' (AdamW state into SGD): a bare KeyError after the resume began."""
    out = tmp_path / "run"
    cfg = dict(schedule={"max_steps": 2, "warmup_steps": 0}, checkpoint_every=1, batch_size=4)
    train(make_cfg(face_rec, out, optim={"name": saved, "lr": 0.001}, **cfg), progress=False, stop_after_steps=1)
    with pytest.raises(ConfigError, match=rf"optim\.name: \"{saved}\" in the resume file, \"{resumed}\" now"):
        _resume(face_rec, out, optim={"name": resumed, "lr": 0.001})
    state = torch.load(out / "last.rank0.pt", weights_only=False)
    torch.save(_without_recorded_config(state), out / "last.rank0.pt")
    with pytest.raises(DataError, match=r"last\.rank0\.pt, field 'optimizer'"):
        _resume(face_rec, out, optim={"name": resumed, "lr": 0.001})
    assert _resume(face_rec, out, optim={"name": saved, "lr": 0.001}).global_step == 2  # its own optimizer goes on


# --- options checked when the config is read ----------------------------------------------------------------

def _options(face_rec, tmp_path, **over):
    """The faces task built from the tiny config with ``over``: where the loss section is validated."""
    from visrec.train.task import TASKS

    cfg = make_cfg(face_rec, tmp_path / "run", **over)
    return TASKS.get(cfg.task)(cfg, None)


@pytest.mark.parametrize("loss, match", [
    ({"s": "nan"}, r"loss\.s: must be a number above 0.*got 'nan'"),  # `--set loss.s=nan`: YAML text
    ({"s": "1e30"}, r"loss\.s: .*got '1e30'.*YAML reads"),
    ({"s": -32.0}, r"loss\.s: must be a number above 0"),
    ({"m": "abc"}, r"loss\.m: must be a number"),
    ({"m": 100}, r"loss\.m: must be a number from 0 to 1\.5708"),
    ({"name": "cosface", "m": 1.5}, r"loss\.m: must be a number from 0 to 1,"),
    ({"name": "combined", "m1": 0.0}, r"loss\.m1: must be a number above 0"),
    ({"name": "curricularface", "momentum": True}, r"loss\.momentum: must be a number"),
])
def test_margin_loss_options_are_checked_at_load(face_rec, tmp_path, loss, match):
    with pytest.raises(ConfigError, match=match):
        _options(face_rec, tmp_path, loss={"name": "arcface", "s": 16.0, "m": 0.3, **loss})


def test_sensible_margin_options_pass(face_rec, tmp_path):
    for loss in ({"name": "arcface", "s": 64.0, "m": 0.5}, {"name": "cosface", "s": 64, "m": 0.35},
                 {"name": "combined", "m1": 1.0, "m2": 0.3, "m3": 0.2}, {"name": "softmax", "s": 30.0}):
        assert _options(face_rec, tmp_path, loss=loss).loss_opts.name == loss["name"]


@pytest.mark.parametrize("over, match", [
    ({"seed": -1}, r"seed: Input should be greater than or equal to 0"),
    ({"seed": 10**20}, r"seed: Input should be less than or equal to 2147483647"),
    ({"seed": True}, r"seed: Input should be a valid integer"),
    ({"batch_size": True}, r"batch_size: Input should be a valid integer"),  # was read as 1
    ({"batch_size": 4.0}, r"batch_size: Input should be a valid integer"),
    ({"output": ""}, r"output: must name a folder"),  # was the current folder
    ({"deterministic": "yes"}, r"deterministic: Input should be a valid boolean"),  # was read as true
    ({"channels_last": 0}, r"channels_last: Input should be a valid boolean"),
    ({"schedule": {"max_steps": 9, "power": -2.0}}, r"schedule\.power: Input should be greater than 0"),
    ({"schedule": {"max_steps": 9, "power": 0}}, r"schedule\.power: Input should be greater than 0"),
])
def test_run_options_are_checked_at_load(face_rec, tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(face_rec, tmp_path / "run", **over)
