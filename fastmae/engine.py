"""The training engine: one loop shared by every training command.

A command states its recipe (:class:`Recipe`: the model, its optimiser, the data, the schedule,
how a batch becomes a loss, what to write at the end) and hands it, with the command's ``args``,
to :class:`Engine`, which runs the named steps

    setup -> resume -> begin -> train_one_epoch (-> save, end_epoch) ... -> finish

and owns what every command shares, as the official ``main_*.py`` scripts do: the device and the
processes (torchrun, DDP), the seed, AMP (``--precision``) and its gradient scaler,
``torch.compile``, the lr rule ``lr = blr * effective_batch / 256`` applied per accumulation group
along the recipe's schedule, gradient accumulation, skipping non-finite steps, the ``log.txt``
line per epoch, TensorBoard scalars, progress, and checkpoints (atomic, mid-epoch, resumable
bit-identically; see :mod:`fastmae.checkpoint`).

Reproducibility rests on the data: the sampler hands the recipe's dataset ``(index, epoch)`` keys
(:class:`fastmae.data.EpochSampler`) and the dataset draws every random choice of a sample from
them, so a run's batches depend neither on the process or worker count nor on a resume. What the
step itself draws (drop path, mixup) comes from generators seeded before each batch from the
run's seed, the batch's position and the process (:func:`fastmae.data.step_seed`), so a resumed
run draws the same on every process.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import checkpoint as ckpt_io
from . import data
from .distributed import (all_reduce_mean, all_reduce_sum, barrier, broadcast_from_main, init_distributed, parse_device,
                          resolve_device)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile's modes; "reduce-overhead" replays forward and backward as CUDA graphs (on CPU
# it compiles as "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRINT_FREQ = 20  # plain progress lines (when stderr is not a terminal), as the official print_freq
LOG = "log.txt"
BEST = "checkpoint-best.pth"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


class Recipe:
    """What a training command trains. Subclasses set the attributes and implement the methods.

    ``args`` is the command's namespace, read by the engine for the training flags every command
    shares (``--batch_size``, ``--accum_iter``, ``--epochs``, ``--blr``/``--lr``, ``--seed``,
    ``--device``, ``--precision``, ``--output_dir``, ``--resume``, ...) and by the recipe for its
    own. The engine completes ``args.precision`` and ``args.lr`` (from ``--blr``) in its set-up,
    before it builds the optimizer, as the official code does; the checkpoints store them so.
    """

    command = ""  # the fastmae command, named in messages ("pretrain")
    samples_per_item = 1  # training samples in one dataset item (VideoMAE's --num_sample clips of one video)
    model_flags = ""  # the flags that fix the model, named when a checkpoint's model differs
    output_files: tuple[str, ...] = ()  # what finish() writes to --output_dir (--overwrite removes them)

    def build_model(self) -> torch.nn.Module:
        """The model (on the CPU, initialised from the seeded global RNG); errors name the flags."""
        raise NotImplementedError

    def model_config(self, model) -> dict:
        """What rebuilds the model; stored in checkpoints and compared on resume."""
        raise NotImplementedError

    def optimizer(self, model) -> torch.optim.Optimizer:
        """The optimizer over the model's parameters (on their device), at ``args.lr``."""
        raise NotImplementedError

    def prepare(self, model) -> None:
        """Called once the model is on its device with the same weights on every process, before
        any checkpoint is resumed (e.g. to copy it for an EMA of the weights)."""

    def after_step(self, model) -> None:
        """Called after each optimizer step that was taken (e.g. to update an EMA of the weights)."""

    def state_dict(self) -> dict:
        """The recipe's own state, saved in checkpoints (e.g. the EMA weights)."""
        return {}

    def load_state_dict(self, state: dict, model) -> None:
        """Restores :meth:`state_dict` on resume, after ``model`` got the checkpoint's weights."""

    def train_set(self, model) -> torch.utils.data.Dataset:
        """The training samples, indexed by the sampler's ``(index, epoch)`` keys; each item is a
        tuple of tensors (a batch is moved to the device tensor by tensor). A dataset whose
        ``reports_skipped`` is true ends each item with the number of unreadable files it passed
        over (:func:`fastmae.data.first_readable`), which the engine counts and takes off."""
        raise NotImplementedError

    def collate_fn(self, device: torch.device):
        """The DataLoader's ``collate_fn`` for a run on ``device`` (None: the default)."""
        return None

    def learning_rate(self, epoch: float) -> float:
        """The schedule: the lr at fractional ``epoch`` (set at each accumulation group's first batch)."""
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        """The scalar loss of ``batch`` (on the device), computed by ``model`` (maybe DDP-wrapped or
        compiled) under autocast."""
        raise NotImplementedError

    def describe(self, model, train_set) -> list[str]:
        """Lines printed before training starts (the model, the data)."""
        return []

    # What evaluate() returns that ranks checkpoints: the best epoch's checkpoint is kept as
    # checkpoint-best.pth (None: no evaluation).
    best_metric: str | None = None

    def evaluate(self, model, device, amp_dtype, dist) -> dict:
        """Called on every process after each epoch, with the model in eval mode: the epoch's
        test statistics for log.txt (``{"test_acc1": ...}``), the same on every process."""
        return {}

    def finish(self, model, device, step: int) -> dict[str, str]:
        """Called on the main process after training: writes the command's outputs, returns
        ``{what: path}`` for the summary (``reconstructions: out/reconstruction.png``)."""
        return {}


