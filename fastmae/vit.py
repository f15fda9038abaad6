"""The fine-tuning ViT: a drop-in for the official ``models_vit`` of facebookresearch/mae.

``VisionTransformer`` takes the official constructor arguments (those of timm 0.3.2's ViT plus
``global_pool``) and has the official state_dict keys, so the released fine-tuned checkpoints load
with ``strict=True``:

- ``global_pool=True``: the mean of the patch tokens, then ``fc_norm`` (there is no final ``norm``);
- ``global_pool=False``: the final ``norm``, then the cls token;
- logits = ``head(forward_features(x))``.

It is built on the fast model's blocks (``fastmae.model.Block``: the attention backends, the MLP
that recomputes its GELU in backward) with stochastic depth, optional gradient checkpointing, and
``set_trainable_blocks(k)`` for partial fine-tuning and linear probing: the frozen part runs in
eval mode under ``no_grad`` (no activations kept). ``reference_impl=True`` builds the same model
on the plain reference blocks: the twin the tests compare with.

``param_groups_lrd`` and ``interpolate_pos_embed`` are the official helpers
(``util/lr_decay.py``, ``util/pos_embed.py``) with their names and results.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from ._checks import check_architecture, check_grid, check_images, to_2tuple
from .model import Block, run_blocks
from .ops.attention import set_attn_backend
from .pos_embed import get_2d_sincos_pos_embed


class VisionTransformer(nn.Module):
    """Vision Transformer for classification with the official MAE fine-tuning semantics.

    Official arguments: ``img_size`` (int or ``(H, W)``), ``patch_size``, ``in_chans``,
    ``num_classes`` (0: no head, ``forward`` returns the features), ``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``drop_path_rate`` (stochastic depth, rising
    linearly over the blocks), ``norm_layer`` (default ``LayerNorm(eps=1e-6)``), ``global_pool``.
    ``qk_scale``, ``representation_size``, ``drop_rate``, ``attn_drop_rate`` and ``hybrid_backbone``
    exist for the signature; MAE uses none of them, and values other than their defaults are refused.

    fastmae options: ``attn_backend`` (``auto``, ``sdpa``, ``xformers``, ``math``),
    ``grad_checkpointing`` (recompute each trained block's activations in backward),
    ``reference_impl`` (plain reference blocks).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, qk_scale=None, representation_size=None,
                 drop_rate=0., attn_drop_rate=0., drop_path_rate=0., hybrid_backbone=None, norm_layer=None,
                 global_pool=False, attn_backend="auto", grad_checkpointing=False, reference_impl=False):
        super().__init__()
        unsupported = {k: v for k, v in dict(qk_scale=qk_scale, representation_size=representation_size,
                                             hybrid_backbone=hybrid_backbone).items() if v is not None}
        unsupported.update({k: v for k, v in dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate).items() if v})
        if unsupported:
            raise ValueError(f"VisionTransformer does not support {unsupported} (MAE fine-tuning uses the "
                             f"defaults; regularise with drop_path_rate)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        h, w = check_grid(to_2tuple(img_size, "img_size"), patch_size)
        check_architecture(in_chans, mlp_ratio, h * w)
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, bool(global_pool)
        self.num_features = self.embed_dim = embed_dim

        self.patch_embed = reference.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))  # learned in fine-tuning
        # stochastic depth rises with depth (on the CPU: the model may be built under torch.device("meta"))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block_cls = reference.Block if reference_impl else Block
        self.blocks = nn.ModuleList([
            block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer, drop_path=r)
            for r in rates])
        if self.global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.grad_checkpointing = grad_checkpointing
        self.frozen_blocks = 0  # blocks (and the embeddings) run frozen: see set_trainable_blocks
        self.frozen_norm = False
        self.attn_backend = "auto"
        if not reference_impl:
            self.set_attn_backend(attn_backend)
        self._init_weights()

    # ------------------------------------------------------------------ init (timm 0.3.2's)
    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        nn.init.trunc_normal_(self.cls_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_head(self, std: float = 2e-5) -> None:
        """The head as the official fine-tuning initialises it after loading a pre-trained
        encoder (``trunc_normal_(head.weight, std=2e-5)``; linear probing uses 0.01)."""
        linear = self.head_linear
        if linear is not None:
            nn.init.trunc_normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    @property
    def head_linear(self) -> nn.Linear | None:
        """The head's Linear (the last module of a linear probe's BatchNorm + Linear head)."""
        head = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
        return head if isinstance(head, nn.Linear) else None

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token"}

    # ------------------------------------------------------------------ configuration
    CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads",
                   "mlp_ratio", "qkv_bias", "global_pool", "layer_norm_eps", "head")

    def config(self) -> dict:
        """What rebuilds this model (stored in checkpoints as ``model_config``, ``kind="vit"``);
        ``head`` is ``linear``, or ``bn_linear`` for a linear probe's BatchNorm + Linear head."""
        blk = self.blocks[0]
        return dict(
            kind="vit", img_size=list(self.patch_embed.img_size), patch_size=self.patch_embed.patch_size[0],
            in_chans=self.in_chans, num_classes=self.num_classes, embed_dim=self.embed_dim, depth=len(self.blocks),
            num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / blk.mlp.fc1.in_features,
            qkv_bias=blk.attn.qkv.bias is not None, global_pool=self.global_pool,
            layer_norm_eps=float(self.final_norm.eps),
            head="bn_linear" if isinstance(self.head, nn.Sequential) else "linear")

    @classmethod
    def from_config(cls, config: dict, **kwargs) -> "VisionTransformer":
        missing = [k for k in cls.CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"model configuration lacks {', '.join(missing)}")
        cfg = {k: config[k] for k in cls.CONFIG_KEYS if k not in ("layer_norm_eps", "head")}
        cfg["img_size"] = tuple(cfg["img_size"]) if isinstance(cfg["img_size"], (list, tuple)) else cfg["img_size"]
        model = cls(**cfg, norm_layer=partial(nn.LayerNorm, eps=config["layer_norm_eps"]), **kwargs)
        if config["head"] == "bn_linear":
            model.use_probe_head()
        return model

    def use_probe_head(self) -> None:
        """The official linear probe's head: ``BatchNorm1d(affine=False, eps=1e-6)`` before the
        Linear (keys ``head.0.*``, ``head.1.*``), the Linear initialised with std 0.01."""
        if isinstance(self.head, nn.Sequential):
            return
        if not isinstance(self.head, nn.Linear):
            raise ValueError("a linear probe needs num_classes > 0")
        self.head = nn.Sequential(nn.BatchNorm1d(self.head.in_features, affine=False, eps=1e-6), self.head)
        self.init_head(std=0.01)

    # ------------------------------------------------------------------ options
    def set_attn_backend(self, backend: str) -> None:
        set_attn_backend(self, backend)

    def set_trainable_blocks(self, k: int, train_norm: bool = True) -> None:
        """Train only the last ``k`` blocks, the final norm (``fc_norm`` or ``norm``, unless
        ``train_norm=False``) and the head: partial fine-tuning (``k = depth``: everything; ``k =
        0`` with ``train_norm=False``: a linear probe). The frozen part has ``requires_grad``
        off, stays in eval mode and runs under ``no_grad``."""
        depth = len(self.blocks)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= depth:
            raise ValueError(f"the number of trainable blocks must be an integer in [0, {depth}] for this "
                             f"{depth}-block model, got {k!r}")
        self.frozen_blocks = depth - k
        self.frozen_norm = not train_norm
        frozen = self.frozen_modules()
        for m in (self.patch_embed, *self.blocks, self.final_norm):
            m.requires_grad_(m not in frozen)
        for p in (self.cls_token, self.pos_embed):
            p.requires_grad_(k == depth)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [self.patch_embed, *self.blocks[:self.frozen_blocks]] if self.frozen_blocks else []
        return frozen + [self.final_norm] if self.frozen_norm else frozen

    @property
    def final_norm(self) -> nn.Module:
        return self.fc_norm if self.global_pool else self.norm

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():  # a frozen part is a fixed function: no drop path, no dropout
            m.eval()
        return self

    # ------------------------------------------------------------------ forward
    def _embed(self, x):
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls_tokens, x), dim=1) + self.pos_embed

    def _run_blocks(self, x, blocks):
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)

    def _pool(self, x):
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward_features(self, x):
        """[N, C, H, W] images -> [N, embed_dim] features (before the head)."""
        check_images(x, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size[0])
        frozen = self.frozen_blocks
        with torch.no_grad() if frozen else contextlib.nullcontext():
            x = self._embed(x)
            x = self._run_blocks(x, self.blocks[:frozen])
        x = self._run_blocks(x, self.blocks[frozen:])
        # a frozen norm after trained blocks must still pass their gradient back: no_grad only
        # when nothing before it trains either
        with torch.no_grad() if self.frozen_norm and frozen == len(self.blocks) else contextlib.nullcontext():
            return self._pool(x)

    def forward_head(self, x):
        return self.head(x)

    def forward(self, x):
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------------------- factories
def _encoder_name(mae_name: str) -> str:
    return mae_name.replace("mae_", "", 1)


