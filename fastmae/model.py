"""The fast MAE: the official contract (constructor, state_dict, forward), built from fastmae.ops.

Differences from the reference, none of them visible in the numbers:
- only the K visible patches are patch-embedded (``gather_mask`` + a linear map, exact because a
  Conv2d with kernel = stride = p is a linear map per patch);
- the decoder input is built by ``unshuffle_scatter`` in one pass;
- the loss is ``norm_mse_loss``, fused, with its gradient in one pass;
- the MLP keeps its input and fc1's output for backward, not the GELU output (``gelu_mlp``);
- attention goes through ``fastmae.ops.attention`` (``auto``: xformers on CUDA when installed,
  else SDPA; on CPU the explicit math for bf16/fp16 at short sequences, where it is faster);
- under autocast the decoder's residual stream is promoted back to fp32 before
  ``unshuffle_scatter``, as the official cat with the fp32 mask token does.
Which backend runs each op is decided in ``fastmae.ops._backend``, never here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops, reference
from ._checks import check_noise, num_kept
from .ops.attention import set_attn_backend


class Attention(reference.Attention):
    attn_backend = "auto"

    def forward(self, x):
        B, S, D = x.shape
        qkv = self.qkv(x).reshape(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = ops.attention(q, k, v, backend=self.attn_backend)
        return self.proj(x.transpose(1, 2).reshape(B, S, D))


class Mlp(reference.Mlp):
    def forward(self, x):  # GELU recomputed in backward: its output is not kept (ops/mlp.py)
        fc1, fc2 = self.fc1, self.fc2
        return ops.gelu_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate=self.act.approximate)


class Block(reference.Block):
    attn_cls = Attention  # same parameters and names, fast forwards
    mlp_cls = Mlp


def run_blocks(blocks, x, grad_checkpointing: bool = False):
    """``x`` through ``blocks``; with ``grad_checkpointing`` (and gradients enabled) each block's
    activations are recomputed in backward instead of kept."""
    for blk in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


class MaskedAutoencoderViT(reference.MaskedAutoencoderViT):
    """Drop-in fast MAE. Extra keyword options:

    - ``attn_backend``: ``auto`` (default), ``sdpa``, ``xformers`` or ``math``;
    - ``grad_checkpointing``: recompute each block's activations in backward (less memory).
    """

    block_cls = Block

    def __init__(self, *args, attn_backend: str = "auto", grad_checkpointing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.grad_checkpointing = grad_checkpointing
        self.set_attn_backend(attn_backend)

    def set_attn_backend(self, backend: str) -> None:
        set_attn_backend(self, backend)

    def _run_blocks(self, blocks, x):
        return run_blocks(blocks, x, self.grad_checkpointing and self.training)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        N = imgs.shape[0]
        L = self.patch_embed.num_patches
        len_keep = num_kept(L, mask_ratio)
        noise = check_noise(noise, N, L, imgs.device)
        ids_keep, ids_restore, _, mask = ops.random_masking_ids(noise, len_keep)
        proj = self.patch_embed.proj
        x = ops.gather_mask(imgs, ids_keep, proj.kernel_size[0])  # [N, K, C*p*p]
        x = F.linear(x, proj.weight.flatten(1), proj.bias)
        x = x + self.pos_embed[0, 1:][ids_keep]
        cls_token = (self.cls_token + self.pos_embed[:, :1, :]).expand(N, -1, -1)
        x = torch.cat((cls_token.to(x.dtype), x), dim=1)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        # Under autocast decoder_embed returns bf16/fp16, and the official cat with the fp32
        # mask token and the fp32 position add promote the decoder's residual stream back to
        # fp32. unshuffle_scatter works in x's dtype, so promote first: same precision policy.
        x = x.to(torch.promote_types(x.dtype, self.mask_token.dtype))
        x = ops.unshuffle_scatter(x, self.mask_token, ids_restore, self.decoder_pos_embed)
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:, :])

    def forward_loss(self, imgs, pred, mask):
        if imgs.requires_grad and torch.is_grad_enabled():
            # a gradient for the images themselves is wanted, and the target depends on them:
            # norm_mse_loss treats the target as data, so take the reference loss (rare: saliency)
            return super().forward_loss(imgs, pred, mask)
        return ops.norm_mse_loss(pred, imgs, mask, self.patch_embed.patch_size[0],
                                 norm_pix_loss=self.norm_pix_loss)


# every name create_model knows: the official factories, then the small configurations
MODEL_NAMES = tuple(reference.MODEL_CONFIGS) + tuple(reference.SMALL_CONFIGS)
mae_vit_base_patch16_dec512d8b = reference.make_factory(MaskedAutoencoderViT, "mae_vit_base_patch16_dec512d8b")
mae_vit_large_patch16_dec512d8b = reference.make_factory(MaskedAutoencoderViT, "mae_vit_large_patch16_dec512d8b")
mae_vit_huge_patch14_dec512d8b = reference.make_factory(MaskedAutoencoderViT, "mae_vit_huge_patch14_dec512d8b")
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b


def create_model(name: str, reference_impl: bool = False, **kwargs):
    """Build an MAE by name: an official factory name (``mae_vit_base_patch16`` ...) or a small
    configuration (``mae_vit_tiny_patch8``, the demo's; ``mae_vit_micro_patch8``). ``kwargs``
    override the configuration (``img_size``, ``norm_pix_loss``, ...).

    ``reference_impl=True`` builds the plain reference model instead of the fast one.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    cls = reference.MaskedAutoencoderViT if reference_impl else MaskedAutoencoderViT
    return reference.make_factory(cls, name)(**kwargs)
