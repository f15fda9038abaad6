"""MAE pre-training with the official recipe (facebookresearch/mae ``main_pretrain.py``).

This module states the recipe (:class:`Pretraining`); :class:`fastmae.engine.Engine` runs it.
The recipe: AdamW with betas (0.9, 0.95), ``lr = blr * effective_batch / 256``, per-iteration
linear warmup then a half-cycle cosine (``util/lr_sched.py``), gradient accumulation, the
official augmentation, a ``DistributedSampler`` (also for one process, as the official code),
one ``log.txt`` line per epoch with ``train_lr``/``train_loss``/``epoch``, and at the end a
picture of reconstructions. Differences, each deliberate:

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

import math
import os

import torch

from . import checkpoint as ckpt_io
from . import data, loader, masking, reference, shards, visualize
from ._checks import num_kept
from .engine import Engine, Recipe, Result
from .engine import COMPILE_MODES, PRECISIONS, NonFiniteLossError  # noqa: F401 (the command's flags and error)
from .model import MODEL_NAMES, create_model


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


class Pretraining(Recipe):
    """``fastmae pretrain``: an MAE learns to reconstruct the masked patches of its images.

    ``dataset``: a dataset of ``(PIL image, label)`` used instead of ``--data_path``.
    """

    command = "pretrain"
    model_flags = "--model/--input_size/--norm_pix_loss"
    output_files = ("reconstruction.png",)

    mask_types = masking.IMAGE_MASK_TYPES  # what --mask_type may be for this objective

    def __init__(self, args, dataset=None):
        self.args, self.dataset = args, dataset
        if getattr(args, "mask_type", None) is None:
            args.mask_type = "random"
        if args.mask_type not in self.mask_types:
            raise ValueError(f"--mask_type {args.mask_type} is not available here; choose one of "
                             f"{', '.join(self.mask_types)}" + (" (attention needs a teacher: --objective maskalign)"
                                                                 if args.mask_type == "attention" else ""))
        spec = getattr(args, "mask_ratio_schedule", None)
        self.schedule = masking.MaskRatioSchedule.parse(spec) if spec else None
        if self.schedule is not None and args.mask_type in ("uniform", "block"):
            raise ValueError(f"--mask_ratio_schedule varies the ratio step by step; --mask_type {args.mask_type} "
                             f"fixes it (uniform masking keeps a quarter, block masks are drawn for --mask_ratio)")
        self.progress = 0.0  # training progress in [0, 1], for the schedule

    def build_model(self):
        a = self.args
        model = make_model(a.model, a.input_size, a.norm_pix_loss, a.attn_backend)
        self.check_masking(model.patch_embed.num_patches)
        return model

    def check_masking(self, num_patches: int) -> None:
        """A clear error now, not at the first step: every ratio the run uses keeps and masks a patch."""
        num_kept(num_patches, self.args.mask_ratio)
        if self.schedule is not None:
            self.schedule.check(num_patches)

    def masking(self, model):
        """What the data draws each sample's masking noise with (:func:`fastmae.masking.sample_noise`)."""
        grid = model.patch_embed.grid_size
        if self.args.mask_type in ("random", "attention"):
            return grid[0] * grid[1]
        return masking.ImageMasking(self.args.mask_type, tuple(grid), self.args.mask_ratio)

    def mask_ratio(self) -> float:
        """This step's mask ratio: ``--mask_ratio``, or the schedule's at the current progress."""
        return self.args.mask_ratio if self.schedule is None else self.schedule.ratio_at(self.progress)

    def model_config(self, model) -> dict:
        return ckpt_io.model_config(model)

    def optimizer(self, model):
        fused = next(model.parameters()).device.type in ("cpu", "cuda")  # one kernel for all parameters
        return torch.optim.AdamW(param_groups(model, self.args.weight_decay), lr=self.args.lr, betas=(0.9, 0.95),
                                 fused=fused)

    def _loader(self) -> str:
        name = getattr(self.args, "loader", "fast")
        if name not in loader.LOADERS:
            raise ValueError(f"--loader must be one of {', '.join(loader.LOADERS)}, got {name!r}")
        return name

    def train_set(self, model):
        """The images with the official augmentation, and each sample's masking noise: decoded
        images with their crop boxes and flips (``--loader fast``, cropped by the fused op), or
        the official PIL transform's output (``--loader pil``)."""
        a = self.args
        if self.dataset is None and a.data_path is not None and shards.is_shard_source(a.data_path):
            if self._loader() == "pil":
                raise ValueError("--loader pil reads image folders; WebDataset shards are read by --loader fast")
            return shards.ShardSamples(a.data_path, self.masking(model), a.seed, batch_size=a.batch_size)
        base = self.dataset if self.dataset is not None else data.build_dataset(self.args.data_path)
        if self._loader() == "pil":
            return data.SeededSamples(base, data.train_transform(self.args.input_size), self.masking(model),
                                      self.args.seed)
        return loader.DecodedSamples(base, self.masking(model), self.args.seed)

    def collate_fn(self, device):
        """``--loader fast``: the batch is cropped in the workers' collate on a CPU run, on the
        device after the transfer otherwise."""
        if self._loader() == "pil":
            return None
        return loader.Collate(self.args.input_size, crop_here=device.type == "cpu")

    def learning_rate(self, epoch: float) -> float:
        self.progress = min(1.0, max(0.0, epoch / self.args.epochs))  # called at each step's first batch
        return learning_rate(epoch, self.args)

    def images_and_noise(self, batch):
        """The batch's images (normalised, on the device) and masking noise."""
        if len(batch) == 6:  # packed uint8 images, boxes and flips: cropped here, on the device
            *packed, noise = batch
            return loader.crop(*packed, self.args.input_size), noise
        return batch

    def loss(self, model, batch):
        imgs, noise = self.images_and_noise(batch)
        loss, _, _ = model(imgs, mask_ratio=self.mask_ratio(), noise=noise)
        return loss

    def describe(self, model, train_set) -> list[str]:
        a = self.args
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base = getattr(train_set, "base", None)  # shards describe themselves
        if base is None or self.dataset is not None or a.data_path is None:
            where = repr(train_set if base is None else base)
        else:
            where = f"{a.data_path} ({len(base)} images)"
        return [f"model {a.model} at {a.input_size}px ({n_params / 1e6:.2f}M trainable parameters, "
                f"norm_pix_loss={a.norm_pix_loss}, {self.describe_masking()}, --loader {self._loader()})",
                f"data: {where}"]

    def describe_masking(self) -> str:
        a = self.args
        ratio = f"mask_ratio={a.mask_ratio}" if self.schedule is None else (
            f"mask ratio {self.schedule.start} -> {self.schedule.end} ({self.schedule.mode})")
        return f"{a.mask_type} masking, {ratio}"

    def finish(self, model, device, step: int) -> dict[str, str]:
        """The reconstruction picture of the embedded photographs (unless --no-picture)."""
        a = self.args
        if not (a.output_dir and getattr(a, "picture", True)):
            return {}
        path = os.path.join(a.output_dir, self.output_files[0])
        visualize.save_grid(model, visualize.embedded_images(), path, mask_ratio=a.mask_ratio, seed=a.seed,
                            device=device, title=f"{a.model}, step {step}", mask_type=a.mask_type)
        return {"reconstructions": path}


def pretrain(args, dataset=None, on_step=None) -> Result:
    """Run pre-training as described by ``args`` (the ``fastmae pretrain`` namespace).

    ``dataset``: a dataset of ``(PIL image, label)`` used instead of ``--data_path``.
    ``on_step(step)``: called after each optimizer step (tests use it to interrupt a run).
    """
    return Engine(args, Pretraining(args, dataset), on_step=on_step).run()
