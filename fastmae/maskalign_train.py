"""``fastmae pretrain --objective maskalign --teacher PATH``: MaskAlign pre-training on the shared engine.

A student ViT (the MAE encoder named by ``--model``, at ``--input_size``) sees the visible patches
only and aligns its adapted block outputs with a frozen teacher's layers (:mod:`fastmae.maskalign`).
The teacher is read from a local path (a Hugging Face CLIP or ViT folder, a timm folder, or a fastmae
checkpoint such as the demo's ``fastmae_demo/checkpoint-last.pth``), frozen, and run in ``eval()``
under ``no_grad`` in the training precision, on the images the student sees.

Defaults are the recipe the official README recommends, not ``main_pretrain.py``'s argparse
defaults (given in brackets): ``--mask_type attention`` [random], ``--mask_ratio 0.7`` [0.75],
``--target_norm whiten`` [none], ``--loss_type smoothl1`` [l2], ``--loss_weights top5`` [mean],
``--fusion_type linear`` [simple], ``--head_type linear``, ``--drop_path 0.1`` [0]. The data, the
schedule, AdamW (betas 0.9, 0.95; no decay on biases, norms, tokens and ``distill_weights``, the
official skip list) and the checkpoints are the MAE recipe's.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from . import masking, reference, train
from .engine import Engine, Result
from .maskalign import FUSION_TYPES, HEAD_TYPES, LOSS_TYPES, TARGET_NORMS, MaskAlignViT, Teacher

RECIPE = dict(mask_type="attention", mask_ratio=0.7, target_norm="whiten", loss_type="smoothl1", loss_weights="top5",
              fusion_type="linear", head_type="linear", drop_path=0.1)
CHOICES = dict(target_norm=TARGET_NORMS, loss_type=LOSS_TYPES, fusion_type=FUSION_TYPES,
               head_type=HEAD_TYPES)


def add_flags(p) -> None:
    """The MaskAlign flags of ``fastmae pretrain`` (OpenDriveLab/maskalign ``main_pretrain.py``'s names)."""
    g = p.add_argument_group("MaskAlign (--objective maskalign; official main_pretrain.py flags, defaults from its "
                             "README's recipe)")
    g.add_argument("--objective", choices=("mae", "maskalign"), default="mae",
                   help="mae: reconstruct the masked pixels (default); maskalign: align the visible tokens with a "
                        "frozen --teacher's features")
    g.add_argument("--teacher", "--teacher_model", dest="teacher", default=None, metavar="PATH",
                   help="the frozen teacher: a Hugging Face CLIP or ViT folder, a timm folder, or a fastmae "
                        "checkpoint (e.g. fastmae_demo/checkpoint-last.pth); nothing is downloaded")
    for name, help_text in (("target_norm", "normalisation of each teacher layer"),
                            ("loss_type", "the alignment loss"),
                            ("fusion_type", "how student blocks mix into each teacher level (sum for a student of "
                                            "another depth than the teacher)"),
                            ("head_type", "the adapter after each student block")):
        g.add_argument(f"--{name}", choices=CHOICES[name], default=None,
                       help=f"{help_text} (default {RECIPE[name]})")
    g.add_argument("--loss_weights", default=None, metavar="W",
                   help=f"weights of the teacher levels: mean, out, linear_decay, topK or midK (default "
                        f"{RECIPE['loss_weights']})")
    g.add_argument("--drop_path", type=float, default=None, help=f"stochastic depth rate (default "
                                                                 f"{RECIPE['drop_path']})")


class MaskAlignPretraining(train.Pretraining):
    """The MAE recipe's data, schedule and checkpoints with the MaskAlign student and its teacher."""

    model_flags = "--model/--input_size/--teacher/--fusion_type/--head_type/--loss_weights"
    output_files = ()
    mask_types = ("attention", *masking.IMAGE_MASK_TYPES)

    def __init__(self, args, dataset=None):
        for name, value in RECIPE.items():
            if getattr(args, name, None) is None:
                setattr(args, name, value)
        super().__init__(args, dataset)
        if not args.teacher:
            raise ValueError("--objective maskalign needs --teacher PATH (a Hugging Face CLIP or ViT folder, a timm "
                             "folder or a fastmae checkpoint such as fastmae_demo/checkpoint-last.pth)")
        if getattr(args, "norm_pix_loss", False):
            raise ValueError("--norm_pix_loss is MAE's pixel target; MaskAlign's targets are the teacher's features "
                             "(--target_norm)")
        self.teacher = None

    def build_model(self):
        a = self.args
        self.teacher = Teacher.from_pretrained(a.teacher, attention=a.mask_type == "attention")
        if a.model not in train.MODEL_NAMES:
            raise ValueError(f"unknown --model {a.model!r}; the student is an MAE encoder: "
                             f"{', '.join(train.MODEL_NAMES)}")
        cfg = reference.config_of(a.model)
        model = MaskAlignViT(img_size=a.input_size, patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                             depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
                             norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=a.drop_path,
                             loss_weights=a.loss_weights,  # uniform and block masks come as noise, as random's
                             mask_type="attention" if a.mask_type == "attention" else "random",
                             fusion_type=a.fusion_type,
                             target_norm=a.target_norm, loss_type=a.loss_type, head_type=a.head_type,
                             teacher_dim=self.teacher.dim, teacher_depth=self.teacher.depth,
                             attn_backend=a.attn_backend)
        model.check_teacher(self.teacher)  # patch grid and image size: a clear error before any step
        self.check_masking(model.num_patches)
        return model

    def model_config(self, model) -> dict:
        return model.config()

    def prepare(self, model) -> None:
        self.teacher.to(next(model.parameters()).device)

    def optimizer(self, model):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            plain = p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embed", "distill_weights")
            (no_decay if plain else decay).append(p)
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                  {"params": decay, "weight_decay": self.args.weight_decay}],
                                 lr=self.args.lr, betas=(0.9, 0.95), fused=fused)

    def loss(self, model, batch):
        imgs, noise = self.images_and_noise(batch)
        teacher_out = self.teacher(imgs)  # frozen, no_grad, under the step's autocast
        # attentive masks are drawn in the model from torch's generator, as the official code draws them
        # (its state is in the checkpoints, as drop path's is)
        attentive = self.args.mask_type == "attention"
        return model(imgs, teacher_out, self.mask_ratio(), noise=None if attentive else noise).loss

    def describe(self, model, train_set) -> list[str]:
        a = self.args
        lines = super().describe(model, train_set)
        t = self.teacher
        lines[0] = (f"MaskAlign student {a.model} at {a.input_size}px "
                    f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable), "
                    f"{self.describe_masking()}, target_norm {a.target_norm}, loss {a.loss_type} "
                    f"{a.loss_weights}, fusion {a.fusion_type}, heads {a.head_type}, drop_path {a.drop_path}")
        return [lines[0], f"teacher: {a.teacher} ({t.kind}, {t.dim} wide, {t.depth} layers; frozen)", *lines[1:]]

    def finish(self, model, device, step: int) -> dict[str, str]:
        return {}


def pretrain(args, dataset=None, on_step=None) -> Result:
    return Engine(args, MaskAlignPretraining(args, dataset), on_step=on_step).run()
