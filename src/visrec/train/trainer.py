"""One Trainer for every task: loop, devices, mixed precision, DDP, checkpoints, logging, resume.

Resumption is exact: the data order is a pure function of (seed, epoch), every random choice inside a
step draws from RNG states that are checkpointed, and the data position (epoch, step) is saved, so a
run stopped or killed after a checkpoint and resumed produces the same weights as one that never
stopped (bit-exact on CPU in deterministic mode under the same number of CPU threads: kernels split their
reductions by thread, so a resume under another count prints a one-line notice). A run resumes under the number of processes that
wrote its checkpoints, or is refused with a message saying what to do (``checkpoint.check_resume``);
``--resume`` with no checkpoint yet says so in one line and starts at step 0. ``metrics.jsonl`` never
holds a step twice: on every start the rows after the starting step are dropped (atomically). A fresh run refuses
an output folder holding an earlier run's files, naming them (``outdir.check_start``).

Under torchrun, every step that one rank does alone (rank 0: the output folder's checks and files, validation,
the log and the model files; each rank: its resume file) ends in an exchange of outcomes before the next
collective, so a failure on one rank ends every rank at once: the failing rank with its own error, the others
with one naming it (``visrec.distributed.on_every_rank``), none waiting in a collective until a timeout.

Nothing trained is lost to a bad input: the output directory and every validation set are checked before the
first step (``Task.prepare_validation``), the checkpoint is written before the validation of its step, and a
validation that fails still leaves ``model.pt``/``backbone.pth`` holding the weights it was given (the error
then says where they are; ``--resume`` after fixing the set validates them without training again).
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from visrec.config import RunConfig
from visrec.data.text import FolderClaim, check_output
from visrec.errors import ConfigError, StorageError, VisrecError
from visrec.train import checkpoint as ckpt, outdir
from visrec import distributed as dist
from visrec.train.prefetch import prefetch
from visrec.train.progress import ProgressBar
from visrec.train.skipped import merge_skipped, plain_skipped, report_skipped, skipped_from
from visrec.train.step import CudaGraph, StepRunner, capture_blocker, plain_lr
from visrec.train.task import TASKS, RunContext, Task


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a seeded per-epoch permutation, this rank's share, starting at a given step.

    Each global batch is ``batch_size * world_size`` consecutive permutation entries; rank r takes the
    r-th slice. The tail that does not fill a global batch is dropped (as arcface_torch does).
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_items, self.batch_size, self.rank, self.world_size, self.seed = (
            num_items, batch_size, rank, world_size, seed)
        self.epoch, self.start_step = 0, 0
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size {batch_size} x {world_size} processes exceeds the "
                              f"training set ({num_items} items)")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.num_items, generator=gen).tolist()
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.batch_size
            yield perm[start:start + self.batch_size]


def lr_lambda(cfg: RunConfig, total_steps: int):
    sched = cfg.schedule

    def factor(step: int) -> float:
        if step < sched.warmup_steps:
            return (step + 1) / sched.warmup_steps
        span = max(1, total_steps - sched.warmup_steps)
        progress = min(1.0, (step - sched.warmup_steps) / span)
        if sched.kind == "poly":
            return (1 - progress) ** sched.power
        if sched.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed 112x112 shapes: let cuDNN pick the fastest kernels


@dataclass
class TrainResult:
    output: Path
    global_step: int
    total_steps: int
    stopped_early: bool
    metrics: dict[str, float] = field(default_factory=dict)
    last_loss: float = float("nan")
    step_mode: str = "eager"  # "cuda_graph" when the step was captured and replayed
    eager_reason: str | None = None  # why the step was not captured (None when it was, or cuda_graph: off)
    rank: int = 0  # this process's rank under torchrun (only rank 0 validates and reports)
    skipped: int = 0  # unreadable training records skipped (data.skip_bad), this run's whole history


class ValidationFailed(VisrecError):
    """A validation failed after training: the message says why and where the trained weights were saved."""


class Observer:
    """Hooks a caller (an architecture search's trial) sets on a run, called on the main process only.
    ``on_step(step, total)`` after every optimizer step; ``on_validate(step, backbone)`` at every validation
    (the backbone in eval mode, no grad) returns extra metrics to log, or raises to end the run there (a
    pruned trial): the exception reaches ``train``'s caller with the log closed."""

    def on_step(self, step: int, total: int) -> None:
        pass

    def on_validate(self, step: int, backbone: nn.Module) -> dict[str, float] | None:
        return None


def train(cfg: RunConfig, *, resume: bool = False, source: str = "config", progress: bool = True,
          stop_after_steps: int | None = None, observer: Observer | None = None) -> TrainResult:
    """Train ``cfg`` to the end (or until ``stop_after_steps`` optimizer steps ran in this call, which
    checkpoints and returns — the controlled version of a kill). ``resume`` continues from the output
    directory's checkpoints; without it an earlier run's files there are refused rather than overwritten.
    ``observer`` (:class:`Observer`) sees every step and every validation."""
    ctx = dist.setup(cfg.device, cfg.amp)
    claim: list = []  # the main process's claim on the output folder, released however the run ends
    try:
        return _train(cfg, ctx, resume, source, progress, stop_after_steps, observer or Observer(), claim)
    finally:
        for held in claim:
            held.close()
        dist.teardown(ctx)


# the data options that name files or folders, in every task's data section
DATA_PATH_KEYS = ("train", "val", "catalogue", "labels", "videos")


def data_paths(cfg: RunConfig) -> dict[str, str]:
    """The files and folders a run's ``data`` section names (``data.train``, ``data.val.0``, ...), by their
    field: what its output may not be, nor lie inside."""
    found = {}
    for key, value in cfg.data.items():
        if key not in DATA_PATH_KEYS:
            continue
        for i, item in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, (str, Path)) and str(item):
                found[f"data.{key}" + (f".{i}" if isinstance(value, (list, tuple)) else "")] = str(item)
    return found


