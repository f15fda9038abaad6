"""MaskAlign: masked image modeling without reconstruction (Xue et al., CVPR 2023).

A drop-in for the student of the official OpenDriveLab/maskalign pre-training model
(``models_pretrain.MaskedAutoencoderViT``). There is no decoder and no pixel target: the student
(the MAE encoder) sees only the visible patches, a frozen teacher sees the whole image, and every
student block is aligned with a teacher layer at the visible positions.

The official computation, step by step (``reference_impl=True`` runs it as written):

1. masking (``mask_type``): ``random`` keeps the ``K = int(L * (1 - mask_ratio))`` patches of
   smallest noise, in ascending-noise order (``argsort(noise)[:, :K]``); ``attention`` draws
   ``torch.multinomial(importance, L, replacement=False)[:, :K]`` (kept in draw order) with
   ``importance`` the teacher's last-layer attention of the cls token to each patch, averaged over
   heads (``attention[:, :, 0, 1:].mean(1)``): well attended patches are likely *kept*.
2. the student: patch embedding plus the fixed sin-cos table, the kept tokens in ``ids_keep``
   order after the cls token, then each block's output (before the final ``norm``, which is unused:
   it is in the state_dict but gets no gradient) is one level, ``S = depth`` levels.
3. fusion (``fusion_type``): ``simple`` takes the levels as they are; ``linear`` and ``sum`` mix
   them with the learnable Dynamic Alignment matrix ``distill_weights``: level ``a`` becomes
   ``sum_b W[a, b] * level_b``. ``linear`` initialises ``W = eye(S) + 0.01`` (``[S, S]``),
   ``sum`` ``W = ones(T, S) / S`` (``[T, S]``).
4. heads (``head_type``, one per teacher layer, ``distill_heads.{i}``) map level ``i`` to the
   teacher's width: ``linear`` ``Linear(E, Dt)``; ``norm_linear`` ``[norm_layer(E), Linear]``;
   ``mlp`` ``[Linear(E, E), GELU, Linear(E, Dt)]``; ``mlp2`` ``[Linear(E, E), norm_layer(E),
   Linear(E, Dt)]`` (no activation).
5. targets: teacher layer ``i + 1`` (``hidden_states[0]``, the embeddings, is never a target),
   normalised (``target_norm``) over *all* its tokens, then its cls token followed by the tokens at
   ``ids_keep`` (the student's order). See :func:`align_loss_ref` for the exact formulas.
6. the loss: ``sum_i w_i * loss_i`` over the levels with ``w_i > 0`` (:func:`level_weights`).

The fast model (default) computes the same numbers: only the visible patches are embedded
(``gather_mask`` and the flattened conv weight), attention and MLP go through ``fastmae.ops``,
and only the levels with a non-zero weight get their head, mixture row and loss (the others
contribute nothing to the loss; their heads get no gradient, as officially). The per-level loss
is :func:`align_loss_ref` (plain torch, fp32), one function so a fused op can replace it.

The teacher is not part of the model (nor of its state_dict): ``forward`` takes its outputs
(:class:`TeacherOutput`, computed outside) or a :class:`Teacher` (run inside, on the same
images). :class:`Teacher` wraps a Hugging Face CLIP or ViT model, a fastmae checkpoint or a timm
ViT, frozen.
"""
from __future__ import annotations

import json
import os
import re
from functools import partial
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint, ops, reference
from ._checks import check_architecture, check_distinct, check_grid, check_images, check_index, check_noise, to_2tuple
from .data import IMAGENET_MEAN, IMAGENET_STD
from .model import Block as FastBlock
from .model import run_blocks
from .ops.attention import set_attn_backend
from .pos_embed import get_2d_sincos_pos_embed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the official normalize(): OpenAI CLIP's statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MASK_TYPES = ("random", "attention")
FUSION_TYPES = ("simple", "linear", "sum")
TARGET_NORMS = ("none", "l2", "whiten", "bn")
LOSS_TYPES = ("l2", "l1", "smoothl1")
HEAD_TYPES = ("linear", "norm_linear", "mlp", "mlp2")


class TeacherOutput(NamedTuple):
    """What the teacher returns for a batch: ``hidden_states``, ``depth + 1`` tensors
    ``[N, 1 + L, D]`` (the embeddings, then each layer's output, cls token first), and
    ``attention``, the last layer's attention probabilities ``[N, heads, 1 + L, 1 + L]`` (None when
    not computed: only attentive masking needs it)."""
    hidden_states: Sequence[torch.Tensor]
    attention: torch.Tensor | None = None


class MaskAlignOutput(NamedTuple):
    """``loss`` (scalar), ``ids_keep [N, K]`` (the kept patches, in the student's token order) and
    ``mask [N, L]`` (1 for removed patches, in patch order, as the MAE returns it)."""
    loss: torch.Tensor
    ids_keep: torch.Tensor
    mask: torch.Tensor