@dataclass
class Meters:
    """Running sums for one epoch's log line (official MetricLogger global averages)."""
    loss_sum: float = 0.0
    loss_count: int = 0
    lr_sum: float = 0.0
    lr_count: int = 0
    skipped: int = 0  # optimizer steps skipped (non-finite)
    files_skipped: int = 0  # unreadable files passed over by the data (this process's)
    data_wait: float = 0.0  # seconds spent waiting for the next batch
    busy: float = 0.0  # seconds spent on batches once they came

    def state(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Result:
    """What :meth:`Engine.run` returns."""
    model: torch.nn.Module
    steps: int
    seconds: float
    images_per_sec: float
    final_loss: float | None
    checkpoint: str | None  # the checkpoint this run wrote last, if any
    outputs: dict = field(default_factory=dict)  # what the recipe's finish() wrote: {what: path}
    losses: list = field(default_factory=list)  # per-epoch mean losses of this run
    test: dict = field(default_factory=dict)  # the last epoch's test statistics (recipes that evaluate)


# ---------------------------------------------------------------------------- helpers
def set_lr(optimizer, lr: float) -> None:
    """Every group's lr, times its ``lr_scale`` where it has one (layer-wise decay, official)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _tensorboard(log_dir: str | None):
    """A SummaryWriter, or None when no log_dir is set or tensorboard is not installed."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def _compile_mode(flag) -> str | None:
    """torch.compile's ``mode`` for ``--compile [MODE]`` (``True``, from a Python caller, and
    ``"default"`` are the default mode)."""
    if flag in (None, False, True, "default"):
        return None
    if flag not in COMPILE_MODES:
        raise ValueError(f"unknown --compile mode {flag!r}; choose one of {', '.join(COMPILE_MODES)}")
    return flag


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _check_flags(args) -> None:
    """The shared training flags, each with an error naming it."""
    for flag, value, low in [("--batch_size", args.batch_size, 1), ("--accum_iter", args.accum_iter, 1),
                             ("--epochs", args.epochs, 0), ("--start_epoch", args.start_epoch, 0),
                             ("--num_workers", args.num_workers, 0),
                             ("--save-every", args.save_every, 0), ("--max-nonfinite", args.max_nonfinite, 1),
                             ("--max-steps", 1 if args.max_steps is None else args.max_steps, 1)]:
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.warmup_epochs < 0 or args.weight_decay < 0 or args.blr <= 0 or (args.lr is not None and args.lr <= 0):
        raise ValueError("--warmup_epochs and --weight_decay must be >= 0, --blr and --lr > 0")
    if args.min_lr < 0:
        raise ValueError(f"--min_lr must be >= 0, got {args.min_lr}")
    if args.clip_grad is not None and not args.clip_grad > 0:  # a negative norm would flip the gradients
        raise ValueError(f"--clip-grad must be > 0 (leave it out for no clipping), got {args.clip_grad}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")


def _continues_in_output_dir(args, resume) -> bool:
    """Whether the run resumes from a checkpoint in its own --output_dir (continuing that run)."""
    return bool(resume) and os.path.dirname(os.path.realpath(resume)) == os.path.realpath(args.output_dir)


def _check_output_dir(args, dist_info) -> None:
    """A run must not replace checkpoints of a run it does not continue (``--resume auto``, or a
    file in its own --output_dir), unless --overwrite says so. Rank 0 decides for every process."""
    found = None
    if (dist_info.is_main and args.output_dir and not getattr(args, "overwrite", False) and args.resume != "auto"
            and not _continues_in_output_dir(args, args.resume)):
        found = ckpt_io.latest(args.output_dir)
    found = broadcast_from_main(found, dist_info)
    if found is not None:
        raise ValueError(
            f"--output_dir {args.output_dir!r} holds an earlier run's checkpoint ({found}), which this "
            f"run would replace: pass --resume auto to continue that run, a new --output_dir to start "
            f"afresh beside it, or --overwrite to replace it")


def _optimizer_step(model, optimizer, scaler, clip_grad) -> bool:
    """Clip (after unscaling, with fp16) if asked, then step. With fp16 the scaler skips steps with
    inf/nan gradients (and lowers its scale); without one (fp32, bf16) a step whose gradients are
    not finite is skipped here, and False returned: one such step would turn every weight into
    NaN. (Under DDP the gradients are already averaged, so every process decides alike.)"""
    if scaler is not None:
        if clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return True
    if clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if not torch.isfinite(norm):
        return False
    optimizer.step()
    return True


def _finite_weights(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------- the engine
class Engine:
    """Runs a :class:`Recipe` as ``args`` describes: ``Engine(args, recipe).run()``.

    ``on_step(step)``: called after each optimizer step (tests use it to interrupt a run).
    """

    def __init__(self, args, recipe: Recipe, on_step=None):
        self.args, self.recipe, self.on_step = args, recipe, on_step

    def run(self) -> Result:
        self.setup()
        self.resume()
        self.begin()
        try:
            for epoch in range(self.start_epoch, self.args.epochs):
                if self.stop or self.train_one_epoch(epoch):
                    break
        finally:  # also when the run stops on an error: the bar's line ends, logged scalars reach disk
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.flush()
                self.writer.close()
        return self.finish()

    def say(self, *a, **k) -> None:
        """print, on the main process only."""
        if self.main:
            print(*a, **k)

    # ------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Device and processes, flag checks, seed, model, optimizer, scaler, data, DDP and compile."""
        args, recipe = self.args, self.recipe
        if getattr(args, "dist_on_itp", False):
            raise ValueError(f"--dist_on_itp (the official code's launch on Microsoft ITP clusters) is not supported: "
                             f"launch with torchrun --nproc_per_node=N -m fastmae {recipe.command} ...")
        self.dist = init_distributed(parse_device(args.device).type, getattr(args, "dist_url", "env://"))
        self.device = device = resolve_device(args.device, self.dist)
        self.main = self.dist.is_main
        world = self.dist.world_size

        _check_flags(args)
        self.compile_mode = _compile_mode(args.compile)
        _check_output_dir(args, self.dist)
        if args.precision is None:  # the official code trains with fp16 autocast on CUDA
            args.precision = "fp16" if device.type == "cuda" else "fp32"
        if args.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
        seed = args.seed + self.dist.rank  # as the official code; DDP broadcasts rank 0's weights
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        # ---- model, optimizer, gradient scaler
        self.model = recipe.build_model().to(device)
        self.global_batch = args.batch_size * args.accum_iter * world * recipe.samples_per_item
        if args.lr is None:
            args.lr = args.blr * self.global_batch / 256
        self.optimizer = recipe.optimizer(self.model)
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
        self.amp_dtype = PRECISIONS[args.precision]

        # ---- data: whole accumulation groups per epoch (a trailing partial group is not run)
        self.train_set = recipe.train_set(self.model)
        # a streamed dataset (shards) splits itself over the processes and is positioned by set_epoch
        self.streaming = isinstance(self.train_set, torch.utils.data.IterableDataset)
        self.sampler = None if self.streaming else data.EpochSampler(self.train_set, world, self.dist.rank,
                                                                      seed=args.seed)
        per_process = len(self.train_set) if self.streaming else self.sampler.num_samples
        self.iters_per_epoch = per_process // args.batch_size
        self.steps_per_epoch = self.iters_per_epoch // args.accum_iter
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(self.train_set)} samples ({per_process} per process): fewer "
                f"than one optimizer step of --batch_size {args.batch_size} x --accum_iter {args.accum_iter}")
        self.used_iters = self.steps_per_epoch * args.accum_iter
        self.reports_skipped = bool(getattr(self.train_set, "reports_skipped", False))
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.num_workers,
            collate_fn=recipe.collate_fn(device), worker_init_fn=data.init_worker,
            pin_memory=getattr(args, "pin_mem", True) and device.type == "cuda", drop_last=True,
            # a streamed dataset's workers are started anew each epoch: they take its set_epoch position
            persistent_workers=args.num_workers > 0 and not self.streaming,
            generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched
        )
        # What fixes a mid-epoch position: ``epoch_iter`` counts batches of --batch_size, steps end
        # every --accum_iter batches, and the epoch's order comes from --seed and the process count.
        self.position_settings = {"--batch_size": args.batch_size, "--accum_iter": args.accum_iter,
                                  "--seed": args.seed, "process count": world}
        if self.streaming:  # the order of a streamed epoch also depends on how the workers share it
            self.position_settings["--num_workers"] = args.num_workers

        # ---- the module that trains: DDP around the model, torch.compile around that
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(self.model,
                                                     device_ids=[device.index] if device.type == "cuda" else None)
        self.run_model = torch.compile(self.ddp_model, mode=self.compile_mode) if args.compile else self.ddp_model
        recipe.prepare(self.model)  # after DDP's construction gave every process rank 0's weights

        # ---- where the run stands (resume() may move it on)
        self.start_epoch, self.epoch_iter, self.step, self.nonfinite = args.start_epoch, 0, 0, 0
        self.meters = Meters()
        self.resume_path = None
        self.saved = None  # the last checkpoint this run wrote
        self.stop = False
        self.last_loss, self.images_seen, self.epoch_losses = None, 0, []
        self.best = None  # the best value of the recipe's best_metric so far
        self.last_test: dict = {}
        self.writer = self.bar = None

    # ------------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Continue from ``--resume`` (a checkpoint, or ``auto``: the latest in --output_dir):
        everything is checked before anything is loaded; the position is restored to the batch."""
        args = self.args
        path = args.resume
        if path == "auto":
            path = ckpt_io.latest(args.output_dir) if args.output_dir else None
            if path is None:
                self.say(f"--resume auto: no checkpoint in {args.output_dir!r}, starting from scratch")
        self.resume_path = path
        if path:
            ckpt = ckpt_io.load(path, map_location="cpu")
            ckpt_io.check_resume(ckpt, path, model=self.model, model_config=self.recipe.model_config(self.model),
                                 model_flags=self.recipe.model_flags, optimizer=self.optimizer,
                                 dataset_len=len(self.train_set), position_settings=self.position_settings)
            self.model.load_state_dict(ckpt["model"], strict=True)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt["scaler"] is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.start_epoch, self.epoch_iter, self.step = ckpt["epoch"], ckpt["epoch_iter"], ckpt["step"]
            self.nonfinite = ckpt.get("nonfinite", 0)
            self.best = ckpt.get("best")
            self.recipe.load_state_dict(ckpt.get("recipe") or {}, self.model)
            if self.epoch_iter:
                self.meters = Meters(**ckpt["meters"])
            if self.dist.rank == 0:
                ckpt_io.set_rng_states(ckpt["rng"])
            self.say(f"resumed from {path}: epoch {self.start_epoch}, batch {self.epoch_iter} of "
                     f"{self.used_iters}, step {self.step}")
        self.stop = args.max_steps is not None and self.step >= args.max_steps

    # ------------------------------------------------------------------------ begin
    def begin(self) -> None:
        """Prepare --output_dir (stale temporaries; with --overwrite an earlier run's files), open
        the logs, and say what is about to train."""
        args, world = self.args, self.dist.world_size
        self.writer = _tensorboard(args.log_dir) if self.main else None
        self.log_path = os.path.join(args.output_dir, LOG) if args.output_dir else None
        self.last_path = os.path.join(args.output_dir, ckpt_io.LAST) if args.output_dir else None
        if self.main and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            for tmp in ckpt_io.remove_stale_temporaries(args.output_dir):
                self.say(f"removed {tmp}, left by an interrupted save")
            if getattr(args, "overwrite", False) and not _continues_in_output_dir(args, self.resume_path):
                outputs = [os.path.join(args.output_dir, name) for name in (LOG, BEST, *self.recipe.output_files)]
                for old in ckpt_io.run_checkpoints(args.output_dir) + [f for f in outputs if os.path.isfile(f)]:
                    os.remove(old)
                    self.say(f"--overwrite: removed {old}, of an earlier run")

        for line in self.recipe.describe(self.model, self.train_set):
            self.say(line)
        compiled = (f", compiled ({self.compile_mode})" if self.compile_mode else ", compiled") if args.compile else ""
        per_item = f" x {self.recipe.samples_per_item} samples" if self.recipe.samples_per_item > 1 else ""
        self.say(f"device {self.device} x {world} process(es), precision {args.precision}{compiled}; "
                 f"batch {args.batch_size}{per_item} x accum {args.accum_iter} x {world} = {self.global_batch}; "
                 f"lr {args.lr:.3g} (blr {args.blr:.3g}); {self.steps_per_epoch} steps/epoch for {args.epochs} epochs")
        self.use_bar = self.main and sys.stderr.isatty()
        self.t_start = time.time()
        self.model.train(True)

    # ------------------------------------------------------------------------ one epoch
    def train_one_epoch(self, epoch: int) -> bool:
        """The batches of ``epoch`` from ``epoch_iter`` on: forward under autocast, backward (scaled
        for fp16) accumulated over ``--accum_iter`` batches, then the optimizer step, or its skip
        when the loss or the gradients are not finite. Returns whether the run stops (--max-steps)."""
        args, device, accum = self.args, self.device, self.args.accum_iter
        (self.train_set if self.streaming else self.sampler).set_epoch(epoch, start=self.epoch_iter * args.batch_size)
        it = self.epoch_iter
        group_bad = False
        self.bar = None
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.used_iters, initial=it, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                            dynamic_ncols=True, leave=True)
        t_epoch, imgs_epoch = time.time(), 0
        self.optimizer.zero_grad(set_to_none=True)
        for batch in self._timed(self.loader):
            if it >= self.used_iters:
                break
            if self.reports_skipped:
                *batch, skipped = batch
                self._count_skipped(int(skipped.sum()))
            if it % accum == 0:  # true at the first batch: a run stops (and resumes) only at a group's end
                lr = self.recipe.learning_rate(it / self.iters_per_epoch + epoch)
                set_lr(self.optimizer, lr)
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            # the step's own random draws (drop path, mixup) come from the run's seed, the position and
            # the process: the same after a resume, on every process, whatever the RNG states were
            data.seed_globally(data.step_seed(args.seed, epoch, it, self.dist.rank))
            sync = (it + 1) % accum == 0
            no_sync = self.ddp_model.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    loss = self.recipe.loss(self.run_model, batch)
                loss_value = all_reduce_mean(loss.detach().float(), self.dist).item()
                if math.isfinite(loss_value):
                    scaled = loss / accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    self.meters.loss_sum += loss_value
                    self.meters.loss_count += 1
                    self.last_loss = loss_value
                else:
                    group_bad = True
            self.meters.lr_sum += lr
            self.meters.lr_count += 1
            it += 1
            seen = args.batch_size * self.dist.world_size * self.recipe.samples_per_item  # whole batches (drop_last)
            self.images_seen += seen
            imgs_epoch += seen
            if not sync:
                continue
            self._step(epoch, group_bad, loss_value)
            group_bad = False
            self._report_step(epoch, it, lr, imgs_epoch / max(time.time() - t_epoch, 1e-9))
            if (self.main and self.last_path and args.save_every and self.step % args.save_every == 0
                    and self.save(epoch, it)):
                self.saved = self.last_path
            if self.on_step is not None:
                self.on_step(self.step)
            if args.max_steps is not None and self.step >= args.max_steps:
                self.stop = True
                break
        if self.bar is not None:
            self.bar.close()
        self.epoch_iter = 0
        if self.stop and it < self.used_iters:  # stopped mid-epoch: save the exact position
            if self.main and self.last_path and self.save(epoch, it):
                self.saved = self.last_path
            return True
        self.end_epoch(epoch, time.time() - t_epoch, imgs_epoch)
        return self.stop

    def _timed(self, loader):
        """The loader's batches, the time spent waiting for each and on each counted in the meters."""
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            t1 = time.perf_counter()
            self.meters.data_wait += t1 - t0
            yield batch
            self.meters.busy += time.perf_counter() - t1

    def data_wait_frac(self) -> float:
        """The share of this epoch's time spent waiting for data (0 when the loader keeps up)."""
        total = self.meters.data_wait + self.meters.busy
        return self.meters.data_wait / total if total > 0 else 0.0

    def _count_skipped(self, n: int) -> None:
        """Unreadable files: counted per epoch; more than --max-bad-frac of the epoch stops the run."""
        if not n:
            return
        self.meters.files_skipped += n
        frac = getattr(self.args, "max_bad_frac", 0.01)
        per_epoch = self.used_iters * self.args.batch_size
        if self.meters.files_skipped > frac * per_epoch:
            raise data.UnreadableData(
                f"{self.meters.files_skipped} files of this epoch's {per_epoch} samples (on this process) could not be "
                f"read, more than --max-bad-frac {frac:g}: check --data_path (the warnings above name them)")

    def _step(self, epoch: int, group_bad: bool, loss_value: float) -> None:
        """The optimizer step closing an accumulation group, or its skip (counted; too many in a row
        stop the run)."""
        args = self.args
        if not group_bad and _optimizer_step(self.model, self.optimizer, self.scaler, args.clip_grad):
            self.nonfinite = 0
            self.recipe.after_step(self.model)
        else:
            self.nonfinite += 1
            self.meters.skipped += 1
            what = f"non-finite loss ({loss_value})" if group_bad else "non-finite gradients"
            self.say(f"step {self.step}: {what}, step skipped ({self.nonfinite} in a row, limit {args.max_nonfinite})")
            if self.nonfinite >= args.max_nonfinite:
                raise NonFiniteLossError(
                    f"the loss or its gradients were non-finite for {self.nonfinite} consecutive steps (epoch "
                    f"{epoch}, step {self.step}); stopping. Lower --lr/--blr, set --clip-grad, or use --precision "
                    f"fp32/bf16; the last good checkpoint is {self._last_good()}")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def _report_step(self, epoch: int, it: int, lr: float, rate: float) -> None:
        """TensorBoard scalars, and the progress bar or every PRINT_FREQ steps a plain line."""
        args = self.args
        if self.writer is not None and self.last_loss is not None:
            epoch_1000x = int((it / self.iters_per_epoch + epoch) * 1000)
            self.writer.add_scalar("train_loss", self.last_loss, epoch_1000x)
            self.writer.add_scalar("lr", lr, epoch_1000x)
        shown = "nan" if self.last_loss is None else f"{self.last_loss:.4f}"
        if self.bar is not None:
            self.bar.update(args.accum_iter)
            self.bar.set_postfix(loss=shown, lr=f"{lr:.2e}", img_s=f"{rate:.1f}", data=f"{self.data_wait_frac():.0%}")
        elif self.main and (self.step % PRINT_FREQ == 0):
            print(f"epoch {epoch + 1}/{args.epochs} [{it}/{self.used_iters}] step {self.step} "
                  f"loss {shown} lr {lr:.3e} {rate:.1f} img/s, data wait {self.data_wait_frac():.0%}", flush=True)

    def end_epoch(self, epoch: int, seconds: float, images: int) -> None:
        """The epoch's log.txt line and summary, checkpoint-last.pth, and the official archive copy
        ``checkpoint-<epoch>.pth`` every 20 epochs and after the last."""
        args, meters = self.args, self.meters
        loss_avg = meters.loss_sum / meters.loss_count if meters.loss_count else float("nan")
        lr_avg = meters.lr_sum / meters.lr_count if meters.lr_count else float("nan")
        self.epoch_losses.append(loss_avg)
        test, improved = self._evaluate()
        self.last_test = test
        files_skipped = int(all_reduce_sum(torch.tensor(float(meters.files_skipped), device=self.device),
                                           self.dist).item())
        wait = self.data_wait_frac()
        if self.writer is not None:
            for k, v in test.items():  # the official scalars: perf/test_acc1, perf/test_acc5, perf/test_loss
                self.writer.add_scalar(f"perf/{k}", v, epoch)
        if self.main:
            stats = {"train_lr": lr_avg, "train_loss": loss_avg, **test, "epoch": epoch, "step": self.step,
                     "skipped_steps": meters.skipped, "skipped_files": files_skipped,
                     "data_wait_frac": round(wait, 4), "images_per_sec": round(images / max(seconds, 1e-9), 2),
                     "time": round(seconds, 3)}
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
            shown = "".join(f"  {k.removeprefix('test_')} {v:.2f}" for k, v in test.items() if k.startswith("test_acc"))
            bad = f"  {files_skipped} unreadable files skipped" if files_skipped else ""
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_avg:.4f}  lr {lr_avg:.3e}{shown}  "
                  f"{stats['images_per_sec']:.1f} img/s, data wait {wait:.0%}  ({_fmt_time(seconds)}){bad}", flush=True)
        self.meters = Meters()
        if self.main and self.last_path and self.save(epoch + 1, 0):
            self.saved = self.last_path
            if epoch % 20 == 0 or epoch + 1 == args.epochs:
                ckpt_io.copy_atomic(self.last_path, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
            if improved:
                ckpt_io.copy_atomic(self.last_path, os.path.join(args.output_dir, BEST))

    def _evaluate(self) -> tuple[dict, bool]:
        """The recipe's test statistics of this epoch (with ``max_<metric>`` so far), and whether
        its best_metric improved."""
        metric = self.recipe.best_metric
        if self.dist.enabled:  # buffers (a probe's BatchNorm statistics) as rank 0 saves them
            import torch.distributed as tdist

            for buf in self.model.buffers():
                tdist.broadcast(buf, 0)
        self.model.eval()
        try:
            test = self.recipe.evaluate(self.model, self.device, self.amp_dtype, self.dist)
        finally:
            self.model.train(True)
        if not metric or metric not in test:
            return test, False
        improved = self.best is None or test[metric] > self.best
        if improved:
            self.best = test[metric]
        return {**test, f"max_{metric.removeprefix('test_')}": self.best}, improved

    # ------------------------------------------------------------------------ save
    def save(self, epoch: int, epoch_iter: int) -> bool:
        """Write checkpoint-last.pth at batch ``epoch_iter`` of ``epoch``, unless the weights are no
        longer finite: a good checkpoint is never replaced by a poisoned one. Returns whether it
        was written."""
        path = self.last_path
        if not _finite_weights(self.model):
            self.say(f"not saving {path}: the weights hold non-finite values; the last good checkpoint is "
                     f"{self._last_good()}")
            return False
        ckpt_io.save_atomic({
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
            "model": self.model.state_dict(), "model_config": self.recipe.model_config(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch, "epoch_iter": epoch_iter, "step": self.step, "meters": self.meters.state(),
            "nonfinite": self.nonfinite, "best": self.best, "dataset_len": len(self.train_set),
            "position_settings": self.position_settings,
            "args": ckpt_io.plain_args(self.args), "rng": ckpt_io.rng_states(), "recipe": self.recipe.state_dict(),
        }, path)
        return True

    def _last_good(self) -> str:
        return self.saved or self.resume_path or "not written yet"

    # ------------------------------------------------------------------------ finish
    def finish(self) -> Result:
        """The recipe's outputs (main process), then the summary."""
        seconds = time.time() - self.t_start
        outputs = self.recipe.finish(self.model, self.device, self.step) if self.main else {}
        barrier(self.dist)
        result = Result(model=self.model, steps=self.step, seconds=seconds,
                        images_per_sec=self.images_seen / max(seconds, 1e-9), final_loss=self.last_loss,
                        checkpoint=self.saved, outputs=outputs, losses=self.epoch_losses, test=self.last_test)
        if self.main:
            final = "none" if self.last_loss is None else f"{self.last_loss:.4f}"
            if self.epoch_losses:
                final += f" (last epoch mean {self.epoch_losses[-1]:.4f}, first {self.epoch_losses[0]:.4f})"
            print(f"done: {self.step} steps in {_fmt_time(seconds)} ({result.images_per_sec:.1f} images/s), "
                  f"final loss {final}")
            if self.saved:
                print(f"checkpoint: {self.saved}")
            if self.log_path:
                print(f"log: {self.log_path}")
            for what, path in outputs.items():
                print(f"{what}: {path}")
        return result
