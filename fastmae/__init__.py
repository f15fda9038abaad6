"""fastmae: fast Masked Autoencoder pre-training for PyTorch, a drop-in for the official MAE."""
from . import maskalign, masking, ops, optim, reference, video
from .model import (
    MaskedAutoencoderViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_base_patch16_dec512d8b,
    mae_vit_huge_patch14,
    mae_vit_huge_patch14_dec512d8b,
    mae_vit_large_patch16,
    mae_vit_large_patch16_dec512d8b,
)

from .pretrained import load_encoder, load_pretrained
from .vit import (
    VisionTransformer,
    create_vit,
    interpolate_pos_embed,
    param_groups_lrd,
    vit_base_patch16,
    vit_huge_patch14,
    vit_large_patch16,
)

__version__ = "0.1.0"

__all__ = [
    "MaskedAutoencoderViT", "create_model", "maskalign", "masking", "ops", "optim", "reference", "video",
    "mae_vit_base_patch16", "mae_vit_base_patch16_dec512d8b",
    "mae_vit_large_patch16", "mae_vit_large_patch16_dec512d8b",
    "mae_vit_huge_patch14", "mae_vit_huge_patch14_dec512d8b",
    "VisionTransformer", "create_vit", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14",
    "param_groups_lrd", "interpolate_pos_embed", "load_encoder", "load_pretrained",
]
