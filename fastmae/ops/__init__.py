"""fastmae's ops. The three fused ops (``gather_mask``, ``unshuffle_scatter``, ``norm_mse_loss``)
are each a ``torch.library`` custom op in the ``fastmae`` namespace with a fake implementation and
registered autograd, dispatched to Triton (CUDA), C++ (CPU) or torch math (see
``fastmae.ops._backend``); in eager mode, plain CPU tensors on the C++ backend reach the same
kernels through a twin registered in C++ with C++ autograd (``_backend.eager_cpp``), which
checks and converts the arguments itself; the public functions' Python checks then run only when
it refuses an argument, to raise the error that names it.
``attention`` picks an attention backend; ``gelu_mlp`` is the transformer MLP with its GELU
recomputed in backward. Each has a ``*_ref`` twin."""
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
