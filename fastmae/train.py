"""MAE pre-training with the official recipe (facebookresearch/mae ``main_pretrain.py``).

The recipe: AdamW with betas (0.9, 0.95), ``lr = blr * effective_batch / 256``, per-iteration
linear warmup then a half-cycle cosine (``util/lr_sched.py``), gradient accumulation, the
official augmentation, a ``DistributedSampler`` (also for one process, as the official code),
one ``log.txt`` line per epoch with ``train_lr``/``train_loss``/``epoch``. Differences, each
deliberate:

- no weight decay on biases, norm weights and the cls/mask/position parameters (the official
  ``add_weight_decay`` of timm 0.3.2 decays the 3-D cls and mask tokens);
- augmentation and masking noise are drawn per sample from ``(seed, epoch, index)``
  (:mod:`fastmae.data`), so results do not depend on the process or worker count and a resumed
  run is bit-identical to an uninterrupted one;
- an epoch uses a whole number of accumulation groups (a trailing partial group is not run,
  where the official loop lets its gradients leak into the next epoch);
- a non-finite loss skips its optimizer step instead of exiting; ``--max-nonfinite`` consecutive
  ones stop the run with a clear error;
- checkpoints are atomic, carry the model configuration and RNG states, and can be taken
  mid-epoch (``--save-every``, ``--max-steps``); resumption continues at that exact batch.
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
from . import data, reference
from .model import MODEL_NAMES, create_model
from ._checks import num_kept

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile's modes; "reduce-overhead" replays forward and backward as CUDA graphs (on CPU
# it compiles as "default")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRINT_FREQ = 20  # plain progress lines (when stderr is not a terminal), as the official print_freq


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss."""


# ---------------------------------------------------------------------------- model
def make_model(name: str, input_size: int, norm_pix_loss: bool = False, attn_backend: str = "auto"):
    """The fast MAE ``--model name`` (see :func:`fastmae.create_model`) built for ``--input_size``
    images, with the errors named by their flags."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    p = reference.config_of(name)["patch_size"]
    if input_size <= p or input_size % p:
        raise ValueError(f"--input_size {input_size} is not a multiple of the patch size {p} of {name} "
                         f"larger than it (an MAE needs at least 2 patches)")
    return create_model(name, img_size=input_size, norm_pix_loss=norm_pix_loss, attn_backend=attn_backend)


def param_groups(model, weight_decay: float):
    """[no-decay group, decay group]: biases, norms (1-D) and the cls/mask/position parameters
    get no weight decay; frozen parameters are left out."""
    no_decay_names = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in no_decay_names:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def learning_rate(epoch: float, args) -> float:
    """Linear warmup for ``warmup_epochs``, then half-cycle cosine to ``min_lr`` (official)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    span = max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - args.warmup_epochs) / span))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, init_method: str = "env://") -> Dist:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); one process alone
    when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    info = Dist(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method=init_method,
                                world_size=world, rank=info.rank)
    return info