# ============================================================================ loss
def level_weights(loss_weights: str, n: int) -> list[float]:
    """The official weight of each of the ``n`` aligned levels (shallow first):

    - ``mean``: ``1/n`` each; ``out``: the last level only;
    - ``linear_decay``: ``i / sum(range(n))`` for level ``i`` (it *grows* with depth, the first is 0);
    - ``topK``: ``1/K`` on each of the last ``K`` levels; ``midK``: 1 on level ``K`` (0-based).

    Where the official code silently weighs wrong (``top9`` of 5 levels weighs the 5 by 1/9 each;
    ``mid7`` of 5 gives a zero loss), this is an error."""
    if loss_weights == "mean":
        return [1 / n] * n
    if loss_weights == "out":
        return [0.0] * (n - 1) + [1.0]
    if loss_weights == "linear_decay":
        if n < 2:
            raise ValueError("loss_weights='linear_decay' needs at least 2 levels (the first weighs 0)")
        return [i / sum(range(n)) for i in range(n)]
    m = re.fullmatch(r"(top|mid)(\d+)", str(loss_weights))
    if m is None:
        raise ValueError(f"unknown loss_weights {loss_weights!r}; choose mean, out, linear_decay, topK (the last K "
                         f"levels) or midK (level K alone, 0-based)")
    k = int(m.group(2))
    if m.group(1) == "top":
        if not 1 <= k <= n:
            raise ValueError(f"loss_weights={loss_weights!r} weighs the last {k} levels but the teacher has {n} "
                             f"layers to align: choose top1 ... top{n}")
        return [0.0] * (n - k) + [1 / k] * k
    if not 0 <= k < n:
        raise ValueError(f"loss_weights={loss_weights!r} weighs level {k} (0-based) but the teacher has {n} layers to "
                         f"align: choose mid0 ... mid{n - 1}")
    return [0.0] * k + [1.0] + [0.0] * (n - k - 1)


