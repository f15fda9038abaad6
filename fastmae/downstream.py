"""What an encoder is worth: fine-tuning, partial fine-tuning, linear probing and k-NN.

- ``fastmae finetune``: the official ``main_finetune.py`` recipe (:class:`Classification`): AdamW
  with layer-wise lr decay (``param_groups_lrd``), per-iteration warmup then cosine, drop path,
  timm's RandAugment / RandomErasing / Mixup-CutMix with label smoothing, global pooling;
  ``--trainable-blocks K`` trains only the last K blocks, the final norm and the head (the MAE
  paper's partial fine-tuning), the rest frozen under ``no_grad``.
- ``fastmae linprobe``: the official ``main_linprobe.py`` recipe: the encoder frozen, in eval mode
  and under ``no_grad``; a ``BatchNorm1d(affine=False)`` + Linear head trained with LARS.
- ``fastmae knn``: k-NN classification of frozen features (:func:`knn`): cosine similarity, the
  k = 20 nearest training images vote with weights ``exp(sim / 0.07)`` (DINO, solo-learn).

The training loop is :class:`fastmae.engine.Engine`'s (checkpoints, resume, DDP, precision,
compile); after each epoch the validation set gives ``test_loss``, ``test_acc1``, ``test_acc5``
(the official ``log.txt`` keys) and the best epoch is kept as ``checkpoint-best.pth``.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from . import data, pretrained
from .distributed import all_reduce_sum, init_distributed, parse_device, resolve_device
from .engine import PRECISIONS, Engine, Recipe, Result
from .optim import LARS
from .train import learning_rate
from .vit import VIT_NAMES, VisionTransformer, param_groups_lrd, vit_config

DEFAULT_MODEL = "vit_large_patch16"  # the official scripts' --model default


# ---------------------------------------------------------------------------- the model
def num_classes_of(args, train_set) -> int:
    """The class count of the data; ``--nb_classes`` (if given) must agree with it."""
    found = len(train_set.classes)
    if args.nb_classes is not None and args.nb_classes != found:
        raise ValueError(f"--nb_classes {args.nb_classes} disagrees with the data, which has {found} classes "
                         f"({', '.join(map(str, train_set.classes[:5]))}{' ...' if found > 5 else ''}); leave "
                         f"--nb_classes out to take the data's")
    return found


def build_classifier(args, num_classes: int, probe: bool = False):
    """``(model, load report or None)``: the classifier ``--model`` names, or the one the
    ``--finetune`` checkpoint describes, at ``--input_size`` (default: the checkpoint's, else
    224), with the checkpoint's encoder loaded (:func:`fastmae.pretrained.load_encoder`)."""
    source = pretrained.read_source(args.finetune, "--finetune") if args.finetune else None
    found = pretrained.encoder_config(source) if source is not None else {}
    if args.model is not None:
        if args.model not in VIT_NAMES:
            raise ValueError(f"unknown --model {args.model!r}; choose one of {', '.join(VIT_NAMES)}")
        cfg = dict(vit_config(args.model), in_chans=found.get("in_chans", 3))
    elif source is not None:
        cfg = {k: v for k, v in found.items() if k != "img_size"}
        if cfg["num_heads"] is None:
            raise ValueError(
                f"{source.label}: cannot tell the number of attention heads of this {cfg['embed_dim']}-wide, "
                f"{cfg['depth']}-block encoder with {cfg['patch_size']}-px patches; pass --model (one of "
                f"{', '.join(VIT_NAMES)})")
    else:
        cfg = dict(vit_config(DEFAULT_MODEL), in_chans=3)
    size = args.input_size or found.get("img_size") or 224
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"the checkpoint's images were {size[0]}x{size[1]}; the downstream commands take square "
                             f"images: pass --input_size")
        size = size[0]
    try:
        model = VisionTransformer(img_size=size, num_classes=num_classes, qkv_bias=True,
                                  drop_path_rate=getattr(args, "drop_path", 0.0), global_pool=args.global_pool,
                                  attn_backend=args.attn_backend, **cfg)
    except ValueError as e:
        raise ValueError(f"cannot build the classifier at --input_size {size}: {e}") from None
    if probe:
        model.use_probe_head()
    report = pretrained.load_encoder(model, source) if source is not None else None
    return model, report


# ---------------------------------------------------------------------------- evaluation
def _loader(dataset, batch_size: int, num_workers: int, indices=None):
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       drop_last=False)