def parse_device(name: str | None) -> torch.device:
    """``--device``: cpu or cuda[:N]; None means cuda when available, else cpu."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available (use --device cpu)")
    return dev


def resolve_device(name: str | None, dist_info: Dist) -> torch.device:
    """The device of this process (under torchrun on CUDA: the GPU of its local rank)."""
    dev = parse_device(name)
    if dev.type == "cuda" and dist_info.enabled:
        dev = torch.device("cuda", dist_info.local_rank)
    return dev


def _all_reduce_mean(x: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.enabled:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= dist_info.world_size
    return x


# ---------------------------------------------------------------------------- logging
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


@dataclass
class Meters:
    """Running sums for one epoch's log line (official MetricLogger global averages)."""
    loss_sum: float = 0.0
    loss_count: int = 0
    lr_sum: float = 0.0
    lr_count: int = 0
    skipped: int = 0

    def state(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Result:
    """What :func:`pretrain` returns."""
    model: torch.nn.Module
    steps: int
    seconds: float
    images_per_sec: float
    final_loss: float | None
    checkpoint: str | None
    picture: str | None
    losses: list = field(default_factory=list)  # per-epoch mean losses of this run


# ---------------------------------------------------------------------------- checkpoints
def _save(path, *, model, optimizer, scaler, args, epoch, epoch_iter, step, meters, nonfinite, dataset_len,
          position_settings):
    ckpt_io.save_atomic({
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
        "model": model.state_dict(), "model_config": ckpt_io.model_config(model),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch, "epoch_iter": epoch_iter, "step": step, "meters": meters.state(),
        "nonfinite": nonfinite, "dataset_len": dataset_len, "position_settings": position_settings,
        "args": ckpt_io.plain_args(args), "rng": ckpt_io.rng_states(),
    }, path)


def _position_settings(args, world_size: int) -> dict:
    """What fixes a mid-epoch position: ``epoch_iter`` counts batches of ``--batch_size``, steps
    end every ``--accum_iter`` batches, and the epoch's order comes from ``--seed`` and the
    process count."""
    return {"--batch_size": args.batch_size, "--accum_iter": args.accum_iter, "--seed": args.seed,
            "process count": world_size}


def _check_resume(ckpt, path, model, optimizer, dataset_len, settings):
    """Everything that must match before anything is loaded (no partial loads)."""
    want, have = ckpt_io.model_config(model), ckpt["model_config"]
    diff = [f"{k}: checkpoint {have.get(k)!r} vs this run {want[k]!r}" for k in want if have.get(k) != want[k]]
    if diff:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path!r} was trained with a different model ({'; '.join(diff)}); pass the "
            f"same --model/--input_size/--norm_pix_loss, or a new --output_dir to start afresh")
    ckpt_io.check_state_dict(model, ckpt["model"], path)
    groups = ckpt["optimizer"].get("param_groups", [])
    sizes = [len(g["params"]) for g in groups]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != own:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path!r}: optimizer parameter groups of sizes {sizes} do not match this "
            f"model's {own}")
    if not ckpt["epoch_iter"]:
        return  # at an epoch's start any batch size, seed or process count can go on
    stored = ckpt.get("position_settings")
    if stored is None:  # written before they were stored: from its arguments and global batch
        a = ckpt.get("args") or {}
        per_process = (a.get("batch_size") or 0) * (a.get("accum_iter") or 0)
        stored = {"--batch_size": a.get("batch_size"), "--accum_iter": a.get("accum_iter"), "--seed": a.get("seed"),
                  "process count": (ckpt.get("global_batch") or 0) // per_process if per_process else None}
    stored = dict(stored, samples=ckpt.get("dataset_len"))
    diff = [f"{k}: checkpoint {stored.get(k)!r} vs this run {v!r}"
            for k, v in dict(settings, samples=dataset_len).items() if stored.get(k) != v]
    if diff:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path!r} stopped mid-epoch (batch {ckpt['epoch_iter']} of epoch {ckpt['epoch']}) "
            f"with other settings ({'; '.join(diff)}): resuming there needs the same data, --batch_size, "
            f"--accum_iter, --seed and process count, or the batches of that epoch would be skipped or "
            f"seen twice")


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
    if dist_info.enabled:
        import torch.distributed as dist

        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if found is not None:
        raise ValueError(
            f"--output_dir {args.output_dir!r} holds an earlier run's checkpoint ({found}), which this "
            f"run would replace: pass --resume auto to continue that run, a new --output_dir to start "
            f"afresh beside it, or --overwrite to replace it")


# ---------------------------------------------------------------------------- the loop
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