# The encoders of the MAE configurations (fastmae.reference): the official three, then the small ones.
VIT_CONFIGS = {
    _encoder_name(name): {k: cfg[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")}
    for name, cfg in {**reference.MODEL_CONFIGS, **reference.SMALL_CONFIGS}.items() if "_dec" not in name
}
OFFICIAL_VIT_NAMES = tuple(_encoder_name(n) for n in reference.MODEL_CONFIGS if "_dec" not in n)
VIT_NAMES = tuple(VIT_CONFIGS)


def vit_config(name: str) -> dict:
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VIT_NAMES)}")
    return dict(VIT_CONFIGS[name])


def _make_factory(name: str):
    def factory(**kwargs):
        cfg = dict(vit_config(name), qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        cfg.update(kwargs)
        return VisionTransformer(**cfg)
    factory.__name__ = factory.__qualname__ = name
    kind = "official" if name in OFFICIAL_VIT_NAMES else "small (not official)"
    factory.__doc__ = (f"fastmae.VisionTransformer with the {kind} {name} configuration (the encoder of "
                       f"mae_{name}); keyword arguments override it.")
    return factory


vit_base_patch16 = _make_factory("vit_base_patch16")
vit_large_patch16 = _make_factory("vit_large_patch16")
vit_huge_patch14 = _make_factory("vit_huge_patch14")


def create_vit(name: str, **kwargs) -> VisionTransformer:
    """A classifier by name: an official factory (``vit_base_patch16`` ...) or the encoder of a
    small MAE configuration (``vit_tiny_patch8`` for the demo's ``mae_vit_tiny_patch8``)."""
    vit_config(name)  # an unknown name is a ValueError listing the known ones
    return _make_factory(name)(**kwargs)


# ---------------------------------------------------------------------------- official helpers
def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """The layer a parameter belongs to for layer-wise lr decay (official): the embeddings are
    layer 0, block ``i`` is ``i + 1``, everything after the blocks is ``num_layers``."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model, weight_decay=0.05, no_weight_decay_list=(), layer_decay=.75):
    """Parameter groups for layer-wise lr decay (official ``util/lr_decay.py``): each group has
    ``lr_scale = layer_decay ** (num_layers - layer_id)`` and ``weight_decay`` (0 for 1-D
    parameters and those in ``no_weight_decay_list``). Frozen parameters are left out. The
    training loop multiplies its lr by each group's ``lr_scale``."""
    groups: dict[str, dict] = {}
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or n in no_weight_decay_list
        layer_id = get_layer_id_for_vit(n, num_layers)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"lr_scale": layer_scales[layer_id], "weight_decay": 0.0 if no_decay else weight_decay,
                           "params": []}
        groups[key]["params"].append(p)
    return list(groups.values())


