"""The training step's CUDA-graph mode (train.cuda_graph) on a CPU: why a run cannot capture, the one-line
fallback, and the graph runner's plumbing (static buffers, learning rate read from a tensor, warm-up, capture
failure) driven by a stand-in graph that re-runs the captured function on replay, as a CUDA graph re-runs its
kernels. The real capture runs in scripts/gpu_bench.sh on a GPU."""

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import small_face_rec  # noqa: E402
from visrec.config import parse_config
from visrec.distributed import RunContext
from visrec.errors import ConfigError
from visrec.train import trainer as trainer_mod
from visrec.train.step import StepRunner, capture_blocker, lr_as_tensors, plain_lr
from visrec.train.task import TASKS
from visrec.train.trainer import train


class ReplayingGraph:
    """Stands in for ``CudaGraph`` on a CPU: ``capture`` records the function without running it (a capture
    runs no kernel) and returns a placeholder for its output; ``replay`` re-runs it and refreshes the
    placeholder in place, as a replay refreshes a captured output buffer."""

    captures = 0

    def __init__(self):
        self.fn, self.out = None, None

    def warmup_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def capture(self, fn):
        ReplayingGraph.captures += 1
        self.fn, self.out = fn, torch.empty(())
        return self.out

    def replay(self):
        self.out.copy_(self.fn().detach())


class FailingGraph(ReplayingGraph):
    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")


@pytest.fixture(scope="module")
def face_rec(tmp_path_factory):
    return small_face_rec(tmp_path_factory, 6, 8, seed=4)


@pytest.fixture(scope="module")
def eager_run(face_rec, tmp_path_factory):
    """The reference run, trained once for the module: every step eager (``cuda_graph: off``). Returns its
    result, its output folder and what it wrote to stderr."""
    import contextlib
    import io

    out, err = tmp_path_factory.mktemp("eager") / "run", io.StringIO()
    with contextlib.redirect_stderr(err):
        result = train(make_cfg(face_rec, out, cuda_graph="off"), progress=False)
    return result, out, err.getvalue()


def make_cfg(data_dir, out, **over):
    raw = {
        "task": "faces", "output": str(out), "device": "cpu", "seed": 3, "deterministic": True,
        # the smallest MobileFaceNet: the step's plumbing is the same for every backbone, at ~2/5 of the cost
        "batch_size": 8, "model": {"name": "mobilefacenet", "embedding_size": 32, "scale": 1, "blocks": [1, 1, 1, 1]},
        "data": {"train": str(data_dir), "flip": True},
        "loss": {"name": "arcface", "s": 16.0, "m": 0.3},
        "optim": {"name": "sgd", "lr": 0.05},
        # warm-up then poly decay: a learning rate baked into the capture would show in the losses
        "schedule": {"max_steps": 12, "warmup_steps": 4},
        "checkpoint_every": 5, "log_every": 1,
    }
    raw.update(over)
    return parse_config(raw)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def weights(out: Path) -> dict:
    return torch.load(out / "last.rank0.pt", map_location="cpu", weights_only=True)["modules"]


def as_if_on_cuda(monkeypatch, graph_cls):
    """Let the Trainer take the graph path on this CPU, with ``graph_cls`` in place of a CUDA graph."""
    monkeypatch.setattr(trainer_mod, "capture_blocker", lambda device, distributed, task_blocker: task_blocker)
    monkeypatch.setattr(trainer_mod, "CudaGraph", graph_cls)


def test_blockers_name_why_a_run_cannot_capture(face_rec, tmp_path):
    cuda = torch.device("cuda", 0)
    assert "CUDA device" in capture_blocker(torch.device("cpu"), False, None)
    assert "DDP" in capture_blocker(cuda, True, None)
    assert capture_blocker(cuda, False, None) is None
    ctx = RunContext(device=torch.device("cpu"))
    faces = TASKS.get("faces")(make_cfg(face_rec, tmp_path), ctx)
    assert faces.capture_blocker() is None
    sampled = TASKS.get("faces")(make_cfg(face_rec, tmp_path, loss={"name": "arcface", "sample_rate": 0.5}), ctx)
    assert "sample_rate 0.5" in sampled.capture_blocker()
    assert capture_blocker(cuda, False, sampled.capture_blocker()) == sampled.capture_blocker()
    landmarks = TASKS.get("landmarks")(parse_config({"task": "landmarks", "model": {"name": "mobilefacenet"},
                                                     "data": {"train": str(tmp_path)},
                                                     "schedule": {"max_steps": 1}}), ctx)
    assert "landmarks" in landmarks.capture_blocker()