def pretrain(args, dataset=None, on_step=None) -> Result:
    """Run pre-training as described by ``args`` (the ``fastmae pretrain`` namespace).

    ``dataset``: a dataset of ``(PIL image, label)`` used instead of ``--data_path``.
    ``on_step(step)``: called after each optimizer step (tests use it to interrupt a run).
    """
    from torch.utils.data import DataLoader

    if getattr(args, "dist_on_itp", False):
        raise ValueError("--dist_on_itp (the official code's launch on Microsoft ITP clusters) is not supported: "
                         "launch with torchrun --nproc_per_node=N -m fastmae pretrain ...")
    dist_info = init_distributed(parse_device(args.device).type, getattr(args, "dist_url", "env://"))
    device = resolve_device(args.device, dist_info)
    main = dist_info.is_main
    say = print if main else (lambda *a, **k: None)

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
    compile_mode = _compile_mode(args.compile)
    _check_output_dir(args, dist_info)
    if args.precision is None:  # the official code trains with fp16 autocast on CUDA
        args.precision = "fp16" if device.type == "cuda" else "fp32"
    if args.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    seed = args.seed + dist_info.rank  # as the official code; DDP broadcasts rank 0's weights
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = make_model(args.model, args.input_size, args.norm_pix_loss, args.attn_backend).to(device)
    num_kept(model.patch_embed.num_patches, args.mask_ratio)  # a clear error now, not at the first step
    model_without_ddp = model
    global_batch = args.batch_size * args.accum_iter * dist_info.world_size
    if args.lr is None:
        args.lr = args.blr * global_batch / 256
    # fused=True: one kernel for all parameters (on CPU ~10x faster than the per-parameter loop)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                  fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    amp_dtype = PRECISIONS[args.precision]

    base = dataset if dataset is not None else data.build_dataset(args.data_path)
    num_patches = model.patch_embed.num_patches
    train_set = data.SeededSamples(base, data.train_transform(args.input_size), num_patches, args.seed)
    sampler = data.EpochSampler(train_set, dist_info.world_size, dist_info.rank, seed=args.seed)
    iters_per_epoch = sampler.num_samples // args.batch_size
    steps_per_epoch = iters_per_epoch // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(
            f"the dataset has {len(train_set)} samples ({sampler.num_samples} per process): fewer than "
            f"one optimizer step of --batch_size {args.batch_size} x --accum_iter {args.accum_iter}")
    used_iters = steps_per_epoch * args.accum_iter

    # ---- resume
    settings = _position_settings(args, dist_info.world_size)
    start_epoch, epoch_iter, step, nonfinite = args.start_epoch, 0, 0, 0
    meters = Meters()
    resume = args.resume
    if resume == "auto":
        resume = ckpt_io.latest(args.output_dir) if args.output_dir else None
        if resume is None:
            say(f"--resume auto: no checkpoint in {args.output_dir!r}, starting from scratch")
    if resume:
        ckpt = ckpt_io.load(resume, map_location="cpu")
        _check_resume(ckpt, resume, model, optimizer, len(train_set), settings)
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, epoch_iter, step = ckpt["epoch"], ckpt["epoch_iter"], ckpt["step"]
        nonfinite = ckpt.get("nonfinite", 0)
        if epoch_iter:
            meters = Meters(**ckpt["meters"])
        if dist_info.rank == 0:
            ckpt_io.set_rng_states(ckpt["rng"])
        say(f"resumed from {resume}: epoch {start_epoch}, batch {epoch_iter} of {used_iters}, step {step}")
        del ckpt

    ddp_model = model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    run_model = torch.compile(ddp_model, mode=compile_mode) if args.compile else ddp_model

    loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=getattr(args, "pin_mem", True) and device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG untouched
    )
    writer = _tensorboard(args.log_dir) if main else None
    log_path = os.path.join(args.output_dir, "log.txt") if args.output_dir else None
    if main and args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        for tmp in ckpt_io.remove_stale_temporaries(args.output_dir):
            say(f"removed {tmp}, left by an interrupted save")
        if getattr(args, "overwrite", False) and not _continues_in_output_dir(args, resume):
            outputs = [os.path.join(args.output_dir, name) for name in ("log.txt", "reconstruction.png")]
            for old in ckpt_io.run_checkpoints(args.output_dir) + [f for f in outputs if os.path.isfile(f)]:
                os.remove(old)
                say(f"--overwrite: removed {old}, of an earlier run")
    last_path = os.path.join(args.output_dir, ckpt_io.LAST) if args.output_dir else None

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model {args.model} at {args.input_size}px ({n_params / 1e6:.2f}M trainable parameters, "
        f"norm_pix_loss={args.norm_pix_loss}, mask_ratio={args.mask_ratio})")
    say(f"data: {base!r}" if dataset is not None or args.data_path is None
        else f"data: {args.data_path} ({len(base)} images)")
    compiled = (f", compiled ({compile_mode})" if compile_mode else ", compiled") if args.compile else ""
    say(f"device {device} x {dist_info.world_size} process(es), precision {args.precision}{compiled}; "
        f"batch {args.batch_size} x accum {args.accum_iter} x {dist_info.world_size} = {global_batch}; "
        f"lr {args.lr:.3g} (blr {args.blr:.3g}); {steps_per_epoch} steps/epoch for {args.epochs} epochs")

    def save(path, epoch, it):
        """Write the checkpoint, unless the weights are no longer finite: a good checkpoint is
        never replaced by a poisoned one. Returns whether it was written."""
        if not _finite_weights(model_without_ddp):
            say(f"not saving {path}: the weights hold non-finite values; the last good checkpoint is "
                f"{saved or resume or 'not written yet'}")
            return False
        _save(path, model=model_without_ddp, optimizer=optimizer, scaler=scaler, args=args, epoch=epoch,
              epoch_iter=it, step=step, meters=meters, nonfinite=nonfinite, dataset_len=len(train_set),
              position_settings=settings)
        return True

    use_bar = main and sys.stderr.isatty()
    t_start = time.time()
    images_seen, last_loss, saved, epoch_losses = 0, None, None, []
    stop = args.max_steps is not None and step >= args.max_steps
    model.train(True)
    bar = None
    try:
        for epoch in range(start_epoch, args.epochs):
            if stop:
                break
            sampler.set_epoch(epoch, start=epoch_iter * args.batch_size)
            it = epoch_iter
            group_bad = False
            bar = None
            if use_bar:
                from tqdm import tqdm
                bar = tqdm(total=used_iters, initial=it, desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch",
                           dynamic_ncols=True, leave=True)
            t_epoch, imgs_epoch = time.time(), 0
            optimizer.zero_grad(set_to_none=True)
            for imgs, noise in loader:
                if it >= used_iters:
                    break
                if it % args.accum_iter == 0:
                    lr = learning_rate(it / iters_per_epoch + epoch, args)
                    set_lr(optimizer, lr)
                imgs = imgs.to(device, non_blocking=True)
                noise = noise.to(device, non_blocking=True)
                sync = (it + 1) % args.accum_iter == 0
                no_sync = ddp_model.no_sync() if (dist_info.enabled and not sync) else contextlib.nullcontext()
                with no_sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        loss, _, _ = run_model(imgs, mask_ratio=args.mask_ratio, noise=noise)
                    loss_value = _all_reduce_mean(loss.detach().float(), dist_info).item()
                    if math.isfinite(loss_value):
                        scaled = loss / args.accum_iter
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                        meters.loss_sum += loss_value
                        meters.loss_count += 1
                        last_loss = loss_value
                    else:
                        group_bad = True
                meters.lr_sum += lr
                meters.lr_count += 1
                it += 1
                images_seen += imgs.shape[0] * dist_info.world_size
                imgs_epoch += imgs.shape[0] * dist_info.world_size
                if not sync:
                    continue
                # ---- optimizer step (or skip it)
                if not group_bad and _optimizer_step(model, optimizer, scaler, args.clip_grad):
                    nonfinite = 0
                else:
                    nonfinite += 1
                    meters.skipped += 1
                    what = f"non-finite loss ({loss_value})" if group_bad else "non-finite gradients"
                    say(f"step {step}: {what}, step skipped ({nonfinite} in a row, limit {args.max_nonfinite})")
                    if nonfinite >= args.max_nonfinite:
                        raise NonFiniteLossError(
                            f"the loss or its gradients were non-finite for {nonfinite} consecutive steps (epoch "
                            f"{epoch}, step {step}); stopping. Lower --lr/--blr, set --clip-grad, or use --precision "
                            f"fp32/bf16; the last good checkpoint is {saved or resume or 'not written yet'}")
                optimizer.zero_grad(set_to_none=True)
                group_bad = False
                step += 1
                if writer is not None and last_loss is not None:
                    epoch_1000x = int((it / iters_per_epoch + epoch) * 1000)
                    writer.add_scalar("train_loss", last_loss, epoch_1000x)
                    writer.add_scalar("lr", lr, epoch_1000x)
                rate = imgs_epoch / max(time.time() - t_epoch, 1e-9)
                shown = "nan" if last_loss is None else f"{last_loss:.4f}"
                if bar is not None:
                    bar.update(args.accum_iter)
                    bar.set_postfix(loss=shown, lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                elif main and (step % PRINT_FREQ == 0):
                    print(f"epoch {epoch + 1}/{args.epochs} [{it}/{used_iters}] step {step} "
                          f"loss {shown} lr {lr:.3e} {rate:.1f} img/s", flush=True)
                if (main and last_path and args.save_every and step % args.save_every == 0
                        and save(last_path, epoch, it)):
                    saved = last_path
                if on_step is not None:
                    on_step(step)
                if args.max_steps is not None and step >= args.max_steps:
                    stop = True
                    break
            if bar is not None:
                bar.close()
            epoch_iter = 0
            if stop and it < used_iters:  # stopped mid-epoch: save the exact position
                if main and last_path and save(last_path, epoch, it):
                    saved = last_path
                break
            # ---- end of epoch: log line and checkpoints
            loss_avg = meters.loss_sum / meters.loss_count if meters.loss_count else float("nan")
            lr_avg = meters.lr_sum / meters.lr_count if meters.lr_count else float("nan")
            epoch_losses.append(loss_avg)
            seconds = time.time() - t_epoch
            if main:
                stats = {"train_lr": lr_avg, "train_loss": loss_avg, "epoch": epoch, "step": step,
                         "skipped_steps": meters.skipped, "images_per_sec": round(imgs_epoch / max(seconds, 1e-9), 2),
                         "time": round(seconds, 3)}
                if log_path:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(stats) + "\n")
                print(f"epoch {epoch + 1}/{args.epochs}  loss {loss_avg:.4f}  lr {lr_avg:.3e}  "
                      f"{stats['images_per_sec']:.1f} img/s  ({_fmt_time(seconds)})", flush=True)
            meters = Meters()
            if main and last_path and save(last_path, epoch + 1, 0):
                saved = last_path
                if epoch % 20 == 0 or epoch + 1 == args.epochs:  # the official archive schedule
                    ckpt_io.copy_atomic(last_path, os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"))
    finally:  # also when the run stops on an error: the bar's line ends, logged scalars reach disk
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.flush()
            writer.close()

    seconds = time.time() - t_start
    picture = None
    if main and args.output_dir and getattr(args, "picture", True):
        from . import visualize

        picture = os.path.join(args.output_dir, "reconstruction.png")
        visualize.save_grid(model_without_ddp, visualize.embedded_images(), picture,
                            mask_ratio=args.mask_ratio, seed=args.seed, device=device,
                            title=f"{args.model}, step {step}")
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
    result = Result(model=model_without_ddp, steps=step, seconds=seconds,
                    images_per_sec=images_seen / max(seconds, 1e-9), final_loss=last_loss,
                    checkpoint=saved, picture=picture, losses=epoch_losses)
    if main:
        final = "none" if last_loss is None else f"{last_loss:.4f}"
        if epoch_losses:
            final += f" (last epoch mean {epoch_losses[-1]:.4f}, first {epoch_losses[0]:.4f})"
        print(f"done: {step} steps in {_fmt_time(seconds)} ({result.images_per_sec:.1f} images/s), "
              f"final loss {final}")
        if saved:
            print(f"checkpoint: {saved}")
        if log_path:
            print(f"log: {log_path}")
        if picture:
            print(f"reconstructions: {picture}")
    return result
