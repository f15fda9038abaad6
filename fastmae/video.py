"""VideoMAE: a drop-in for the official MCG-NJU/VideoMAE pre-training model, its loss and its masking.

``PretrainVisionTransformer`` takes the official constructor arguments (``modeling_pretrain.py``) plus
``num_frames`` (the official patch embedding assumes 16) and has the official state_dict keys
(``encoder.*``, ``encoder_to_decoder``, ``mask_token``, ``decoder.*``; attention with ``qkv.weight``,
``q_bias`` and ``v_bias`` and no k bias; the 1-D sinusoid tables are buffers outside the state_dict),
so official checkpoints load with ``strict=True``.

``forward(videos [B, C, T, H, W], bool_masked_pos [B, N]) -> [B, N_masked, decoder_num_classes]``:
the decoder's predictions for the masked tubelets (True = masked, tubelets in (t, h, w) order), in
token order, as the official code returns them. Every sample must mask the same number of tubelets.

``reference_impl=True`` runs the official computation as written (embed every tubelet, boolean
indexing, ``cat``). The fast model (default) computes the same numbers:

- only the visible tubelets are patch-embedded: a Conv3d with kernel = stride = (t, p, p) is a
  linear map per tubelet, so the visible tubelets are gathered straight from the clip and multiplied
  by the flattened weight;
- the visible and masked token indices come from one stable sort of the mask (no boolean indexing,
  no host sync when ``num_masked`` is given, so it traces under ``torch.compile(fullgraph=True)``);
- the decoder input (visible tokens, then mask tokens, plus their positions) is one ``cat`` and one add;
- attention goes through ``fastmae.ops.attention`` (``attn_backend``), the MLP through ``gelu_mlp``
  (GELU recomputed in backward); ``grad_checkpointing`` recomputes each block in backward.

Under autocast both follow the official precision policy: the encoder's residual stream is in the
autocast dtype (the official ``pos_embed.type_as(x)``), the decoder's is fp32 (the official
``cat`` with the fp32 mask token and positions).

``videomae_loss`` is the official training step's loss (``engine_for_pretraining``), fused
(``fastmae.ops.norm_mse_loss`` on clips); ``videomae_labels`` builds its targets for inspection.
``tube_mask``, ``random_mask`` and VideoMAE V2's ``running_cell_mask`` (``fastmae.masking``, re-exported
here) draw masks as the official generators do, from a ``torch.Generator``.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference
from ._checks import check_architecture, check_grid, to_2tuple
from .data import IMAGENET_MEAN, IMAGENET_STD
from .masking import random_mask, running_cell_mask, tube_mask  # noqa: F401  (video masking lives there)
from .model import Mlp as FastMlp
from .model import run_blocks
from .ops.attention import set_attn_backend


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """The official 1-D table ``[1, n_position, d_hid]``: angle ``pos / 10000^(2*(j//2)/d_hid)``,
    sin in the even channels, cos in the odd ones (computed in float64 like the numpy original)."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(d_hid)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).to(torch.float64) / d_hid)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float().unsqueeze(0)


# ============================================================================ modules
class PatchEmbed(nn.Module):
    """Clip to tubelet embedding: a Conv3d with kernel = stride = (tubelet_size, p, p)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, num_frames=16, tubelet_size=2):
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = (patch_size, patch_size)
        self.tubelet_size = tubelet_size
        self.num_frames = num_frames
        h, w = check_grid(self.img_size, patch_size)
        self.grid_size = (num_frames // tubelet_size, h, w)
        self.num_patches = self.grid_size[0] * h * w
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], tubelets in (t, h, w) order


class Attention(nn.Module):
    """The official VideoMAE attention: ``qkv`` without bias, separate ``q_bias`` and ``v_bias``
    (``qkv_bias=True``), a zero k bias, explicit softmax."""

    attn_backend = "auto"

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        """q, k, v ``[B, heads, S, head_dim]`` as the official code forms them."""
        B, S, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        return qkv.reshape(B, S, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv_heads(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, S, D))


class FastAttention(Attention):
    def forward(self, x):
        B, S, D = x.shape
        x = ops.attention(*self.qkv_heads(x), backend=self.attn_backend)
        return self.proj(x.transpose(1, 2).reshape(B, S, D))


class Block(reference.Block):
    """The official pre-norm block (``init_values=0``: no layer scale)."""
    attn_cls = Attention


class FastBlock(Block):
    attn_cls = FastAttention
    mlp_cls = FastMlp


def _blocks(block_cls, dim, depth, num_heads, mlp_ratio, qkv_bias, norm_layer, drop_path_rate):
    rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: may be built on meta
    return nn.ModuleList([block_cls(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                                    drop_path=r) for r in rates])


class PretrainVisionTransformerEncoder(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
                 qkv_bias, norm_layer, drop_path_rate, num_frames, tubelet_size, block_cls):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size)
        self.register_buffer("pos_embed", get_sinusoid_encoding_table(self.patch_embed.num_patches, embed_dim),
                             persistent=False)
        self.blocks = _blocks(block_cls, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_layer,
                              drop_path_rate)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, mask, grad_checkpointing=False):
        """The official encoder: embed every tubelet, add the table, keep the visible ones."""
        x = self.patch_embed(x)
        x = x + self.pos_embed.type_as(x)
        B, _, C = x.shape
        x = run_blocks(self.blocks, x[~mask].reshape(B, -1, C), grad_checkpointing)
        return self.head(self.norm(x))


class PretrainVisionTransformerDecoder(nn.Module):
    def __init__(self, num_classes, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_layer, drop_path_rate,
                 block_cls):
        super().__init__()
        self.blocks = _blocks(block_cls, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_layer,
                              drop_path_rate)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x, return_token_num, grad_checkpointing=False):
        x = run_blocks(self.blocks, x, grad_checkpointing)
        return self.head(self.norm(x[:, -return_token_num:] if return_token_num > 0 else x))


# ============================================================================ the model
class PretrainVisionTransformer(nn.Module):
    """VideoMAE pre-training model with the official semantics (see the module doc).

    Official arguments as in ``modeling_pretrain.py``; ``num_frames`` (default 16) is new.
    ``drop_rate``, ``attn_drop_rate``, ``qk_scale``, ``init_values`` and ``use_learnable_pos_emb``
    exist for the signature; pre-training uses their defaults, and other values are refused
    (``use_learnable_pos_emb=True`` fails in the official code as well: its table has a cls row
    but the encoder has no cls token). ``num_classes`` and ``in_chans`` are ignored, as officially.
    ``use_checkpoint`` is the official name of ``grad_checkpointing``.

    fastmae options: ``reference_impl`` (the official computation, the tests' twin), ``attn_backend``
    (``auto``, ``sdpa``, ``xformers``, ``math``), ``grad_checkpointing``.
    """

    def __init__(self, img_size=224, patch_size=16, encoder_in_chans=3, encoder_num_classes=0,
                 encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_num_classes=1536,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=8, mlp_ratio=4., qkv_bias=False,
                 qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_layer=nn.LayerNorm,
                 init_values=0., use_learnable_pos_emb=False, use_checkpoint=False, tubelet_size=2, num_classes=0,
                 in_chans=0, num_frames=16, reference_impl=False, attn_backend="auto", grad_checkpointing=False):
        super().__init__()
        unsupported = {k: v for k, v in dict(qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                             init_values=init_values,
                                             use_learnable_pos_emb=use_learnable_pos_emb).items() if v}
        if unsupported:
            raise ValueError(f"PretrainVisionTransformer does not support {unsupported} (VideoMAE pre-training "
                             f"uses the defaults; use_learnable_pos_emb=True fails in the official code too)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        for name, value in (("num_frames", num_frames), ("tubelet_size", tubelet_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not divisible by the tubelet size {tubelet_size}")
        h, w = check_grid(to_2tuple(img_size, "img_size"), patch_size)
        check_architecture(encoder_in_chans, mlp_ratio, num_frames // tubelet_size * h * w)
        self.reference_impl = reference_impl
        self.in_chans = encoder_in_chans
        block_cls = Block if reference_impl else FastBlock
        blocks = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer, drop_path_rate=drop_path_rate,
                      block_cls=block_cls)
        self.encoder = PretrainVisionTransformerEncoder(
            img_size, patch_size, encoder_in_chans, encoder_num_classes, encoder_embed_dim, encoder_depth,
            encoder_num_heads, num_frames=num_frames, tubelet_size=tubelet_size, **blocks)
        self.decoder = PretrainVisionTransformerDecoder(decoder_num_classes, decoder_embed_dim, decoder_depth,
                                                        decoder_num_heads, **blocks)
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("pos_embed", get_sinusoid_encoding_table(self.num_patches, decoder_embed_dim),
                             persistent=False)
        self.grad_checkpointing = grad_checkpointing or use_checkpoint
        self.set_attn_backend(attn_backend)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.mask_token, std=.02)

    @staticmethod
    def _init_weights(m):  # the official init: xavier Linear weights, zero biases, unit LayerNorms
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @property
    def num_patches(self) -> int:
        return self.encoder.patch_embed.num_patches

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "mask_token"}

    def set_attn_backend(self, backend: str) -> None:
        set_attn_backend(self, backend)

    # ------------------------------------------------------------------ forward
    def forward(self, x, mask, num_masked: int | None = None, *, decode_mask=None, num_decoded: int | None = None):
        """``x [B, C, T, H, W]``, ``mask [B, N]`` bool (True = masked) -> ``[B, N_masked, decoder_num_classes]``.

        ``num_masked`` (the masked count of every sample) is optional; without it the count is read
        from the mask (a host sync on CUDA, as the official boolean indexing is). Under
        ``torch.compile`` pass it, so the shapes are known when tracing.

        ``decode_mask [B, N]`` bool: VideoMAE V2's decoder masking (``forward(x, mask, decode_mask)``
        there; e.g. ``fastmae.masking.running_cell_mask``): True = the decoder drops the token. The
        decoder then gets mask tokens at the positions ``~decode_mask`` (visible ones included, as
        officially) and returns their ``[B, N_decoded, ...]`` predictions; ``num_decoded`` is that
        count, as ``num_masked`` is for the mask.
        """
        pe = self.encoder.patch_embed
        check_clip(x, self.in_chans, (pe.num_frames, *pe.img_size), pe.patch_size[0], pe.tubelet_size)
        num_masked = check_mask(mask, x.shape[0], self.num_patches, x.device, num_masked)
        if decode_mask is not None:
            num_decoded = self.num_patches - check_mask(decode_mask, x.shape[0], self.num_patches, x.device,
                                                        None if num_decoded is None else self.num_patches - num_decoded,
                                                        name="decode_mask")
        ckpt = self.grad_checkpointing and self.training
        if self.reference_impl:
            return self.forward_reference(x, mask, ckpt, decode_mask)
        return self.forward_fast(x, mask, num_masked, ckpt, decode_mask, num_decoded)

    def forward_reference(self, x, mask, grad_checkpointing=False, decode_mask=None):
        """The official ``PretrainVisionTransformer.forward`` (VideoMAE V2's with ``decode_mask``)."""
        decode_vis = mask if decode_mask is None else ~decode_mask
        x_vis = self.encoder_to_decoder(self.encoder(x, mask, grad_checkpointing))
        B, N, C = x_vis.shape
        expand_pos_embed = self.pos_embed.expand(B, -1, -1).type_as(x)
        pos_emd_vis = expand_pos_embed[~mask].reshape(B, -1, C)
        pos_emd_mask = expand_pos_embed[decode_vis].reshape(B, -1, C)
        x_full = torch.cat([x_vis + pos_emd_vis, self.mask_token + pos_emd_mask], dim=1)
        return self.decoder(x_full, pos_emd_mask.shape[1], grad_checkpointing)

    def forward_fast(self, x, mask, num_masked: int, grad_checkpointing=False, decode_mask=None,
                     num_decoded: int | None = None):
        B = x.shape[0]
        pe, enc = self.encoder.patch_embed, self.encoder
        num_visible = self.num_patches - num_masked
        order = token_order(mask)  # visible tubelets first, then masked ones, each in token order
        ids_vis = order[:, :num_visible]
        tubelets = gather_tubelets(x, ids_vis, pe.patch_size[0], pe.tubelet_size)  # [B, K, C*t*p*p]
        x = F.linear(tubelets, pe.proj.weight.flatten(1), pe.proj.bias)
        x = x + enc.pos_embed[0, ids_vis].type_as(x)
        x = run_blocks(enc.blocks, x, grad_checkpointing)
        x = self.encoder_to_decoder(enc.head(enc.norm(x)))
        if decode_mask is not None:  # mask tokens at the decoded positions, in token order
            order = torch.cat([ids_vis, token_order(decode_mask)[:, :num_decoded]], dim=1)
            num_masked = num_decoded
        # the decoder input: visible tokens, then mask tokens, plus the positions in that order
        x = torch.cat([x, self.mask_token.expand(B, num_masked, -1)], dim=1) + self.pos_embed[0, order]
        return self.decoder(x, num_masked, grad_checkpointing)


# ============================================================================ helpers
def token_order(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` int64: the visible tokens' indices, then the masked tokens', each ascending."""
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)


def gather_tubelets(videos: torch.Tensor, ids: torch.Tensor, patch_size: int, tubelet_size: int) -> torch.Tensor:
    """The tubelets ``ids [B, K]`` (token ``(t*h + i)*w + j``) of ``videos [B, C, T, H, W]`` as
    ``[B, K, C*tubelet_size*p*p]`` in Conv3d-weight order ``(c, dt, di, dj)``: one gather through a
    strided view of the clip (no copy of the whole clip)."""
    B, C, T, H, W = videos.shape
    p, ts = patch_size, tubelet_size
    nh, nw = H // p, W // p
    view = videos.reshape(B, C, T // ts, ts, nh, p, nw, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    b = torch.arange(B, device=ids.device)[:, None]
    t, hw = ids // (nh * nw), ids % (nh * nw)
    return view[b, t, hw // nw, hw % nw].reshape(B, ids.shape[1], C * ts * p * p)


# ============================================================================ the loss
def videomae_labels(videos, bool_masked_pos, patch_size: int, tubelet_size: int, normalize_target: bool = True,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, num_masked: int | None = None) -> torch.Tensor:
    """The official training step's targets ``[B, N_masked, t*p*p*C]`` (fp32, no gradient): the
    ImageNet-normalised clip un-normalised (``x * std + mean``), each masked tubelet in
    ``(dt, di, dj, c)`` order; with ``normalize_target``, each tubelet and channel normalised by its
    mean and unbiased std: ``(x - mean) / (std + 1e-6)``. Only the masked tubelets are formed."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        raise ValueError(f"expected clips of shape [B, C, T, H, W], got "
                         f"{tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__}")
    B, C, T, H, W = videos.shape
    check_clip(videos, C, (T, H, W), patch_size, tubelet_size)
    num_masked = check_mask(bool_masked_pos, B, T // tubelet_size * (H // patch_size) * (W // patch_size),
                            videos.device, num_masked)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=videos.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=videos.device)
    if mean.shape != (C,) or std.shape != (C,):
        raise ValueError(f"mean and std must hold one value per channel ({C}), got shapes "
                         f"{tuple(mean.shape)} and {tuple(std.shape)}")
    with torch.no_grad():
        ids = torch.argsort((~bool_masked_pos).to(torch.uint8), dim=1, stable=True)[:, :num_masked]
        x = gather_tubelets(videos, ids, patch_size, tubelet_size).float().view(B, num_masked, C, -1)
        x = x * std[:, None] + mean[:, None]
        if normalize_target:
            x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
        return x.transpose(2, 3).reshape(B, num_masked, -1)


def videomae_loss(videos, bool_masked_pos, outputs, patch_size: int, tubelet_size: int,
                  normalize_target: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  decode_mask=None) -> torch.Tensor:
    """The official pre-training loss: ``MSE(outputs, labels)`` (mean over every element, in fp32)
    with the labels of ``videomae_labels``; ``outputs [B, N_masked, t*p*p*C]`` as the model returns them.
    With VideoMAE V2's ``decode_mask`` the targets are the tubelets at ``~decode_mask`` (V2's
    ``labels = videos_patch[~decode_masked_pos]``) and ``outputs`` the model's predictions for them.

    Computed by the fused ``fastmae.ops.norm_mse_loss`` straight from the clip (un-normalisation,
    per-tubelet per-channel statistics and the squared error in one pass, the gradient in another):
    the labels are never stored."""
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 3:
        raise ValueError(f"outputs must have shape [B, N_masked, D], got "
                         f"{tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__}")
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        raise ValueError(f"expected clips of shape [B, C, T, H, W], got "
                         f"{tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__}")
    B, C, T, H, W = videos.shape
    want = C * tubelet_size * patch_size ** 2
    if outputs.shape[0] != B or outputs.shape[2] != want:
        raise ValueError(f"outputs {tuple(outputs.shape)} do not fit clips {tuple(videos.shape)}: expected "
                         f"[{B}, N_masked, {want}] (C * tubelet_size * patch_size**2)")
    check_clip(videos, C, (T, H, W), patch_size, tubelet_size)
    N = T // tubelet_size * (H // patch_size) * (W // patch_size)
    if decode_mask is None:
        num_masked = check_mask(bool_masked_pos, B, N, videos.device, outputs.shape[1])
    else:  # the rows are the decoded tubelets: ~decode_mask
        num_masked = N - check_mask(decode_mask, B, N, videos.device, N - outputs.shape[1], "decode_mask")
        bool_masked_pos = ~decode_mask
    std, mean = (torch.as_tensor(v, dtype=torch.float32, device=videos.device) for v in (std, mean))
    if mean.shape != (C,) or std.shape != (C,):
        raise ValueError(f"mean and std must hold one value per channel ({C}), got shapes "
                         f"{tuple(mean.shape)} and {tuple(std.shape)}")
    affine = torch.stack([std, mean])
    ids = token_order(~bool_masked_pos)[:, :num_masked]  # the masked tubelets, in token order
    return ops.norm_mse_loss(outputs, videos.detach(), None, patch_size, normalize_target, 1e-6, ids=ids,
                             tubelet_size=tubelet_size, per_channel=normalize_target, affine=affine)


# ============================================================================ input checks
def check_clip(x, in_chans: int, size: tuple[int, int, int], patch_size: int, tubelet_size: int) -> None:
    """Clips ``[B, C, T, H, W]`` of the model's channels and size, divisible into tubelets."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected clips of shape [B, C, T, H, W], got {shape}")
    B, C, T, H, W = x.shape
    if C != in_chans:
        raise ValueError(f"expected {in_chans} channels, got {C} (clips of shape {tuple(x.shape)})")
    if T % tubelet_size:
        raise ValueError(f"the clip's {T} frames are not divisible by the tubelet size {tubelet_size}")
    if H % patch_size or W % patch_size:
        raise ValueError(f"frame size {H}x{W} is not divisible by the patch size {patch_size}")
    if (T, H, W) != tuple(size):
        raise ValueError(f"clips are {T}x{H}x{W} (frames x height x width) but the model was built for "
                         f"{size[0]}x{size[1]}x{size[2]} (pass num_frames={T}, img_size=({H}, {W}) to the constructor)")
    if B == 0:
        raise ValueError("expected at least one clip, got a batch of 0")
    if not x.is_floating_point():
        raise ValueError(f"clips must be floating point, got {x.dtype}")


def check_mask(mask, B: int, N: int, device, num_masked: int | None = None, name: str = "bool_masked_pos") -> int:
    """``mask [B, N]`` bool on ``device`` masking the same count of tubelets in every sample, at least
    one and not all; returns that count. With ``num_masked`` given (or under torch.compile) the counts
    are checked on the device (``torch._assert_async``), without a host sync."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, N):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must have shape [B, N] = [{B}, {N}] (N tubelets in (t, h, w) order), "
                         f"got {shape}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = masked), got {mask.dtype}")
    if mask.device != torch.device(device):
        raise ValueError(f"{name} is on {mask.device} but the clips are on {device}")
    counts = mask.sum(dim=1)
    given = num_masked is not None
    if not given:
        if torch.compiler.is_compiling():
            raise ValueError("under torch.compile pass num_masked (the masked count of every sample), so the "
                             "shapes are known when tracing")
        num_masked = int(counts[0])
    elif isinstance(num_masked, bool) or not isinstance(num_masked, (int, torch.SymInt)):
        raise ValueError(f"num_masked must be an integer, got {num_masked!r}")
    if not 0 < num_masked < N:
        raise ValueError(f"{'num_masked' if given else name} masks {num_masked} of {N} tubelets per "
                         f"sample; at least one must be masked and one visible")
    want = f"{num_masked} tubelets in every sample" + (" (num_masked)" if given else "")
    if torch.compiler.is_compiling() or mask.device.type != "cpu":
        torch._assert_async((counts == num_masked).all(), f"{name} must mask {want}")
    elif not bool((counts == num_masked).all()):
        raise ValueError(f"{name} must mask the same number of tubelets in every sample, as tube and "
                         f"random masking do: {want}, but its samples mask {counts.tolist()}")
    return num_masked


# ============================================================================ factories
VIDEOMAE_CONFIGS = {  # the official factories' arguments (decoder_depth: the constructor's default, 8)
    "pretrain_videomae_small_patch16_224": dict(encoder_embed_dim=384, encoder_depth=12, encoder_num_heads=6,
                                                decoder_embed_dim=192, decoder_num_heads=3),
    "pretrain_videomae_base_patch16_224": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                                               decoder_embed_dim=384, decoder_num_heads=6),
    "pretrain_videomae_large_patch16_224": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                                                decoder_embed_dim=512, decoder_num_heads=8),
    "pretrain_videomae_huge_patch16_224": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                                               decoder_embed_dim=640, decoder_num_heads=8),
}


# A small configuration of the same architecture (not official): the video demo's, the widths of the
# image demo's ``mae_vit_tiny_patch8``. Its 8-px patches give a 64-px clip 64 tubelets per time slice
# (a 16-px patch gives 16, of which tube masking at 0.9 leaves 2 visible: too few to reconstruct
# anything but the clip's mean colour).
VIDEOMAE_SMALL_CONFIGS = {
    "pretrain_videomae_tiny_patch8": dict(patch_size=8, encoder_embed_dim=192, encoder_depth=6, encoder_num_heads=3,
                                          decoder_embed_dim=128, decoder_num_heads=4, decoder_num_classes=384),
}
VIDEOMAE_NAMES = (*VIDEOMAE_CONFIGS, *VIDEOMAE_SMALL_CONFIGS)


def videomae_config(name: str) -> dict:
    """The factory arguments of a named VideoMAE configuration (official or small)."""
    if name not in VIDEOMAE_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VIDEOMAE_NAMES)}")
    return dict(VIDEOMAE_CONFIGS.get(name) or VIDEOMAE_SMALL_CONFIGS[name])


def create_videomae(name: str, reference_impl: bool = False, **kwargs) -> PretrainVisionTransformer:
    """Build a VideoMAE configuration by name (official, or ``pretrain_videomae_tiny_patch8``, the
    demo's); ``kwargs`` override it (``decoder_depth``: the official run_mae_pretraining.py passes 4,
    its ``--decoder_depth`` default)."""
    cfg = dict(img_size=224, patch_size=16, encoder_num_classes=0, decoder_num_classes=1536, mlp_ratio=4,
               qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update(videomae_config(name))
    cfg.update(kwargs)
    return PretrainVisionTransformer(**cfg, reference_impl=reference_impl)


def _factory(name):
    def factory(pretrained=False, **kwargs):
        if pretrained:
            raise ValueError("pretrained=True is not supported: load a checkpoint's state_dict instead")
        return create_videomae(name, **kwargs)
    factory.__name__ = factory.__qualname__ = name
    kind = "official" if name in VIDEOMAE_CONFIGS else "small (not official)"
    factory.__doc__ = f"PretrainVisionTransformer with the {kind} {name} configuration."
    return factory


pretrain_videomae_small_patch16_224 = _factory("pretrain_videomae_small_patch16_224")
pretrain_videomae_base_patch16_224 = _factory("pretrain_videomae_base_patch16_224")
pretrain_videomae_large_patch16_224 = _factory("pretrain_videomae_large_patch16_224")
pretrain_videomae_huge_patch16_224 = _factory("pretrain_videomae_huge_patch16_224")
pretrain_videomae_tiny_patch8 = _factory("pretrain_videomae_tiny_patch8")