class Transformed(torch.utils.data.Dataset):
    """``(PIL image, label)`` -> ``(transform(image), label)``."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        return self.transform(img), label


@torch.no_grad()
def evaluate(model, dataset, device, amp_dtype=None, dist=None, batch_size: int = 64, num_workers: int = 0) -> dict:
    """``test_loss`` (cross-entropy, mean over images), ``test_acc1``, ``test_acc5`` (percent; top-5
    is top-k with k = min(5, classes)) of ``model`` on ``dataset`` (transformed
    ``(image, label)``). Under DDP each process takes every world-th image and the sums are reduced."""
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    indices = list(range(rank, len(dataset), world)) if world > 1 else None
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    for imgs, labels in _loader(dataset, batch_size, num_workers, indices):
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hit[:, 0].sum(), hit.any(1).sum(),
                             torch.tensor(float(len(labels)), device=device)]).double()
    if dist is not None:
        sums = all_reduce_sum(sums, dist)
    n = max(sums[3].item(), 1.0)
    return {"test_loss": sums[0].item() / n, "test_acc1": 100.0 * sums[1].item() / n,
            "test_acc5": 100.0 * sums[2].item() / n}


# ---------------------------------------------------------------------------- fine-tuning and probing
def _check_flags(args, probe: bool) -> None:
    """The downstream flags the engine does not check, each with an error naming it (timm would
    only assert, some of them at the first step)."""
    low, high = args.crop_scale
    problems = []
    if not 0 < low <= high <= 1:
        problems.append(f"--crop-scale needs 0 < LOW <= HIGH <= 1, got {low} {high}")
    if not 0 <= args.hflip <= 1:
        problems.append(f"--hflip must be a probability, got {args.hflip}")
    if not probe:
        if not 0 <= args.smoothing < 1:
            problems.append(f"--smoothing must be in [0, 1), got {args.smoothing}")
        if not 0 < args.layer_decay <= 1:
            problems.append(f"--layer_decay must be in (0, 1], got {args.layer_decay}")
        if not 0 <= args.drop_path < 1:
            problems.append(f"--drop_path must be in [0, 1), got {args.drop_path}")
        if not 0 < args.model_ema_decay < 1:
            problems.append(f"--model_ema_decay must be in (0, 1), got {args.model_ema_decay}")
        if args.cutmix_minmax is not None and (len(args.cutmix_minmax) != 2
                                               or not 0 < args.cutmix_minmax[0] <= args.cutmix_minmax[1] <= 1):
            problems.append(f"--cutmix_minmax takes two ratios 0 < MIN <= MAX <= 1, got {args.cutmix_minmax}")
        mixing = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
        if mixing and args.batch_size % 2:
            problems.append(f"--batch_size {args.batch_size} must be even with mixup/cutmix (or turn them off: "
                            f"--mixup 0 --cutmix 0)")
        if args.aa:
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(args.aa, {})
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                problems.append(f"--aa {args.aa!r} is not a RandAugment policy timm reads ({type(e).__name__}: {e}); "
                                f"e.g. rand-m9-mstd0.5-inc1, or '' for none")
        if args.remode not in ("pixel", "rand", "const"):
            problems.append(f"--remode must be pixel, rand or const, got {args.remode!r}")
    if problems:
        raise ValueError("; ".join(problems))



class Classification(Recipe):
    """``fastmae finetune`` (``probe=False``) and ``fastmae linprobe`` (``probe=True``).

    ``datasets``: ``(train, val)`` datasets of ``(PIL image, label)`` with a ``classes`` list, used
    instead of ``--data_path``.
    """

    model_flags = "--model/--finetune/--input_size/--global_pool"
    best_metric = "test_acc1"

    def __init__(self, args, probe: bool = False, datasets=None):
        self.args, self.probe = args, probe
        self.command = "linprobe" if probe else "finetune"
        _check_flags(args, probe)
        self.train_base, self.val_base = datasets if datasets is not None else data.labelled_folders(args.data_path)
        self.num_classes = num_classes_of(args, self.train_base)
        self.report = None
        self.mixup, self.criterion = self._mixup_and_criterion()
        self.val_set = None  # the validation images at the model's size, once it is built

    def _mixup_and_criterion(self):
        a = self.args
        if self.probe:
            return None, torch.nn.CrossEntropyLoss()
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None:
            mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, cutmix_minmax=a.cutmix_minmax,
                          prob=a.mixup_prob, switch_prob=a.mixup_switch_prob, mode=a.mixup_mode,
                          label_smoothing=a.smoothing, num_classes=self.num_classes)
            return mixup, SoftTargetCrossEntropy()
        if a.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(smoothing=a.smoothing)
        return None, torch.nn.CrossEntropyLoss()

    def build_model(self):
        a = self.args
        model, self.report = build_classifier(a, self.num_classes, probe=self.probe)
        if self.probe:
            model.set_trainable_blocks(0, train_norm=False)
        elif a.trainable_blocks is not None:
            try:
                model.set_trainable_blocks(a.trainable_blocks)
            except ValueError as e:
                raise ValueError(f"--trainable-blocks: {e}") from None
        model.grad_checkpointing = getattr(a, "grad_checkpointing", False)
        size = model.patch_embed.img_size
        a.input_size = size[0] if size[0] == size[1] else list(size)
        self.val_set = Transformed(self.val_base, data.classify_eval_transform(size[0]))
        return model

    def model_config(self, model) -> dict:
        return model.config()

    def optimizer(self, model):
        a = self.args
        if self.probe:
            return LARS(model.head.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        groups = param_groups_lrd(model, a.weight_decay, model.no_weight_decay(), a.layer_decay)
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=a.lr, fused=fused)

    # ---- the optional EMA of the weights (--model_ema): updated after every step, evaluated beside
    ema = None

    def prepare(self, model) -> None:
        if getattr(self.args, "model_ema", False):
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=self.args.model_ema_decay)
            self.ema.module.requires_grad_(False)

    def after_step(self, model) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def state_dict(self) -> dict:
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict, model) -> None:
        if self.ema is None:
            return
        if "ema" in state:
            self.ema.module.load_state_dict(state["ema"], strict=True)
        else:  # --model_ema added on resume: the average starts from the resumed weights
            self.ema.set(model)

    def train_set(self, model):
        a, size = self.args, model.patch_embed.img_size[0]
        if self.probe:
            transform = data.probe_train_transform(size, a.crop_scale, a.hflip)
        else:
            transform = data.classify_train_transform(size, a.aa, a.reprob, a.remode, a.recount, a.color_jitter,
                                                      a.crop_scale, a.hflip)
        return data.LabelledSamples(self.train_base, transform, a.seed)

    def learning_rate(self, epoch: float) -> float:
        return learning_rate(epoch, self.args)

    def loss(self, model, batch):
        imgs, targets = batch
        if self.mixup is not None:  # drawn from the step's seed (the engine's): exact on resume
            imgs, targets = self.mixup(imgs, targets)
        return self.criterion(model(imgs), targets)

    def evaluate(self, model, device, amp_dtype, dist) -> dict:
        a = self.args
        test = evaluate(model, self.val_set, device, amp_dtype, dist, batch_size=a.batch_size,
                        num_workers=min(a.num_workers, 4))
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_set, device, amp_dtype, dist, batch_size=a.batch_size,
                           num_workers=min(a.num_workers, 4))
            test.update({f"{k}_ema": v for k, v in ema.items()})
        return test

    def describe(self, model, train_set) -> list[str]:
        a = self.args
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        what = ("linear probe" if self.probe else
                f"partial fine-tuning of the last {a.trainable_blocks} blocks" if a.trainable_blocks is not None
                and a.trainable_blocks < len(model.blocks) else "fine-tuning")
        cfg = model.config()
        lines = [f"{what}: ViT {cfg['embed_dim']}-wide, {cfg['depth']} blocks, {cfg['patch_size']}-px patches at "
                 f"{a.input_size}px, {'global pool' if model.global_pool else 'cls token'}, {self.num_classes} "
                 f"classes ({trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters trained)"]
        lines += self.report.lines() if self.report else [f"--model {a.model or DEFAULT_MODEL}: random initialisation"]
        lines.append(f"data: train {_describe(self.train_base, a.data_path, 'train')}, val "
                     f"{_describe(self.val_base, a.data_path, 'val')}")
        return lines


def _describe(dataset, data_path, split) -> str:
    return repr(dataset) if data_path is None else f"{os.path.join(data_path, split)} ({len(dataset)} images)"


def _evaluate_only(args, recipe: Classification) -> Result:
    """``--eval``: the validation statistics of ``--resume CKPT`` (a checkpoint of this command)
    or of the ``--finetune`` encoder with its head, printed as the official scripts do."""
    dist = init_distributed(parse_device(args.device).type, getattr(args, "dist_url", "env://"))
    device = resolve_device(args.device, dist)
    if args.precision is None:
        args.precision = "fp16" if device.type == "cuda" else "fp32"
    torch.manual_seed(args.seed)
    if args.resume == "auto":
        args.resume = (ckpt_io.latest(args.output_dir) if args.output_dir else None) or ""
        if not args.resume:
            raise ValueError(f"--eval --resume auto: no checkpoint in --output_dir {args.output_dir!r}")
    if args.resume:  # the model the checkpoint describes, with its weights
        model, ckpt = pretrained.load_model(args.resume, attn_backend=args.attn_backend)
        if ckpt["model_config"].get("kind") != "vit" or model.num_classes != recipe.num_classes:
            raise ckpt_io.CheckpointError(
                f"--resume {args.resume!r} is not a classifier for these {recipe.num_classes} classes (a checkpoint "
                f"of fastmae finetune or linprobe on the same data)")
        recipe.val_set = Transformed(recipe.val_base, data.classify_eval_transform(model.patch_embed.img_size[0]))
    elif args.finetune:
        model = recipe.build_model()
    else:
        raise ValueError("--eval needs a model to evaluate: --resume CKPT (a checkpoint of this command) or "
                         "--finetune CKPT")
    model.to(device)
    test = evaluate(model, recipe.val_set, device, PRECISIONS[args.precision], dist, args.batch_size,
                    min(args.num_workers, 4))
    if dist.is_main:
        print(f"Accuracy of the network on the {len(recipe.val_set)} test images: {test['test_acc1']:.1f}% "
              f"(top-5 {test['test_acc5']:.1f}%, loss {test['test_loss']:.4f})")
    return Result(model=model, steps=0, seconds=0.0, images_per_sec=0.0, final_loss=None, checkpoint=None,
                  test=test)


def finetune(args, datasets=None, on_step=None) -> Result:
    """``fastmae finetune`` (``args``: its namespace; ``datasets``: ``(train, val)`` instead of
    ``--data_path``)."""
    recipe = Classification(args, probe=False, datasets=datasets)
    return _evaluate_only(args, recipe) if args.eval else Engine(args, recipe, on_step=on_step).run()


def linprobe(args, datasets=None, on_step=None) -> Result:
    """``fastmae linprobe``, as :func:`finetune`."""
    recipe = Classification(args, probe=True, datasets=datasets)
    return _evaluate_only(args, recipe) if args.eval else Engine(args, recipe, on_step=on_step).run()


# ---------------------------------------------------------------------------- k-NN
@torch.no_grad()
def extract_features(model, dataset, device, amp_dtype=None, batch_size: int = 128, num_workers: int = 0):
    """``(features [N, D] fp32, labels [N])`` of ``model.forward_features`` over ``dataset``, in
    eval mode under ``no_grad`` (an inference pass)."""
    model.eval()
    feats, labels = [], []
    for imgs, y in _loader(dataset, batch_size, num_workers):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            f = model.forward_features(imgs.to(device, non_blocking=True))
        feats.append(f.float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_classify(train_feats, train_labels, test_feats, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> torch.Tensor:
    """Class scores ``[M, num_classes]`` of the test features: the ``k`` most cosine-similar
    training features vote for their class with weight ``exp(similarity / temperature)``."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(train_feats))
    train = F.normalize(train_feats, dim=1)
    out = []
    for start in range(0, len(test_feats), chunk):
        sim = F.normalize(test_feats[start:start + chunk], dim=1) @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        out.append(votes.scatter_add_(1, train_labels[idx], (top / temperature).exp()))
    return torch.cat(out)


