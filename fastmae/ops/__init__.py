"""fastmae's ops. The three fused ops (``gather_mask``, ``unshuffle_scatter``, ``norm_mse_loss``)
are each a ``torch.library`` custom op in the ``fastmae`` namespace with a fake implementation and
registered autograd, whose kernels are registered per device: C++ on CPU, Triton on CUDA, torch
math elsewhere (``fastmae.ops._backend``; ``FASTMAE_BACKEND`` forces one). ``attention`` picks an
attention backend; ``gelu_mlp`` is the transformer MLP with its GELU recomputed in backward. Each
has a ``*_ref`` twin."""
from ._backend import has_extension, select_backend
from .attention import attention, attention_ref
from .gather_mask import gather_mask, gather_mask_ref
from .masking import random_masking_ids
from .mlp import gelu_mlp, gelu_mlp_ref
from .norm_mse_loss import norm_mse_loss, norm_mse_loss_ref
from .unshuffle_scatter import unshuffle_scatter, unshuffle_scatter_ref

__all__ = [
    "attention", "attention_ref", "gather_mask", "gather_mask_ref", "gelu_mlp", "gelu_mlp_ref", "has_extension",
    "norm_mse_loss", "norm_mse_loss_ref", "random_masking_ids", "select_backend",
    "unshuffle_scatter", "unshuffle_scatter_ref",
]