def _train(cfg: RunConfig, ctx: RunContext, resume: bool, source: str, progress: bool,
           stop_after_steps: int | None, observer: Observer, claim: list) -> TrainResult:
    out = Path(cfg.output)
    # before any work; nothing is created here. Never inside the data it reads: the run's files would be listed
    # as data by the next run (a .pth among the images of a folder set), its own resume included
    check_output(out, kind="dir", what="output", reads=data_paths(cfg))

    def together(what: str, fn, main_only: bool = True):
        """``fn()`` on the main process (or every one), then every rank learns whether it failed anywhere: the
        failing rank raises its own error, the others one naming it, so none waits in a collective for it."""
        return dist.on_every_rank(what, fn if ctx.is_main or not main_only else (lambda: None), dist.world_group(ctx))

    # rank 0 judges the folder (a fresh run refuses an earlier run's files; outdir.check_start), every rank
    # reads its own resume file; one verdict for all (another world size: a clear refusal, check_resume)
    notice = together("checking the output folder", lambda: outdir.check_start(out, resume, cfg))
    state = together("reading the checkpoint", lambda: ckpt.resume_state(out, ctx.rank, ctx.world_size) if resume
                     else None, main_only=False)
    if state is not None:  # the same run, or refused: settings the resume file decides may not change on the side
        ckpt.check_same_run(state, cfg, ckpt.rank_path(out, ctx.rank))
    if notice:
        print(notice, file=sys.stderr, flush=True)
    seed_everything(cfg.seed + ctx.rank, cfg.deterministic)
    task: Task = TASKS.get(cfg.task)(cfg, ctx, source)
    # every validation set opened and checked now (exists, readable, enough pairs for its folds): a bad one is an
    # error before the first step, not after the last (only the main process validates)
    together("checking the validation sets", task.prepare_validation)
    dataset = task.train_dataset()
    num_classes = getattr(dataset, "num_classes", None)
    modules = {name: m.to(ctx.device) for name, m in task.build_modules(num_classes).items()}
    if state is None and cfg.init is not None:
        # fine-tuning: the backbone starts from pretrained weights, every other module (the margin head,
        # whose classes are this data set's) starts fresh; a resume takes everything from its checkpoint
        ckpt.init_backbone(modules["backbone"], cfg.init, cfg.model.name)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    # Gradient clipping covers the replicated modules only (as arcface_torch clips the backbone): a norm
    # over rank-local shards would differ per rank and let the DDP replicas drift apart.
    clip_params = [p for n, m in modules.items() if n not in task.local_modules
                   for p in m.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params, fused=ctx.device.type == "cuda")

    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed)
    if cfg.schedule.max_steps is not None:
        total_steps = cfg.schedule.max_steps
    else:
        total_steps = max(1, int(cfg.schedule.epochs * sampler.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp_dtype == torch.float16)

    global_step = 0
    if state is not None:
        # every state checked against this run's modules first (another run's file: DataError naming it)
        global_step = ckpt.restore(state, modules, opt, scheduler, scaler, ckpt.rank_path(out, ctx.rank))
        for group in opt.param_groups:  # this run's device picks the kernels, not the one that wrote the file
            group.update({k: opt.defaults[k] for k in ("fused", "foreach", "capturable") if k in opt.defaults})
        if ctx.is_main:
            notice = ckpt.thread_count_notice(state, ctx.device, cfg.deterministic)
            if notice:
                print(notice, file=sys.stderr, flush=True)

    # the model's contract (input, normalisation, alignment, dim / landmark crop), saved with every checkpoint
    contract = task.model_contract(modules["backbone"]).to_dict()
    train_modules = dict(modules)
    if cfg.channels_last:  # CPU too: oneDNN's NHWC convolutions train as fast or faster (docs/training.md)
        modules["backbone"].to(memory_format=torch.channels_last)
    if cfg.compile:
        train_modules["backbone"] = torch.compile(modules["backbone"])
    eager_reason = None if cfg.cuda_graph == "off" else capture_blocker(ctx.device, ctx.distributed,
                                                                        task.capture_blocker())
    if cfg.cuda_graph == "on" and eager_reason:
        raise ConfigError(f"cuda_graph: on, but this run cannot capture its step: {eager_reason}")
    if cfg.cuda_graph == "auto" and eager_reason and ctx.is_main:
        print(f"train: steps run eagerly ({eager_reason})", file=sys.stderr, flush=True)

    def fallback(reason: str) -> None:
        nonlocal eager_reason
        eager_reason = reason
        if ctx.is_main:
            print(f"train: steps run eagerly ({reason})", file=sys.stderr, flush=True)

    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, module in modules.items():
            if name not in task.local_modules and any(p.requires_grad for p in module.parameters()):
                ids = [ctx.device.index] if ctx.device.type == "cuda" else None
                train_modules[name] = DDP(train_modules[name], device_ids=ids)

    prior_skipped = skipped_from(state)  # what data.skip_bad skipped before this call (from the checkpoint)

    def skipped() -> dict:
        return merge_skipped(prior_skipped, task.skipped_records())

    def keep(obj, path: Path) -> None:
        try:
            ckpt.atomic_save(obj, path)
        except StorageError as exc:  # every file is replaced only by a complete one: the last checkpoint stands
            raise exc.with_advice("once there is room, --resume continues from the last checkpoint written "
                                  "whole") from None

    def save_state() -> None:
        """This rank's resume file (every rank, the same step: a resume needs them all alike)."""
        epoch, step_in_epoch = divmod(global_step, sampler.steps_per_epoch)
        keep({
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "optimizer": plain_lr(opt.state_dict()), "scheduler": plain_lr(scheduler.state_dict()),
            "scaler": scaler.state_dict(), "rng": ckpt.rng_state(),
            "global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "model_config": task.model_config(), "backbone": modules["backbone"].state_dict(),
            "contract": contract, "config": cfg.model_dump(mode="json"),
            "world_size": ctx.world_size, "rank": ctx.rank, "sharding": ckpt.sharding(modules),
            "cpu_threads": torch.get_num_threads(), "skipped": plain_skipped(skipped()),
        }, ckpt.rank_path(out, ctx.rank))

    def write_model(metrics: dict[str, float] | None = None) -> None:
        """The exported model (``model.pt``, with the metrics of its step's validation, and ``backbone.pth``):
        the main process's files, which resumption never reads."""
        if ctx.is_main:
            blob = {"model_config": task.model_config(), "backbone": modules["backbone"].state_dict(),
                    "contract": contract, "step": global_step, "metrics": metrics or {}}
            keep(blob, out / "model.pt")
            keep(modules["backbone"].state_dict(), out / "backbone.pth")

    def save(metrics: dict[str, float] | None = None) -> None:
        save_state()
        write_model(metrics)

    def validate(state_saved: bool) -> dict[str, float]:
        """Validate at ``global_step``; with ``state_saved`` (this step's resume file is written: a checkpoint
        step, or the last) write the model files with the result. When the task's validation fails the model
        files are written all the same (and, in a single process, the resume file if this step had none),
        then the error says where the weights are."""
        try:
            result = _validate(task, modules, ctx, log_file, global_step, observer)
        except _TaskValidationFailed as failed:
            write_model(metrics)
            kept = [out / "model.pt", out / "backbone.pth"]
            if not state_saved:  # a single process (under torchrun every validation step saved every rank's)
                save_state()
            kept.append(ckpt.rank_path(out, ctx.rank))
            raise _failed(failed.error, global_step, kept, finished=global_step >= total_steps) from None
        if state_saved:
            write_model(result)
        return result

    def step_done(loss, epoch: int, log_now: bool, checkpoint_now: bool, validate_now: bool) -> dict[str, float]:
        """The rest of a step: its log row, progress, checkpoint and validation; the metrics of the run so far."""
        nonlocal last_loss
        # Reading the loss forces a host sync; on a GPU that would drain the launch queue every step, so it is
        # read (and checked, on every rank: each has its own batch) only on logging steps.
        if log_now:
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {global_step}; lower optim.lr or check the data")
            rate = seen / max(1e-9, time.perf_counter() - t0)
            if log_file:
                log_file.append({"step": global_step, "epoch": epoch, "loss": last_loss,
                                 "lr": float(scheduler.get_last_lr()[0]), "images_per_s": rate})
            if bar is not None:
                bar.update(last_loss, rate)
        if bar is not None:
            bar.advance()
        if ctx.is_main:
            observer.on_step(global_step, total_steps)
        if checkpoint_now:
            save_state()  # before this step's validation: a validation that fails loses nothing
        if validate_now:
            return validate(state_saved=checkpoint_now)  # writes model.pt with its metrics
        if checkpoint_now:
            write_model(metrics)
        return metrics

    def finish(finished_before: bool, stopped: bool) -> dict[str, float]:
        """The end of this call: the last step's resume files, validation and model files; the skipped records."""
        nonlocal last_loss
        if finished_before:
            # the log lacks the last step's validation (it failed, or the run was killed during it): run it,
            # log it once and give model.pt its metrics; the resume files stay as they are
            logged, last_loss = ckpt.logged_at(out / "metrics.jsonl", global_step) if ctx.is_main else (None, last_loss)
            result = logged if logged is not None else \
                _validate_finished(task, modules, ctx, log_file, global_step, observer, write_model)
            if not all((out / name).is_file() for name in ("model.pt", "backbone.pth")):
                write_model(result)  # removed since: written again from the last step's state, with its metrics
            return result
        result = metrics
        if stopped or (cfg.val_every and global_step % cfg.val_every == 0):
            if global_step % cfg.checkpoint_every:  # the loop did not just save this step
                save(metrics)
        else:
            # the last step's validation: after its checkpoint, so a validation that fails loses nothing
            if global_step % cfg.checkpoint_every:  # (the loop saved a checkpoint step's state already)
                save_state()
            result = validate(state_saved=True)
        report_skipped(skipped(), ctx, log_file, global_step)
        return result

    def open_log():
        out.mkdir(parents=True, exist_ok=True)
        # one run at a time in a folder; checked again under the claim (a run that wrote there meanwhile)
        claim.append(FolderClaim(out, "training run"))
        outdir.check_start(out, resume, cfg)
        kept = outdir.write_config(out, cfg)
        if kept:
            print(f"train: {out / 'config.yaml'} held another config: kept as {kept.name}", file=sys.stderr,
                  flush=True)
        # rows after the starting step were logged by a run that stopped before checkpointing them: drop
        # them (atomically) so the steps about to be re-run are not logged twice
        ckpt.truncate_log(out / "metrics.jsonl", global_step)
        return ckpt.MetricsLog(out / "metrics.jsonl")

    log_file = together("writing the output folder", open_log)
    bar = ProgressBar(progress and ctx.is_main, total_steps, global_step)
    metrics: dict[str, float] = {}
    steps_this_call, last_loss, stopped = 0, float("nan"), False
    t0, seen = time.perf_counter(), 0
    runner = StepRunner(lambda batch: task.training_step(train_modules, batch), opt, scaler, clip_params,
                        cfg.optim.grad_clip, ctx.device, ctx.amp_dtype,
                        graph=None if eager_reason or cfg.cuda_graph == "off" else CudaGraph(),
                        on_fallback=fallback if cfg.cuda_graph == "auto" else None)
    # resuming a run that already reached its last step trains nothing: its metrics are the ones its log holds
    # for that step (validated again only when the log lacks them), neither logged again (metrics.jsonl never
    # holds a step twice) nor saved over the files
    finished_before = global_step >= total_steps
    if finished_before and ctx.is_main:
        print(f"--resume: {out} already reached step {global_step} of {total_steps}; nothing to train",
              file=sys.stderr, flush=True)
    try:
        if not finished_before:
            task.before_training(modules)
        while global_step < total_steps and not stopped:
            epoch, step_in_epoch = divmod(global_step, sampler.steps_per_epoch)
            sampler.set_position(epoch, step_in_epoch)
            # A private generator: creating a loader must not draw from the global RNG, or a resumed
            # run (which creates one mid-epoch) would diverge from an uninterrupted one.
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                collate_fn=task.collate_fn, pin_memory=ctx.device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for m in modules.values():
                m.train()
            for batch in prefetch(loader, task.to_device, ctx.device):
                loss = runner(task.augment(batch))
                scheduler.step()
                global_step += 1
                steps_this_call += 1
                seen += cfg.batch_size * ctx.world_size
                log_now = global_step % cfg.log_every == 0 or global_step == total_steps
                validate_now = bool(cfg.val_every) and global_step % cfg.val_every == 0
                # under torchrun every rank saves its resume file before rank 0 validates alone: a validation
                # that fails then leaves every rank's state at this step (a single process saves its own on failure)
                checkpoint_now = global_step % cfg.checkpoint_every == 0 or (validate_now and ctx.world_size > 1)
                if log_now or checkpoint_now or validate_now:  # files written, rank 0's validation: then an exchange
                    metrics = together(f"step {global_step}", lambda: step_done(
                        loss, epoch, log_now, checkpoint_now, validate_now), main_only=False)
                else:
                    step_done(loss, epoch, False, False, False)
                if global_step >= total_steps:
                    break
                if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                    stopped = True
                    break
        # the last exchange: no rank leaves before rank 0 has validated and written the model files, and a failure
        # there reaches every rank
        metrics = together("finishing the run", lambda: finish(finished_before, stopped), main_only=False)
    finally:
        if bar is not None:
            bar.close()
        if log_file:
            log_file.close()
    return TrainResult(out, global_step, total_steps, stopped, metrics, last_loss, runner.mode, eager_reason,
                       ctx.rank, skipped=int(skipped()["count"]))


def build_optimizer(cfg: RunConfig, params: list[nn.Parameter], fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW. ``fused`` (on CUDA): one kernel updates every parameter, and it takes the loss scaler's
    inf check as a device tensor, which a captured CUDA graph needs (the Trainer uses it on every CUDA run)."""
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                              fused=fused or None)
        zero_momentum_buffers(opt)
        return opt
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused or None)


def zero_momentum_buffers(opt: torch.optim.SGD) -> None:
    """Give every parameter of an SGD-with-momentum optimizer a zero momentum buffer before its first step.

    Fused SGD makes its buffers with ``torch.empty_like`` on the first step and lets the kernel fill them; when
    the fp16 loss scaler reports an overflow on that step (the usual start: the scale begins at 65,536) the
    kernel skips the update and the buffers keep whatever memory they were given, which the next real step
    then adds in (the likely cause of an fp16 SGD run on an H200 stopping at step 4 with a NaN loss; not yet
    run there again). A zero buffer gives the same first real step (buffer = momentum * 0 + gradient =
    gradient, as SGD's first step sets it; dampening is 0 here) and an overflowed step leaves it zero. A
    checkpoint's state, loaded later, replaces these."""
    for group in opt.param_groups:
        if group["momentum"] == 0 or group["dampening"] != 0:
            continue
        for p in group["params"]:
            if "momentum_buffer" not in opt.state[p]:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class _TaskValidationFailed(Exception):
    """The task's own validation raised ``error`` (an observer's exception, a pruned trial, passes as is)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _failed(error: BaseException, step: int, kept: list[Path], finished: bool) -> BaseException:
    """What a failed validation raises: a VisrecError (bad validation data) as :class:`ValidationFailed`
    saying where the weights are and what to do; anything else (a bug) as it is, with its traceback."""
    if not isinstance(error, VisrecError):
        return error
    then = f", then run again with --resume{' to validate them without training again' if finished else ''}"
    return ValidationFailed(f"{error}\nvalidation at step {step} failed; the weights trained so far are saved in "
                            f"{', '.join(str(p) for p in kept)}. Fix the validation set (data.val){then}.")


def _validate_finished(task: Task, modules: dict[str, nn.Module], ctx: RunContext, log_file, step: int,
                       observer: Observer, write_model) -> dict[str, float]:
    """The validation of a run that had already reached its last step but whose log lacks it."""
    try:
        metrics = _validate(task, modules, ctx, log_file, step, observer)
    except _TaskValidationFailed as failed:
        out = Path(task.cfg.output)
        raise _failed(failed.error, step, [out / "model.pt", ckpt.rank_path(out, ctx.rank)], True) from None
    if metrics:
        write_model(metrics)
    return metrics


def _validate(task: Task, modules: dict[str, nn.Module], ctx: RunContext, log_file, step: int,
              observer: Observer):
    if not ctx.is_main:
        return {}
    backbone = modules["backbone"]
    backbone.eval()
    try:
        with torch.no_grad():
            try:
                metrics = dict(task.validate(backbone))
            except Exception as exc:
                raise _TaskValidationFailed(exc) from exc
            metrics.update(observer.on_validate(step, backbone) or {})
    finally:
        backbone.train()
    if metrics and log_file:
        log_file.append({"step": step, "val": metrics})
    return metrics
