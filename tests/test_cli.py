"""The CLI: thin commands, Rich output, clean errors (exit code 2, message naming the culprit)."""

import subprocess
import sys

from typer.testing import CliRunner

from visrec.cli import app

runner = CliRunner()


def test_data_synth_faces_writes_real_formats(tmp_path):
    out = tmp_path / "synth"
    res = runner.invoke(app, ["data", "synth", "faces", "--out", str(out), "--identities", "3", "--per-identity", "2",
                              "--pairs", "10"])
    assert res.exit_code == 0, res.output
    assert (out / "train" / "train.rec").exists() and (out / "val.bin").exists()
    assert "synthetic faces written" in res.output


def test_bad_config_is_a_clean_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {name: mobilefacenet}\nschedule: {max_steps: 1}\noptim: {lr: -3}\n")
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "optim.lr" in done.stderr and "Traceback" not in done.stderr


def test_missing_data_is_a_clean_error(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output: {tmp_path / 'run'}\nmodel: {{name: mobilefacenet}}\nschedule: {{max_steps: 1}}\n"
                   f"data: {{train: {tmp_path / 'nowhere'}}}\n")
    done = subprocess.run([sys.executable, "-m", "visrec.cli", "train", "--config", str(cfg)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "nowhere" in done.stderr and "Traceback" not in done.stderr


def test_every_preset_config_validates():
    from pathlib import Path

    import torch

    from visrec.config import load_config
    from visrec.train.task import TASKS, RunContext

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(p for p in root.rglob("*.yaml") if not {"protocols", "serve"} & set(p.parts))
    assert presets
    from visrec.search.space import SearchSpace
    from visrec.serve.config import load_serve_config

    for path in (root / "serve").glob("*.yaml"):
        load_serve_config(path)
    assert [SearchSpace.default(t).task for t in ("faces", "landmarks")] == ["faces", "landmarks"]
    for path in presets:
        cfg = load_config(path)
        TASKS.get(cfg.task)(cfg, RunContext(device=torch.device("cpu")), str(path))  # task sections too


def test_data_prepare_commands_report_what_they_did(tmp_path):
    import numpy as np

    from visrec.data.images import encode_jpeg

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(encode_jpeg(np.full((60, 100, 3), 40, np.uint8)))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    res = runner.invoke(app, ["data", "prepare", "products", str(photos), "--out", str(tmp_path / "cat"), "--size", "64"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cat" / "catalogue" / "a.jpg").exists() and "unreadable" in res.output and "broken" in res.output
    people = tmp_path / "people" / "someone"
    people.mkdir(parents=True)
    (people / "blank.jpg").write_bytes(encode_jpeg(np.full((120, 120, 3), 128, np.uint8)))
    res = runner.invoke(app, ["data", "prepare", "faces", str(tmp_path / "people"), "--out", str(tmp_path / "aligned"),
                              "--box-margin", "0.1", "--align", "eyes"])
    assert res.exit_code == 0, res.output
    assert "no face" in res.output and (tmp_path / "aligned" / "prepare_report.json").exists()
    journal = (tmp_path / "aligned" / "prepare_journal.jsonl").read_text().splitlines()[0]
    assert '"align": "eyes"' in journal