def knn(args, datasets=None) -> dict:
    """``fastmae knn``: features of the training and validation images (the evaluation transform,
    no augmentation), k-NN top-1 / top-5 on the validation set, one ``log.txt`` line."""
    if args.nb_knn < 1 or args.temperature <= 0:
        raise ValueError(f"--nb_knn must be at least 1 and --temperature > 0, got {args.nb_knn}, {args.temperature}")
    train_base, val_base = datasets if datasets is not None else data.labelled_folders(args.data_path)
    num_classes = num_classes_of(args, train_base)
    dist = init_distributed(parse_device(args.device).type, getattr(args, "dist_url", "env://"))
    device = resolve_device(args.device, dist)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(args.seed)
    model, report = build_classifier(args, num_classes)
    model.to(device)
    if dist.is_main:
        print("\n".join(report.lines()) if report else f"--model {args.model or DEFAULT_MODEL}: random initialisation")
    size = model.patch_embed.img_size[0]
    tf = data.classify_eval_transform(size)
    t0 = time.time()
    amp = PRECISIONS[precision]
    train_f, train_y = extract_features(model, Transformed(train_base, tf), device, amp, args.batch_size, args.num_workers)
    val_f, val_y = extract_features(model, Transformed(val_base, tf), device, amp, args.batch_size, args.num_workers)
    seconds = time.time() - t0
    scores = knn_classify(train_f, train_y, val_f, num_classes, args.nb_knn, args.temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == val_y[:, None]
    stats = {"test_acc1": 100.0 * hit[:, 0].float().mean().item(), "test_acc5": 100.0 * hit.any(1).float().mean().item(),
             "k": min(args.nb_knn, len(train_f)), "temperature": args.temperature, "epoch": 0,
             "images_per_sec": round((len(train_f) + len(val_f)) / max(seconds, 1e-9), 2)}
    if dist.is_main:
        print(f"k-NN (k={stats['k']}, T={args.temperature}) on {len(val_f)} images: top-1 {stats['test_acc1']:.2f}%  "
              f"top-5 {stats['test_acc5']:.2f}%  (features at {stats['images_per_sec']:.0f} images/s)")
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(stats) + "\n")
    return stats