def align_loss_ref(pred: torch.Tensor, teacher_level: torch.Tensor, ids: torch.Tensor, target_norm: str = "none",
                   loss_type: str = "l2") -> torch.Tensor:
    """One level's loss (without its weight), the official ``get_teacher`` + ``forward_loss`` term.

    ``pred [N, K', D]`` (the student's head output), ``teacher_level [N, 1 + L, D]`` (one teacher
    layer, all tokens), ``ids [N, K']`` int64: the teacher token of each prediction (positions
    including the cls token: ``cat([0], 1 + ids_keep)``). With ``y = teacher_level`` (fp32, no
    gradient) the target is ``t[n, k] = norm(y)[n, ids[n, k]]``, ``norm`` being

    - ``none``: ``y``;
    - ``l2``: ``y / max(||y||_2, 1e-12)`` per token (``F.normalize``);
    - ``whiten``: ``(y - mean) / sqrt(var + 1e-5)`` per token, biased variance, no affine
      (``F.layer_norm``'s default eps);
    - ``bn``: ``(y - mean) / sqrt(var + 1e-6)`` with one mean and one *unbiased* variance over the
      whole tensor ``[N, 1 + L, D]`` (every token of every sample, kept or not);

    and the loss the mean over all ``N * K' * D`` elements of ``d = pred - t`` of ``d**2`` (``l2``),
    ``|d|`` (``l1``) or ``2 * smooth_l1(d, beta=1)`` (``smoothl1``: ``d**2`` where ``|d| < 1``,
    else ``2|d| - 1``). Computed in fp32 whatever ``pred``'s dtype (the official code under
    autocast computes ``l2`` of un-normalised targets in fp16, where CLIP's large features can
    overflow). The per-token norms are applied after the gather (same numbers, fewer tokens)."""
    y = teacher_level.detach().float()
    if target_norm == "bn":
        mean, var = y.mean(), y.var()
    t = y.gather(1, ids.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
    if target_norm == "l2":
        t = F.normalize(t, dim=-1)
    elif target_norm == "whiten":
        t = F.layer_norm(t, t.shape[-1:])
    elif target_norm == "bn":
        t = (t - mean) / (var + 1e-6) ** 0.5
    elif target_norm != "none":
        raise ValueError(f"unknown target_norm {target_norm!r}; choose one of {', '.join(TARGET_NORMS)}")
    p = pred.float()
    if loss_type == "l2":
        return ((p - t) ** 2).mean()
    if loss_type == "l1":
        return F.l1_loss(p, t)
    if loss_type == "smoothl1":
        return 2 * F.smooth_l1_loss(p, t, beta=1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


# ============================================================================ masking
def num_kept(num_patches: int, mask_ratio) -> int:
    """``K = int(L * (1 - mask_ratio))`` as officially; ``mask_ratio`` in ``[0, 1)`` (0 keeps every
    patch: a MaskAlign loss needs no removed patch) and at least one patch kept."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    k = int(num_patches * (1 - mask_ratio))
    if k < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of {num_patches} (int({num_patches} * (1 - "
                         f"{mask_ratio})) = 0): the student would see nothing; lower it")
    return k


def attention_importance(attention: torch.Tensor) -> torch.Tensor:
    """``[N, L]``: the cls token's attention to each patch in the teacher's last layer, averaged over
    heads (fp32), the official attentive masking's sampling weights."""
    return attention[:, :, 0, 1:].float().mean(1)


def draw_ids_keep(mask_type: str, num_patches: int, mask_ratio, batch: int, device, noise=None, attention=None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``ids_keep [N, K]`` as the official masking draws it (see the module doc): from ``noise [N, L]``
    (``torch.rand`` from ``generator`` when None) for ``random``; from the teacher's last-layer
    ``attention`` and ``torch.multinomial`` (``generator``) for ``attention``."""
    k = num_kept(num_patches, mask_ratio)
    if mask_type == "random":
        if noise is None:
            noise = torch.rand(batch, num_patches, device=device, generator=generator)
        noise = check_noise(noise, batch, num_patches, device)
        return torch.argsort(noise, dim=1)[:, :k]
    if noise is not None:
        raise ValueError("noise drives random masking; with mask_type='attention' pass ids_keep or a generator")
    if attention is None:
        raise ValueError("attentive masking needs the teacher's last-layer attention [N, heads, 1 + L, 1 + L], and the "
                         "teacher returned none (build the Teacher with attention=True, or use mask_type='random')")
    importance = attention_importance(attention)
    return torch.multinomial(importance, num_patches, replacement=False, generator=generator)[:, :k]


# ============================================================================ the student
def teacher_dims(teacher_model: str) -> tuple[int, int]:
    """(width, depth) of a teacher by its Hugging Face name, by the official rule: 768 and 12 for
    ``clip-vit-base-patch16`` and ``dino-vitb16``, else 1024 and 24."""
    if "clip-vit-base-patch16" in teacher_model or "dino-vitb16" in teacher_model:
        return 768, 12
    return 1024, 24


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


class MaskAlignViT(nn.Module):
    """The MaskAlign student (official ``models_pretrain.MaskedAutoencoderViT``), see the module doc.

    Official arguments: ``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``,
    ``num_heads``, ``drop_path_rate``, ``mlp_ratio``, ``norm_layer``, ``norm_pix_loss`` (accepted and
    unused, as officially), ``loss_weights``, ``mask_type``, ``fusion_type``, ``target_norm``,
    ``loss_type``, ``head_type``, ``teacher_model`` (a name: only its width and depth are taken, by
    the official rule, :func:`teacher_dims`; the model does not load it). ``teacher_dim`` and
    ``teacher_depth`` override that rule. State_dict keys are the official ones without the
    teacher (``distill_heads.{i}...``, ``distill_weights`` for ``linear`` and ``sum`` fusion).

    ``simple`` and ``linear`` fusion pair student block ``i`` with teacher layer ``i`` and need
    ``depth == teacher_depth`` (the official ``simple`` would silently align a shallower student
    with the teacher's first layers; ``linear`` fails); ``sum`` mixes any depth.

    fastmae options: ``reference_impl`` (the official computation, the tests' twin),
    ``attn_backend`` (``auto``, ``sdpa``, ``xformers``, ``math``), ``grad_checkpointing``.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 drop_path_rate=0., mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False, loss_weights="mean",
                 mask_type="random", fusion_type="simple", target_norm="none", loss_type="l2", head_type="linear",
                 teacher_model="openai/clip-vit-base-patch16", teacher_dim=None, teacher_depth=None,
                 reference_impl=False, attn_backend="auto", grad_checkpointing=False):
        super().__init__()
        self.mask_type = _choice("mask_type", mask_type, MASK_TYPES)
        self.fusion_type = _choice("fusion_type", fusion_type, FUSION_TYPES)
        self.target_norm = _choice("target_norm", target_norm, TARGET_NORMS)
        self.loss_type = _choice("loss_type", loss_type, LOSS_TYPES)
        self.head_type = _choice("head_type", head_type, HEAD_TYPES)
        dim_t, depth_t = teacher_dims(str(teacher_model))
        self.teacher_dim = dim_t if teacher_dim is None else teacher_dim
        self.teacher_depth = depth_t if teacher_depth is None else teacher_depth
        for name, v in (("depth", depth), ("teacher_dim", self.teacher_dim), ("teacher_depth", self.teacher_depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.weights = level_weights(loss_weights, self.teacher_depth)
        self.loss_weights = loss_weights
        if fusion_type != "sum" and depth != self.teacher_depth:
            raise ValueError(f"fusion_type={fusion_type!r} pairs student block i with teacher layer i, but the student "
                             f"has {depth} blocks and the teacher {self.teacher_depth} layers: use fusion_type='sum' "
                             f"(a learned [teacher_depth, depth] mixture) or a student of depth {self.teacher_depth}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        h, w = check_grid(to_2tuple(img_size, "img_size"), patch_size)
        check_architecture(in_chans, mlp_ratio, h * w)
        self.in_chans, self.norm_pix_loss, self.reference_impl = in_chans, norm_pix_loss, reference_impl

        self.patch_embed = reference.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block_cls = reference.Block if reference_impl else FastBlock
        self.blocks = nn.ModuleList([block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                                               drop_path=r) for r in rates])
        self.norm = norm_layer(embed_dim)  # official, unused by the loss
        self.distill_heads = nn.ModuleList([self._head(embed_dim, self.teacher_dim, norm_layer)
                                            for _ in range(self.teacher_depth)])
        if fusion_type == "linear":
            self.distill_weights = nn.Parameter(torch.eye(depth) + 0.01)
        elif fusion_type == "sum":
            self.distill_weights = nn.Parameter(torch.ones(self.teacher_depth, depth) / depth)
        self.grad_checkpointing = grad_checkpointing
        self.attn_backend = "auto"
        if not reference_impl:
            self.set_attn_backend(attn_backend)
        self.initialize_weights()

    def _head(self, dim, out, norm_layer):
        if self.head_type == "linear":
            return nn.Linear(dim, out)
        if self.head_type == "norm_linear":
            return nn.Sequential(norm_layer(dim), nn.Linear(dim, out))
        if self.head_type == "mlp":
            return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))
        return nn.Sequential(nn.Linear(dim, dim), norm_layer(dim), nn.Linear(dim, out))  # mlp2

    def initialize_weights(self):
        """The official init: the sin-cos table, xavier for the patch embedding (as a Linear) and every
        Linear, zero biases, unit LayerNorms, ``normal(std=.02)`` for the cls token."""
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.patch_embed.grid_size,
                                                          cls_token=True).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=.02)
        self.apply(reference.MaskedAutoencoderViT._init_weights)

    def no_weight_decay(self):
        """The official ``skip_list`` (besides biases and 1-D parameters)."""
        return {"distill_weights"}

    def set_attn_backend(self, backend: str) -> None:
        set_attn_backend(self, backend)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def active_levels(self) -> list[int]:
        """The teacher layers (0-based, ``hidden_states[i + 1]``) whose loss weight is not zero."""
        return [i for i, w in enumerate(self.weights) if w > 0]

    # ------------------------------------------------------------------ inputs
    def check_teacher(self, teacher: "Teacher") -> None:
        """A clear error when ``teacher`` cannot be aligned with this student (width, depth, patch grid)."""
        if (teacher.dim, teacher.depth) != (self.teacher_dim, self.teacher_depth):
            raise ValueError(f"the teacher is {teacher.dim} wide with {teacher.depth} layers but the student was built "
                             f"for {self.teacher_dim} and {self.teacher_depth}: pass teacher_dim={teacher.dim}, "
                             f"teacher_depth={teacher.depth} to the student")
        grid_s, size = self.patch_embed.grid_size, tuple(self.patch_embed.img_size)
        if not teacher.resizable and teacher.native_size != size:
            raise ValueError(f"the teacher was built for {teacher.native_size[0]}x{teacher.native_size[1]} images but "
                             f"the student sees {size[0]}x{size[1]}: build the student with img_size="
                             f"{teacher.native_size} (or use a teacher of the student's image size)")
        grid_t = teacher.grid(size)
        if grid_t != grid_s:
            p = teacher.patch_size
            fix = (f"pass image_size=({grid_s[0] * p}, {grid_s[1] * p}) to the Teacher (it resizes the input, as the "
                   f"official code runs CLIP-L/14 at 196 px) or " if teacher.resizable else "")
            raise ValueError(f"the teacher's patch grid {grid_t[0]}x{grid_t[1]} ({p}-px patches) does not align with "
                             f"the student's {grid_s[0]}x{grid_s[1]} ({self.patch_embed.patch_size[0]}-px patches of "
                             f"{self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} images): {fix}choose the "
                             f"student's img_size and patch_size so that both grids match token for token")

    def _teacher_output(self, teacher_out, imgs) -> TeacherOutput:
        if callable(teacher_out):  # a Teacher (or any function of the images) runs here
            if isinstance(teacher_out, Teacher):
                self.check_teacher(teacher_out)
            teacher_out = teacher_out(imgs)
        if hasattr(teacher_out, "hidden_states") and not isinstance(teacher_out, tuple):  # a Hugging Face output
            attn = getattr(teacher_out, "attentions", None)
            teacher_out = TeacherOutput(teacher_out.hidden_states, attn[-1] if attn else None)
        if not isinstance(teacher_out, (tuple, list)) or len(teacher_out) != 2:
            raise ValueError("teacher_out must be a TeacherOutput, a (hidden_states, last_attention) pair or a "
                             f"Teacher, got {type(teacher_out).__name__}")
        hidden, attn = teacher_out
        N, L, T, D = imgs.shape[0], self.num_patches, self.teacher_depth, self.teacher_dim
        if not isinstance(hidden, (tuple, list)) or len(hidden) != T + 1:
            got = f"{len(hidden)} tensors" if isinstance(hidden, (tuple, list)) else type(hidden).__name__
            raise ValueError(f"the teacher's hidden_states must be {T + 1} tensors (the embeddings, then each of its "
                             f"{T} layers), got {got}: build the student with teacher_depth = the teacher's layers")
        for i, hs in enumerate(hidden):
            if not isinstance(hs, torch.Tensor) or hs.dim() != 3 or hs.shape[0] != N or hs.shape[2] != D:
                shape = tuple(hs.shape) if isinstance(hs, torch.Tensor) else type(hs).__name__
                raise ValueError(f"teacher hidden_states[{i}] must be [N, 1 + L, D] = [{N}, {1 + L}, {D}], got {shape}")
            if hs.shape[1] != 1 + L:
                raise ValueError(f"the teacher gives {hs.shape[1] - 1} patch tokens (plus cls) but the student has "
                                 f"{L} patches ({self.patch_embed.grid_size[0]}x{self.patch_embed.grid_size[1]}): the "
                                 f"patch grids must match token for token (resize the teacher's input or change the "
                                 f"student's img_size / patch_size)")
        if attn is not None and (not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[0] != N
                                 or tuple(attn.shape[2:]) != (1 + L, 1 + L)):
            shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
            raise ValueError(f"the teacher's last attention must be [N, heads, 1 + L, 1 + L] = [{N}, heads, {1 + L}, "
                             f"{1 + L}], got {shape}")
        return TeacherOutput(tuple(hidden), attn)

    def _ids_keep(self, N, device, mask_ratio, noise, ids_keep, attention, generator) -> torch.Tensor:
        L = self.num_patches
        if ids_keep is None:
            return draw_ids_keep(self.mask_type, L, mask_ratio, N, device, noise, attention, generator)
        if noise is not None:
            raise ValueError("pass noise or ids_keep, not both")
        k = num_kept(L, mask_ratio)
        check_index(ids_keep, "ids_keep", N, k)
        if ids_keep.device != torch.device(device):
            raise ValueError(f"ids_keep is on {ids_keep.device} but the images are on {device}")
        check_distinct(ids_keep, L, "ids_keep")
        return ids_keep

    # ------------------------------------------------------------------ forward
    def forward(self, imgs, teacher_out, mask_ratio=0.75, noise=None, ids_keep=None,
                generator: torch.Generator | None = None) -> MaskAlignOutput:
        """One training step's loss.

        ``imgs [N, C, H, W]`` (ImageNet-normalised); ``teacher_out``: the teacher's outputs for the
        same images (a :class:`TeacherOutput`, a ``(hidden_states, last_attention)`` pair or a Hugging
        Face output with ``hidden_states`` and ``attentions``), or a :class:`Teacher` (or any callable
        returning one of those) to run on ``imgs`` here. Masking: ``ids_keep [N, K]`` given (``K =
        int(L * (1 - mask_ratio))``, distinct patches, in the order the student takes them), else
        ``noise [N, L]`` (random masking, keep the smallest), else drawn from ``generator``.
        """
        check_images(imgs, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size[0])
        hidden, attn = self._teacher_output(teacher_out, imgs)
        N, L = imgs.shape[0], self.num_patches
        ids_keep = self._ids_keep(N, imgs.device, mask_ratio, noise, ids_keep, attn, generator)
        ckpt = self.grad_checkpointing and self.training
        if self.reference_impl:
            loss = self.forward_reference(imgs, hidden, ids_keep, ckpt)
        else:
            loss = self.forward_fast(imgs, hidden, ids_keep, ckpt)
        mask = torch.ones(N, L, device=imgs.device).scatter_(1, ids_keep, 0.0)
        return MaskAlignOutput(loss, ids_keep, mask)

    def _levels(self, x, ckpt) -> list[torch.Tensor]:
        out = []
        for blk in self.blocks:
            x = run_blocks((blk,), x, ckpt)
            out.append(x)
        return out

    def forward_reference(self, imgs, hidden, ids_keep, grad_checkpointing=False):
        """The official ``forward_encoder``, ``get_student``, ``get_teacher`` and ``forward_loss``."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        student = self._levels(torch.cat((cls, x), dim=1), grad_checkpointing)
        if self.fusion_type != "simple":
            mixed = torch.einsum("ab,bcde->acde", self.distill_weights, torch.stack(student))
            student = list(mixed.unbind(0))
        student = [self.distill_heads[i](x) for i, x in enumerate(student)]
        teacher = []
        for y in hidden[1:]:
            y = y.detach()
            if self.target_norm == "l2":
                y = F.normalize(y, dim=-1)
            elif self.target_norm == "whiten":
                y = F.layer_norm(y, (y.shape[-1],))
            elif self.target_norm == "bn":
                y = (y - y.mean()) / (y.var() + 1.e-6) ** .5
            kept = torch.gather(y[:, 1:], 1, ids_keep.unsqueeze(-1).repeat(1, 1, y.shape[-1]))
            teacher.append(torch.cat([y[:, :1], kept], dim=1))
        loss = torch.tensor(0., device=imgs.device)
        for w, x, y in zip(self.weights, student, teacher):
            if w > 0:
                if self.loss_type == "l2":
                    loss = loss + w * ((y - x) ** 2).mean()
                elif self.loss_type == "smoothl1":
                    loss = loss + w * 2 * F.smooth_l1_loss(y, x)
                else:
                    loss = loss + w * F.l1_loss(y, x)
        return loss

    def forward_fast(self, imgs, hidden, ids_keep, grad_checkpointing=False):
        N, K = ids_keep.shape
        proj = self.patch_embed.proj
        if K < self.num_patches:  # embed only the visible patches: the conv is a linear map per patch
            x = F.linear(ops.gather_mask(imgs, ids_keep, proj.kernel_size[0]), proj.weight.flatten(1), proj.bias)
        else:  # mask_ratio 0: every patch, in ids_keep order
            x = torch.gather(self.patch_embed(imgs), 1, ids_keep.unsqueeze(-1).expand(-1, -1, proj.out_channels))
        x = x + self.pos_embed[0, 1:][ids_keep]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(N, -1, -1)
        student = self._levels(torch.cat((cls.to(x.dtype), x), dim=1), grad_checkpointing)
        active = self.active_levels
        if self.fusion_type == "simple":
            student = [student[i] for i in active]
        else:  # only the mixture rows of weighted levels
            rows = self.distill_weights[active]
            student = list(torch.einsum("ab,bcde->acde", rows, torch.stack(student)).unbind(0))
        ids = torch.cat((ids_keep.new_zeros(N, 1), ids_keep + 1), dim=1)  # teacher positions, cls first
        loss = torch.zeros((), device=imgs.device)
        for i, x in zip(active, student):
            loss = loss + self.weights[i] * align_loss_ref(self.distill_heads[i](x), hidden[i + 1], ids,
                                                           self.target_norm, self.loss_type)
        return loss

    # ------------------------------------------------------------------ configuration
    CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                   "loss_weights", "mask_type", "fusion_type", "target_norm", "loss_type", "head_type",
                   "teacher_dim", "teacher_depth", "layer_norm_eps")

    def config(self) -> dict:
        """The constructor arguments as plain values (``kind="maskalign"``), for checkpoints."""
        blk = self.blocks[0]
        return dict(kind="maskalign", img_size=list(self.patch_embed.img_size),
                    patch_size=self.patch_embed.patch_size[0], in_chans=self.in_chans,
                    embed_dim=self.cls_token.shape[-1], depth=len(self.blocks), num_heads=blk.attn.num_heads,
                    mlp_ratio=blk.mlp.fc1.out_features / blk.mlp.fc1.in_features, loss_weights=self.loss_weights,
                    mask_type=self.mask_type, fusion_type=self.fusion_type, target_norm=self.target_norm,
                    loss_type=self.loss_type, head_type=self.head_type, teacher_dim=self.teacher_dim,
                    teacher_depth=self.teacher_depth, layer_norm_eps=float(self.norm.eps))

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "MaskAlignViT":
        missing = [k for k in cls.CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"MaskAlign configuration lacks {', '.join(missing)}")
        cfg = {k: config[k] for k in cls.CONFIG_KEYS if k != "layer_norm_eps"}
        cfg["img_size"] = tuple(cfg["img_size"]) if isinstance(cfg["img_size"], (list, tuple)) else cfg["img_size"]
        return cls(**cfg, norm_layer=partial(nn.LayerNorm, eps=config["layer_norm_eps"]), **kwargs)


checkpoint.register_kind("maskalign", MaskAlignViT, MaskAlignViT.from_config)  # fastmae checkpoints hold students

TEACHER_PREFIXES = ("clip_model.", "dino_model.")  # the official model holds its teacher as a submodule


def student_state_dict(state_dict: dict) -> dict:
    """An official MaskAlign state_dict without its teacher (``clip_model.*``, ``dino_model.*``; DDP's
    ``module.`` prefix removed): what :class:`MaskAlignViT` loads with ``strict=True``."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return {k: v for k, v in state.items() if not k.startswith(TEACHER_PREFIXES)}


# The official factories (models_pretrain.mae_vit_{base,large}_patch16), under MaskAlign names.
MASKALIGN_CONFIGS = {
    "maskalign_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    "maskalign_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
}


def create_maskalign(name: str, reference_impl: bool = False, **kwargs) -> MaskAlignViT:
    """A student by name (official configurations, ``LayerNorm(eps=1e-6)``); ``kwargs`` override it.
    A ViT-L student with a 12-layer teacher needs ``fusion_type='sum'``."""
    if name not in MASKALIGN_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MASKALIGN_CONFIGS)}")
    cfg = dict(MASKALIGN_CONFIGS[name], norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(kwargs)
    return MaskAlignViT(**cfg, reference_impl=reference_impl)


# ============================================================================ the teacher
def _attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) ``[N, heads, S, S]`` of a fastmae attention module on its input ``x``
    (the block's ``norm1`` output), from the module's own ``qkv`` weights."""
    B, S, D = x.shape
    q, k, _ = attn.qkv(x).reshape(B, S, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    return ((q @ k.transpose(-2, -1)) * attn.scale).float().softmax(dim=-1)


class Teacher(nn.Module):
    """A frozen teacher (``requires_grad_(False)``, always in eval mode, run under ``no_grad``):
    ``teacher(imgs) -> TeacherOutput`` from the wrapped model's own outputs.

    ``model``: a Hugging Face ``CLIPVisionModel`` or ``ViTModel`` (``hidden_states`` and
    ``attentions`` of its forward; attention outputs need ``attn_implementation="eager"``), a fastmae
    MAE or :class:`fastmae.VisionTransformer` (its embedding and blocks run one by one; the last
    block's attention probabilities are computed from that block's ``qkv`` weights, since the fast
    attention never forms them), or a timm ``VisionTransformer`` (``forward_intermediates``; the
    last block's attention is read from its ``attn_drop`` input with the fused kernel turned off
    for that block, when the block has one). :meth:`from_pretrained` loads one from a path.

    The images come ImageNet-normalised (``input_mean``, ``input_std``); a CLIP teacher gets them
    re-normalised with CLIP's statistics (``(x * std + mean - clip_mean) / clip_std``), as the
    official code does; DINO/ViT and fastmae teachers get them as they are. ``image_size`` (Hugging
    Face teachers): resize the input bicubically first (the position table is interpolated), as the
    official code runs CLIP-L/14 at 196 px. ``attention=False`` skips the attention (random masking
    needs none; Hugging Face teachers then keep their faster attention).
    """

    def __init__(self, model: nn.Module, attention: bool = True, image_size=None, mean=None, std=None,
                 input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD):
        super().__init__()
        self.model, self.attention = model, attention
        self.kind = self._kind(model)
        if self.kind == "hf":
            cfg = model.config
            self.dim, self.depth, self.patch_size = cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size
            self.native_size = to_2tuple(cfg.image_size, "image_size")
            clip = cfg.model_type.startswith("clip")
            mean, std = mean or (CLIP_MEAN if clip else None), std or (CLIP_STD if clip else None)
            if attention and getattr(cfg, "_attn_implementation", "eager") != "eager":
                raise ValueError("a Hugging Face teacher returns attentions only with attn_implementation='eager': "
                                 "load it with that, or pass attention=False (random masking)")
        elif self.kind == "fastmae":
            self.dim, self.depth = model.cls_token.shape[-1], len(model.blocks)
            self.patch_size = model.patch_embed.patch_size[0]
            self.native_size = tuple(model.patch_embed.img_size)
        else:  # timm
            if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "cls_token", None) is None:
                raise ValueError("a timm teacher must have exactly one prefix token, the cls token (no registers or "
                                 "distillation token): the student aligns cls first, then the patches")
            self.dim, self.depth = model.embed_dim, len(model.blocks)
            self.patch_size = model.patch_embed.patch_size[0]
            self.native_size = tuple(model.patch_embed.img_size)
            last = model.blocks[-1].attn
            if attention and not (hasattr(last, "fused_attn") and isinstance(getattr(last, "attn_drop", None),
                                                                             nn.Module)):
                raise ValueError("this timm model's last attention cannot be read (no attn_drop/fused_attn): pass "
                                 "attention=False and use mask_type='random'")
        self.image_size = None if image_size is None else to_2tuple(image_size, "image_size")
        if self.image_size is not None and self.kind != "hf":
            raise ValueError("image_size (resizing the teacher's input) is supported for Hugging Face teachers only")
        self.renorm = None
        if mean is not None:
            self.renorm = tuple(torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                for v in (input_mean, input_std, mean, std))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _kind(model) -> str:
        if hasattr(model, "config") and getattr(model.config, "model_type", None) is not None:
            if model.config.model_type not in ("clip_vision_model", "clip", "vit"):
                raise ValueError(f"Hugging Face {model.config.model_type!r} teachers are not supported: use a "
                                 f"CLIPVisionModel or a ViTModel")
            return "hf"
        from .vit import VisionTransformer

        if isinstance(model, (reference.MaskedAutoencoderViT, VisionTransformer)):
            return "fastmae"
        if hasattr(model, "forward_intermediates") and hasattr(model, "blocks"):
            return "timm"
        raise ValueError(f"{type(model).__name__} is not a supported teacher: a Hugging Face CLIPVisionModel or "
                         f"ViTModel, a fastmae MAE or VisionTransformer, or a timm VisionTransformer")

    @property
    def resizable(self) -> bool:
        return self.kind == "hf"

    def grid(self, img_size) -> tuple[int, int]:
        """The teacher's patch grid for student images of ``img_size`` (H, W)."""
        H, W = self.image_size or tuple(img_size)
        return H // self.patch_size, W // self.patch_size

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: no dropout, no drop path

    @classmethod
    def from_pretrained(cls, path: str, attention: bool = True, **kwargs) -> "Teacher":
        """Load a teacher from a local path: a Hugging Face CLIP (``CLIPModel`` or ``CLIPVisionModel``)
        or ViT (``ViTModel``, e.g. DINO) folder, a timm model folder (``config.json`` with an
        ``architecture``), or a fastmae checkpoint (anything :func:`fastmae.pretrained.load_model`
        reads: a fastmae pre-training or fine-tuning file, an official MAE checkpoint, a Hugging
        Face ViTMAE folder). ``kwargs`` go to the constructor (``image_size``, ``mean``, ``std``)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"teacher path {path!r} does not exist")
        cfg_path = os.path.join(path, "config.json")
        cfg = {}
        if os.path.isdir(path) and os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"{cfg_path!r} cannot be read as JSON ({e}): {path!r} is not a teacher "
                                 f"model") from None
        model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        if model_type in ("clip", "clip_vision_model", "vit"):
            import transformers

            impl = dict(attn_implementation="eager") if attention else {}
            if model_type == "vit":
                model = transformers.ViTModel.from_pretrained(path, add_pooling_layer=False, **impl)
            else:
                model = transformers.CLIPVisionModel.from_pretrained(path, **impl)
        elif model_type not in (None, "vit_mae"):  # fastmae reads ViTMAE folders itself, below
            raise ValueError(f"{path!r} holds a Hugging Face {model_type!r} model; a teacher must be a CLIP or ViT "
                             f"model (model_type clip, clip_vision_model or vit)")
        elif isinstance(cfg, dict) and "architecture" in cfg:
            import timm

            model = timm.create_model(f"local-dir:{path}", pretrained=True)
        else:
            from .pretrained import load_model

            try:
                model, _ = load_model(path)
            except ValueError as e:
                raise ValueError(f"{path!r} is not a teacher model: expected a Hugging Face CLIP or ViT folder, a "
                                 f"timm model folder or a fastmae checkpoint ({e})") from None
            from .video import PretrainVisionTransformer

            if isinstance(model, PretrainVisionTransformer):
                raise ValueError(f"{path!r} holds a VideoMAE; a teacher must be an image model")
        return cls(model, attention=attention, **kwargs)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> TeacherOutput:
        x = imgs
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, self.image_size, mode="bicubic", align_corners=False)
        if self.renorm is not None:  # the official normalize(denormalize(x))
            in_mean, in_std, mean, std = (t.to(x.device, x.dtype) for t in self.renorm)
            x = (in_std * x + in_mean - mean) / std
        if self.kind == "hf":
            return self._forward_hf(x)
        if self.kind == "fastmae":
            return self._forward_fastmae(x)
        return self._forward_timm(x)

    def _forward_hf(self, x):
        interpolate = tuple(x.shape[-2:]) != self.native_size
        out = self.model(pixel_values=x, output_hidden_states=True, output_attentions=self.attention,
                         interpolate_pos_encoding=interpolate)
        attn = out.attentions[-1] if self.attention else None
        return TeacherOutput(tuple(out.hidden_states), attn)

    def _forward_fastmae(self, x):
        m = self.model
        if hasattr(m, "decoder_embed"):  # an MAE: every patch, no masking
            x = m.patch_embed(x) + m.pos_embed[:, 1:, :]
            cls = (m.cls_token + m.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
            x = torch.cat((cls.to(x.dtype), x), dim=1)
        else:
            x = m._embed(x)
        hidden, attn = [x], None
        for i, blk in enumerate(m.blocks):
            if self.attention and i == len(m.blocks) - 1:
                attn = _attention_probs(blk.attn, blk.norm1(x))
            x = blk(x)
            hidden.append(x)
        return TeacherOutput(tuple(hidden), attn)

    def _forward_timm(self, x):
        m, captured = self.model, {}
        hooks = [m.norm_pre.register_forward_hook(lambda mod, i, o: captured.__setitem__("embed", o))]
        last = m.blocks[-1].attn
        fused = getattr(last, "fused_attn", None)
        if self.attention:
            last.fused_attn = False  # the explicit path, whose probabilities pass through attn_drop
            hooks.append(last.attn_drop.register_forward_hook(lambda mod, i, o: captured.__setitem__("attn", i[0])))
        try:
            inter = m.forward_intermediates(x, indices=None, return_prefix_tokens=True, norm=False, output_fmt="NLC",
                                            intermediates_only=True)
        finally:
            for h in hooks:
                h.remove()
            if fused is not None:
                last.fused_attn = fused
        hidden = [captured["embed"]] + [torch.cat((prefix, tokens), dim=1) for tokens, prefix in inter]
        return TeacherOutput(tuple(hidden), captured.get("attn"))