def interpolate_pos_embed(model, checkpoint_model: dict, grid=None) -> None:
    """Resize ``checkpoint_model['pos_embed']`` in place to ``model``'s patch grid (official
    ``util/pos_embed.py``): the extra (cls) rows are kept, the grid is resized bicubically
    (``align_corners=False``). The checkpoint's grid is ``grid`` (``(h, w)``) when known, else
    taken as square, as the official code does; the model's may be any ``(h, w)``."""
    if "pos_embed" not in checkpoint_model:
        return
    src = checkpoint_model["pos_embed"]
    dim = src.shape[-1]
    num_patches = model.patch_embed.num_patches
    extra = model.pos_embed.shape[-2] - num_patches
    rows = src.shape[-2] - extra
    side = int(round(rows ** 0.5))
    orig = tuple(grid) if grid is not None else (side, side)
    if orig[0] * orig[1] != rows:
        raise ValueError(f"pos_embed of the checkpoint has {rows} patch rows, not a "
                         f"{'x'.join(map(str, orig)) if grid is not None else 'square'} grid")
    new = tuple(model.patch_embed.grid_size)
    if orig == new:
        return
    tokens = src[:, extra:].reshape(-1, *orig, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens.float(), size=new, mode="bicubic", align_corners=False).to(src.dtype)
    checkpoint_model["pos_embed"] = torch.cat((src[:, :extra], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def sincos_pos_embed_like(model) -> torch.Tensor:
    """The fixed 2-D sin-cos table (with its cls row) of ``model``'s grid, ``[1, 1 + L, D]``."""
    return get_2d_sincos_pos_embed(model.pos_embed.shape[-1], model.patch_embed.grid_size, cls_token=True)[None]