def test_cpu_run_falls_back_with_one_line_and_trains_as_before(face_rec, eager_run, tmp_path, capfd):
    auto = train(make_cfg(face_rec, tmp_path / "auto"), progress=False)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "eagerly" in line]
    assert lines == ["train: steps run eagerly (cpu run: CUDA graphs need a CUDA device)"]
    assert auto.step_mode == "eager" and "CUDA device" in auto.eager_reason
    off, off_dir, off_err = eager_run
    assert "eagerly" not in off_err and off.eager_reason is None
    assert losses(tmp_path / "auto") == losses(off_dir)


def test_cuda_graph_on_refuses_a_run_that_cannot_capture(face_rec, tmp_path):
    with pytest.raises(ConfigError, match="cuda_graph: on.*cpu run: CUDA graphs need a CUDA device"):
        train(make_cfg(face_rec, tmp_path / "on", cuda_graph="on"), progress=False)
    assert not (tmp_path / "on" / "last.rank0.pt").exists()


def test_graph_mode_replays_the_same_run_as_eager_steps(face_rec, eager_run, tmp_path, monkeypatch):
    eager, eager_dir, _ = eager_run
    as_if_on_cuda(monkeypatch, ReplayingGraph)
    ReplayingGraph.captures = 0
    graphed = train(make_cfg(face_rec, tmp_path / "graph", cuda_graph="on"), progress=False)
    assert graphed.step_mode == "cuda_graph" and graphed.eager_reason is None
    assert ReplayingGraph.captures == 1
    # every step after the warm-up is a replay on a new batch (a stale static buffer would repeat a loss),
    # with the learning rate the schedule wrote into the tensor the capture reads
    got, want = losses(tmp_path / "graph"), losses(eager_dir)
    assert len(got) == 12 and len(set(got)) == 12
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "graph"), weights(eager_dir)
    for module in a:
        for key in a[module]:
            torch.testing.assert_close(a[module][key], b[module][key], rtol=1e-5, atol=1e-6)
    # the checkpoint holds plain float learning rates: it resumes on any device, graph or not
    state = torch.load(tmp_path / "graph" / "last.rank0.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])
    assert all(isinstance(v, float) for v in state["scheduler"]["_last_lr"])
    assert graphed.last_loss == pytest.approx(eager.last_loss, rel=1e-5)


def test_a_graphed_run_stopped_and_resumed_matches_one_that_never_stopped(face_rec, eager_run, tmp_path,
                                                                          monkeypatch):
    # the run that never stopped: the eager reference, which a whole graphed run replays (the test above)
    as_if_on_cuda(monkeypatch, ReplayingGraph)
    parts = tmp_path / "parts"
    first = train(make_cfg(face_rec, parts, cuda_graph="on"), progress=False, stop_after_steps=5)
    assert first.stopped_early and first.global_step == 5
    train(make_cfg(face_rec, parts, cuda_graph="on"), resume=True, progress=False)
    assert losses(parts) == pytest.approx(losses(eager_run[1]), rel=1e-5, abs=1e-6)


def test_a_failed_capture_falls_back_to_eager_steps(face_rec, eager_run, tmp_path, monkeypatch, capfd):
    as_if_on_cuda(monkeypatch, FailingGraph)
    got = train(make_cfg(face_rec, tmp_path / "auto"), progress=False)
    err = capfd.readouterr().err
    assert "train: steps run eagerly (capture failed: RuntimeError: operation not permitted" in err
    assert got.step_mode == "eager" and got.eager_reason.startswith("capture failed")
    assert losses(tmp_path / "auto") == pytest.approx(losses(eager_run[1]), rel=1e-5, abs=1e-6)
    with pytest.raises(ConfigError, match="cuda_graph: capture failed: RuntimeError"):
        train(make_cfg(face_rec, tmp_path / "on", cuda_graph="on"), progress=False)


def test_learning_rate_tensors_follow_the_schedule_and_save_as_floats():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.5, momentum=0.9)
    lr_as_tensors(opt, torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)
    param.grad = torch.ones(3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr  # filled in place: a captured step reads the same memory
    assert float(lr) == pytest.approx(0.25)
    assert plain_lr(opt.state_dict())["param_groups"][0]["lr"] == pytest.approx(0.25)


def test_a_batch_of_another_shape_runs_eagerly():
    """The sampler never yields one, but a graph replays one shape only: another must not be copied into
    the captured buffers."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    runner = StepRunner(lambda x: (x @ w).sum(), opt, torch.amp.GradScaler("cuda", enabled=False), [w], None,
                        torch.device("cpu"), None, graph=ReplayingGraph(), warmup=1)
    for _ in range(3):
        runner(torch.ones(2, 4))
    assert runner.replays == 2
    expected = float((torch.ones(5, 4) @ w.detach()).sum())
    loss = runner(torch.ones(5, 4))
    assert runner.replays == 2 and float(loss.detach()) == pytest.approx(expected)


def test_a_checkpoint_written_on_cuda_resumes_on_a_cpu(face_rec, tmp_path):
    """A CUDA run saves its optimizer groups as fused (and, under a graph, AdamW's as capturable); a CPU resume
    runs this machine's kernels (capturable AdamW would refuse CPU tensors) and continues the same run."""
    adamw = {"name": "adamw", "lr": 0.003}
    whole = tmp_path / "whole"
    train(make_cfg(face_rec, whole, optim=adamw), progress=False)
    parts = tmp_path / "parts"
    train(make_cfg(face_rec, parts, optim=adamw), progress=False, stop_after_steps=5)
    path = parts / "last.rank0.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=True, capturable=True)
    torch.save(state, path)
    train(make_cfg(face_rec, parts, optim=adamw), resume=True, progress=False)
    assert losses(parts) == pytest.approx(losses(whole), rel=1e-5, abs=1e-6)


def test_the_capture_leaves_other_threads_free_to_use_cuda(monkeypatch):
    """The DataLoader's pin-memory thread allocates pinned memory while the step is captured: in the default
    ("global") capture mode that call fails, the capture with it, and the loader raises (seen on an H200).
    The capture must be made in "thread_local" mode, which restricts the capturing thread alone."""
    import contextlib

    from visrec.train import step as step_mod

    seen = {}

    @contextlib.contextmanager
    def graph(g, **kwargs):
        seen.update(kwargs, graph=g)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", graph)
    out = step_mod.CudaGraph().capture(lambda: 7)
    assert out == 7 and seen == {"graph": "graph", "capture_error_mode": "thread_local"}


def test_an_sgd_step_the_loss_scaler_skips_leaves_momentum_at_zero(face_rec, tmp_path):
    """Fused SGD makes its momentum buffers with empty_like on the first step; an fp16 overflow on that step
    (the scaler hands the fused kernel found_inf = 1) skipped the update and left them holding stale memory.
    The Trainer's optimizer starts them at zero, so the skipped step leaves zeros and the first real step is
    exactly plain SGD's first step. Fused SGD also runs on a CPU: the same kernel path as on CUDA."""
    from visrec.train.trainer import build_optimizer

    cfg = make_cfg(face_rec, tmp_path / "run", optim={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4099))
    start = p.detach().clone()
    opt = build_optimizer(cfg, [p], fused=True)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))

    p.grad = torch.full_like(p, float("inf"))  # the overflowed first step
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), start) and torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))

    grad = torch.randn(4099)
    p.grad = grad.clone()
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    ref = torch.nn.Parameter(start.clone())
    # the reference: a fused SGD whose first step was a real one (its buffers set from that step's gradient)
    plain = torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=cfg.optim.weight_decay, fused=True)
    ref.grad = grad.clone()
    plain.step()
    assert torch.equal(p.detach(), ref.detach())
    assert torch.equal(opt.state[p]["momentum_buffer"], plain.state[ref]["momentum_buffer"])



