"""Architecture search, its first half: a search space as data (the shipped face and landmark spaces), a
sampled architecture as a plain spec that builds the registered ``searched`` backbone, and the budget checked
on the meta device before any training; bad spaces and unreachable budgets are errors naming the field."""

import numpy as np
import pytest
import torch

from visrec.budget import lfr_flops
from visrec.errors import ConfigError
from visrec.models import build_backbone
from visrec.search.space import (DEFAULT_SPACES, SearchSpace, candidate_cost, check_budget_reachable, over_budget,
                                 smallest_cost)

FACES, LANDMARKS = (str(DEFAULT_SPACES / "faces.yaml"), str(DEFAULT_SPACES / "landmarks.yaml"))


@pytest.mark.parametrize("path, task, out", [(FACES, "faces", (2, 512)), (LANDMARKS, "landmarks", (2, 106, 2))])
def test_a_sampled_architecture_builds_runs_and_is_counted_on_the_meta_device_as_built(path, task, out):
    space = SearchSpace.from_file(path)
    assert space.task == task and space.size > 10**9
    specs = [space.random(seed) for seed in range(4)]
    assert len({str(s) for s in specs}) == 4  # the seeds give different architectures
    spec = specs[0]
    net = build_backbone("searched", spec=spec).eval()
    assert tuple(net(torch.randn(2, 3, 112, 112)).shape) == out
    cost = candidate_cost(spec)
    assert cost.flops == lfr_flops(net) and cost.params == sum(p.numel() for p in net.parameters())
    names = []
    space.sample(lambda name, options: names.append(name) or options[-1])
    assert "stages.1.kernel" in names and "stem.channels" in names  # stable names for a study's parameters


def test_candidates_over_the_budget_are_rejected_and_an_unreachable_budget_is_refused_before_searching():
    space = SearchSpace.from_file(FACES)
    least = smallest_cost(space)
    costs = [candidate_cost(space.random(seed)) for seed in range(6)]
    assert all(c.flops >= least.flops for c in costs)
    assert over_budget(least, 1.0, 20.0) is None  # DeepGlint-Light: the least candidate fits
    big = max(costs, key=lambda c: c.flops)
    assert "GFLOPs >" in over_budget(big, big.gflops * 0.99, None)
    assert "MB of float32 weights" in over_budget(big, None, big.mb)
    assert check_budget_reachable(space, 1.0, 20.0) == least
    with pytest.raises(ConfigError, match=r"faces\.yaml: no candidate can meet the budget: the least one has "
                                          r"[0-9.]+ GFLOPs > "):
        check_budget_reachable(space, least.gflops * 0.9, None)


@pytest.mark.parametrize("change, message", [
    (lambda s: s["stages"][1].update(block=["mbconv", "transformer"]), r"stages\[1\]\.block: unknown block 'transformer'"),
    (lambda s: s["stages"][2].update(kernel=[]), r"stages\[2\]\.kernel: an empty list of choices"),
    (lambda s: s["stages"][0].update(kernel=[3, 4]), r"stages\[0\]\.kernel: choice 4"),
    (lambda s: s["stem"].update(width=[1]), r"stem\.width: unknown field"),
    (lambda s: s.update(stages=[]), r"stages: a non-empty list"),
    (lambda s: s["stages"][0].pop("channels"), r"stages\[0\]: a stage needs block and channels"),
    (lambda s: s.update(task="products"), r"task: 'products' is not faces or landmarks"),
])
def test_a_bad_search_space_is_an_error_naming_the_file_and_field(tmp_path, change, message):
    import yaml

    raw = yaml.safe_load(open(FACES))
    change(raw)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as err:
        SearchSpace.from_file(path)
    assert "space.yaml" in str(err.value)


def test_a_searched_landmark_network_trains_passes_the_budget_exports_and_loads(tmp_path):
    """A sampled landmark architecture as a run config's model (``{name: searched, spec: ...}``): visrec's
    trainer trains it, ``budget.check`` counts the checkpoint within a 1 GFLOPs budget, the export passes
    parity and ``load_model`` serves it through ONNX Runtime with the checkpoint's contract."""
    pytest.importorskip("onnxruntime")
    from visrec.budget import check
    from visrec.config import load_config
    from visrec.data.synth import write_synthetic_jd
    from visrec.export import export_checkpoint
    from visrec.models import load_model
    from visrec.protocols import Protocol
    from visrec.train.trainer import train

    write_synthetic_jd(tmp_path / "train", 24, seed=1)
    spec = SearchSpace.from_file(LANDMARKS).random(3)
    cfg = load_config("configs/landmarks/synthetic-heatmap.yaml", {
        "output": str(tmp_path / "run"), "data.train": str(tmp_path / "train"), "data.val": str(tmp_path / "train"),
        "model": {"name": "searched", "num_points": 106, "spec": spec}, "schedule.max_steps": 4,
        "schedule.warmup_steps": 1, "batch_size": 8})
    assert train(cfg, progress=False).global_step == 4
    loaded = load_model(tmp_path / "run")
    assert loaded.contract.task == "landmarks" and loaded.contract.num_points == 106
    report = check(tmp_path / "run", Protocol(name="one-gflop", task="landmarks", max_gflops=1.0), with_size=False)
    assert report.passed and report.lfr_flops == candidate_cost(spec).flops
    image = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    points = loaded.predict(image, (20, 20, 140, 140))
    assert points.shape == (106, 2)
    path, parity = export_checkpoint(tmp_path / "run", tmp_path / "run" / "model.onnx")
    assert parity.passed
    onnx = load_model(tmp_path / "run", runtime="onnx")
    assert onnx.runtime == "onnxruntime" and onnx.contract.task == "landmarks"
    np.testing.assert_allclose(onnx.predict(image, (20, 20, 140, 140)), points, atol=0.05)
