"""The reference MAE: plain PyTorch, written for clarity, with the official semantics.

This mirrors ``models_mae.py`` of facebookresearch/mae (constructor, state_dict keys,
initialisation, ``patchify``/``unpatchify``/``random_masking``/``forward_*``), generalised to
any channel count and to non-square images. It is what every fast path is tested against; it
embeds *all* patches and then gathers, exactly like the official code.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ._checks import check_architecture, check_grid, check_images, check_noise, num_kept, to_2tuple
from .pos_embed import get_2d_sincos_pos_embed


class PatchEmbed(nn.Module):
    """Image to patch embedding (a Conv2d with kernel = stride = patch size)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = (patch_size, patch_size)
        self.grid_size = check_grid(self.img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, L, D]


class Attention(nn.Module):
    """Multi-head self-attention, explicit softmax(QK^T / sqrt(d)) V."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, S, D = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, S, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): in training, zero a residual branch for
    a sample with probability ``p`` and scale the kept ones by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block with the timm/official parameter names; ``drop_path`` is the
    stochastic depth of both residual branches (fine-tuning; 0 in pre-training)."""

    attn_cls = Attention
    mlp_cls = Mlp

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm, drop_path=0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = self.attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = self.mlp_cls(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone (official semantics)."""

    block_cls = Block  # the fast model swaps in its own block; parameters and names are shared

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.in_chans = in_chans
        # --- encoder
        h, w = check_grid(to_2tuple(img_size, "img_size"), patch_size)
        check_architecture(in_chans, mlp_ratio, h * w)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            self.block_cls(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        # --- decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            self.block_cls(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ pixels <-> patches
    def patchify(self, imgs):
        """imgs [N, C, H, W] -> [N, L, p*p*C], each patch in (i, j, c) order."""
        p = self.patch_embed.patch_size[0]
        N, C, H, W = imgs.shape
        h, w = check_grid((H, W), p)
        x = imgs.reshape(N, C, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(N, h * w, p * p * C)

    def unpatchify(self, x):
        """[N, L, p*p*C] -> imgs [N, C, H, W] for the grid the model was built for."""
        p = self.patch_embed.patch_size[0]
        h, w = self.patch_embed.grid_size
        C = x.shape[-1] // (p * p)
        if x.shape[1] != h * w or x.shape[-1] != p * p * C:
            raise ValueError(f"expected patches [N, {h * w}, {p * p}*C], got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], h, w, p, p, C)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], C, h * p, w * p)

    # ------------------------------------------------------------------ masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Per-sample random masking by argsort of noise; returns (x_masked, mask, ids_restore)."""
        N, L, D = x.shape
        len_keep = num_kept(L, mask_ratio)
        noise = check_noise(noise, N, L, x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean over removed patches of the per-patch MSE (targets normalised per patch if asked)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.e-6)**.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        check_images(imgs, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size[0])
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


# The official factories: name -> constructor arguments (decoder 512-d, 8 blocks, 16 heads).
MODEL_CONFIGS = {
    name: dict(patch_size=p, embed_dim=d, depth=depth, num_heads=heads, decoder_embed_dim=512,
               decoder_depth=8, decoder_num_heads=16, mlp_ratio=4)
    for name, (p, d, depth, heads) in {
        "mae_vit_base_patch16_dec512d8b": (16, 768, 12, 12),
        "mae_vit_large_patch16_dec512d8b": (16, 1024, 24, 16),
        "mae_vit_huge_patch14_dec512d8b": (14, 1280, 32, 16),
    }.items()
}
for _name in list(MODEL_CONFIGS):  # the official short aliases
    MODEL_CONFIGS[_name.replace("_dec512d8b", "")] = MODEL_CONFIGS[_name]

# Small configurations of the same architecture (not official): the embedded demo's model and the
# tests'. create_model knows them by name like the official ones.
SMALL_CONFIGS = {
    "mae_vit_tiny_patch8": dict(patch_size=8, embed_dim=192, depth=6, num_heads=3,
                                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4),
    # the downstream default's: 32-px digits in 4-px patches
    "mae_vit_tiny_patch4": dict(patch_size=4, embed_dim=192, depth=6, num_heads=3,
                                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4),
    "mae_vit_micro_patch8": dict(patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4),
}


def config_of(name: str) -> dict:
    """The constructor arguments of a named configuration (official or small)."""
    return MODEL_CONFIGS.get(name) or SMALL_CONFIGS[name]


def make_factory(cls, name):
    """A factory ``name(**kwargs)`` building ``cls`` with the configuration of ``name`` (official,
    or one of :data:`SMALL_CONFIGS`); ``kwargs`` override it."""
    def factory(**kwargs):
        cfg = dict(config_of(name), norm_layer=partial(nn.LayerNorm, eps=1e-6))
        cfg.update(kwargs)
        return cls(**cfg)
    factory.__name__ = factory.__qualname__ = name
    kind = "official" if name in MODEL_CONFIGS else "small (not official)"
    factory.__doc__ = f"{cls.__module__}.{cls.__name__} with the {kind} {name} configuration."
    return factory


mae_vit_base_patch16_dec512d8b = make_factory(MaskedAutoencoderViT, "mae_vit_base_patch16_dec512d8b")
mae_vit_large_patch16_dec512d8b = make_factory(MaskedAutoencoderViT, "mae_vit_large_patch16_dec512d8b")
mae_vit_huge_patch14_dec512d8b = make_factory(MaskedAutoencoderViT, "mae_vit_huge_patch14_dec512d8b")
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