def test_channels_last_trains_nhwc_on_a_cpu(face_rec, eager_run, tmp_path):
    """`channels_last: true` (the default) is not a CUDA-only setting: the CPU run's backbone weights are NHWC, as
    its checkpoint shows, its first loss (the forward before any update) is NCHW's, and its model.pt loads into a
    fresh network (NHWC: load_model's inference layout) that embeds as an NCHW copy does. Later losses part
    ways: float32 rounding of a tiny batch at this learning rate grows from step to step in either layout (the
    gradients' accuracy is the next test)."""
    from visrec.models.loading import load_model

    nhwc, nchw = eager_run[1], tmp_path / "nchw"  # the reference run has the default layout
    assert make_cfg(face_rec, nhwc).channels_last
    # two steps are enough: only the first loss is compared
    train(make_cfg(face_rec, nchw, channels_last=False, schedule={"max_steps": 2, "warmup_steps": 1}),
          progress=False)
    convs = {layout: [w for w in weights(run)["backbone"].values() if w.dim() == 4]
             for layout, run in (("nhwc", nhwc), ("nchw", nchw))}
    assert convs["nhwc"] and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs["nhwc"])
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in convs["nchw"])
    assert losses(nhwc)[0] == pytest.approx(losses(nchw)[0], rel=1e-5)
    model = load_model(nhwc)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in model.module.parameters() if w.dim() == 4)
    nchw = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in nchw.parameters() if w.dim() == 4)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model.module(x), nchw(x), atol=1e-4)


