"""fastmae's ops. The three fused model ops (``gather_mask``, ``unshuffle_scatter``,
``norm_mse_loss``) are each a ``torch.library`` custom op in the ``fastmae`` namespace with a fake
implementation and registered autograd, whose kernels are registered per device: C++ on CPU, Triton
on CUDA, torch math elsewhere (``fastmae.ops._backend``; ``FASTMAE_BACKEND`` forces one). The data
op ``resized_crop`` (crop, antialiased resize, flip and normalise a batch of uint8 images of
different sizes, packed by ``pack`` into ``PackedImages``; no gradient) is registered the same way.
``attention`` picks an attention backend; ``gelu_mlp`` is the transformer MLP with its GELU
recomputed in backward. Each has a ``*_ref`` twin."""
from ._backend import has_extension, select_backend
from .attention import attention, attention_ref
from .gather_mask import gather_mask, gather_mask_ref
from .masking import random_masking_ids
from .mlp import gelu_mlp, gelu_mlp_ref
from .norm_mse_loss import norm_mse_loss, norm_mse_loss_ref
from .resized_crop import PackedImages, pack, resized_crop, resized_crop_ref
from .unshuffle_scatter import unshuffle_scatter, unshuffle_scatter_ref

__all__ = [
    "PackedImages", "attention", "attention_ref", "gather_mask", "gather_mask_ref", "gelu_mlp", "gelu_mlp_ref",
    "has_extension", "norm_mse_loss", "norm_mse_loss_ref", "pack", "random_masking_ids", "resized_crop",
    "resized_crop_ref", "select_backend", "unshuffle_scatter", "unshuffle_scatter_ref",
]