@pytest.mark.parametrize("config", [{"name": "mobilefacenet", "embedding_size": 32},
                                    {"name": "pfld", "num_points": 106, "width_mult": 0.25}])
def test_nhwc_gradients_are_as_accurate_as_nchw_ones(config):
    """One backward pass in float32, NCHW and NHWC, against the same network in float64: for every parameter
    whose gradient is not ~0 (a BatchNorm bias before another normalisation has a zero gradient up to noise),
    NHWC's relative error is within 4x NCHW's own or 5%: a layout whose kernels computed other gradients would
    be off by ~100%. (Measured, PFLD: median 5e-3 NHWC vs 7e-4 NCHW, worst 3.5e-2 vs 1.4e-2: oneDNN's NHWC
    kernels sum in another order; MobileFaceNet at batch 8: ~15% in both layouts, float32 itself.)"""
    from visrec.models import build_backbone

    torch.manual_seed(0)
    nchw = build_backbone(**config).train()
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    exact = copy.deepcopy(nchw).double()
    x = torch.randn(8, 3, 112, 112)
    for net, inp in ((nchw, x), (nhwc, x), (exact, x.double())):
        out = net(inp)
        (out[0] if isinstance(out, (tuple, list)) else out).square().sum().backward()
    largest = max(p.grad.norm().item() for p in exact.parameters() if p.grad is not None)
    checked = 0
    for (name, a), b, ref in zip(nchw.named_parameters(), nhwc.parameters(), exact.parameters()):
        if ref.grad is None:  # a branch the first output does not use (PFLD's auxiliary pose head)
            assert a.grad is None and b.grad is None, name
            continue
        g = ref.grad.float()
        if g.norm() < 1e-6 * largest:
            continue
        checked += 1
        err_nchw, err_nhwc = ((a.grad - g).norm() / g.norm()).item(), ((b.grad - g).norm() / g.norm()).item()
        assert err_nhwc <= max(4 * err_nchw, 0.05), f"{name}: NHWC {err_nhwc:.2e} vs NCHW {err_nchw:.2e}"
    assert checked > 20
