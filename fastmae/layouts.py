"""The key layouts of other libraries' ViTs, converted both ways (the public face is :mod:`fastmae.convert`).

fastmae's state_dicts have the official keys (``models_mae.MaskedAutoencoderViT`` for
pre-training, ``models_vit.VisionTransformer`` for classifiers); timm's ``VisionTransformer`` has
the same keys, so the official and timm layouts differ only in what a model has (a decoder, a
probe's BatchNorm). Hugging Face's ``ViTMAEForPreTraining`` splits each ``qkv`` into three
projections and names everything otherwise, in two layouts:

- transformers 4.x: ``vit.encoder.layer.{i}.attention.attention.query`` ...,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``;
- transformers 5.x: ``vit.layers.{i}.attention.q_proj`` ..., ``attention.o_proj``, ``mlp.fc1``,
  ``mlp.fc2``. transformers 5 renames the 4.x keys when it loads them, so the 4.x layout is the
  one both read (the default of :func:`to_hf`).

An encoder without its decoder is Hugging Face's ``ViTMAEModel`` (the same keys without ``vit.``).

Each function maps a state_dict to a state_dict and copies no more than it must; the
``*_config`` functions give the configuration that goes with it. Reading files is
:mod:`fastmae.pretrained`'s work, writing them :mod:`fastmae.convert`'s.
"""
from __future__ import annotations

import re

import torch

from .checkpoint import CheckpointError

# The per-block keys (without the ``.weight`` / ``.bias`` suffix), official -> Hugging Face.
_HF_BLOCK = {
    "4": {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
          "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"},
    "5": {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}
_HF_QKV = {"4": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
           "5": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}
_HF_ENCODER_LAYERS = {"4": "encoder.layer.", "5": "layers."}
_HF_DECODER_LAYERS = "decoder.decoder_layers."
# transformers 5's save_pretrained writes the 4.x keys, but its reverse renaming also turns the
# decoder's "decoder_layers." into "decoder_encoder.layer." (transformers 5 loads that back, 4.x
# does not): read as the decoder's blocks.
HF5_SAVED_DECODER_LAYERS = "decoder.decoder_encoder.layer."
# Everything outside the blocks: official key -> Hugging Face key (encoder keys under ``vit.``).
_HF_OTHER = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_DECODER_OTHER = {k: "decoder." + k for k in (
    "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
    "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")}
HF_LAYOUTS = ("4", "5")

# what a pre-training model holds beside its encoder: the MAE decoder, MaskAlign's adapters and
# level mixture (and an official MaskAlign checkpoint's teacher)
DECODER_PREFIXES = ("decoder_", "mask_token", "distill_heads.", "distill_weights", "clip_model.", "dino_model.")


class ConversionError(CheckpointError):
    """A state_dict is not in the layout a conversion reads, or holds what the target cannot."""


def _short(keys, n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------------------- detection
def detect_layout(state_dict: dict) -> str:
    """``"official"`` (fastmae's, the official code's and timm's keys), ``"hf4"`` or ``"hf5"``
    (Hugging Face ViTMAE, transformers 4.x or 5.x keys, with or without the ``vit.`` prefix);
    :class:`ConversionError` for anything else."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys and "cls_token" in keys:
        return "official"
    for layout in HF_LAYOUTS:
        for prefix in ("vit.", ""):
            if prefix + _HF_OTHER["cls_token"] in keys and any(
                    k.startswith(prefix + _HF_ENCODER_LAYERS[layout]) for k in keys):
                return "hf" + layout
    if any(k.startswith(("vit.embeddings.", "embeddings.")) for k in keys):  # no blocks: a 0-depth encoder
        return "hf" + HF_LAYOUTS[0]
    raise ConversionError(f"the weights are in no layout fastmae reads (official/timm ViT or Hugging Face "
                          f"ViTMAE); their keys begin {_short(sorted(keys))}")


# ---------------------------------------------------------------------------- Hugging Face
def _block_indices(state_dict: dict, prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def to_hf(state_dict: dict, layout: str = "4") -> dict:
    """An official-layout MAE state_dict (fastmae's) in Hugging Face's layout: ``ViTMAEForPreTraining``
    with a decoder, ``ViTMAEModel`` (no ``vit.`` prefix) without one. ``layout`` is ``"4"``
    (transformers 4.x keys, which transformers 5 also loads) or ``"5"``."""
    if layout not in HF_LAYOUTS:
        raise ConversionError(f"layout must be one of {HF_LAYOUTS}, not {layout!r}")
    if detect_layout(state_dict) != "official":
        raise ConversionError("to_hf takes a state_dict in the official (fastmae) layout")
    if "head.weight" in state_dict or any(k.startswith(("head.", "fc_norm.")) for k in state_dict):
        raise ConversionError("a classifier (head / fc_norm) has no Hugging Face ViTMAE counterpart; export it "
                              "with to_timm or in the official layout")
    decoder = any(k.startswith(DECODER_PREFIXES) for k in state_dict)
    enc = "vit." if decoder else ""
    out, used = {}, set()

    def put(src_key, dst_key):
        out[dst_key] = state_dict[src_key]
        used.add(src_key)

    for k, v in _HF_OTHER.items():
        if k in state_dict:
            put(k, enc + v)
    for k, v in _HF_DECODER_OTHER.items():
        if k in state_dict:
            put(k, v)
    for src, dst in (("blocks.", enc + _HF_ENCODER_LAYERS[layout]), ("decoder_blocks.", _HF_DECODER_LAYERS)):
        for i in _block_indices(state_dict, src):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for name, hf_name in _HF_BLOCK[layout].items():
                for suffix in (".weight", ".bias"):
                    if s + name + suffix in state_dict:
                        put(s + name + suffix, d + hf_name + suffix)
            for suffix in (".weight", ".bias"):
                qkv = state_dict.get(s + "attn.qkv" + suffix)
                if qkv is None:
                    continue
                used.add(s + "attn.qkv" + suffix)
                # clone: three views of one storage cannot be saved as separate safetensors tensors
                for part, hf_name in zip(qkv.chunk(3, dim=0), _HF_QKV[layout]):
                    out[d + hf_name + suffix] = part.clone()
    left = sorted(set(state_dict) - used)
    if left:
        raise ConversionError(f"these weights have no place in Hugging Face's ViTMAE: {_short(left)}")
    return out


def from_hf(state_dict: dict) -> dict:
    """A Hugging Face ViTMAE state_dict (``ViTMAEForPreTraining`` or ``ViTMAEModel``, transformers
    4.x or 5.x keys, or what transformers 5's ``save_pretrained`` writes) in the official layout
    (fastmae's): qkv joined, keys renamed."""
    layout = detect_layout(state_dict)
    if not layout.startswith("hf"):
        raise ConversionError("from_hf takes a Hugging Face ViTMAE state_dict; these weights are in the "
                              "official layout already")
    layout = layout[2:]
    enc = "vit." if any(k.startswith("vit.") for k in state_dict) else ""
    out, used = {}, set()

    def put(src_key, dst_key):
        out[dst_key] = state_dict[src_key]
        used.add(src_key)

    for k, v in _HF_OTHER.items():
        if enc + v in state_dict:
            put(enc + v, k)
    for k, v in _HF_DECODER_OTHER.items():
        if v in state_dict:
            put(v, k)
    decoder_layers = (HF5_SAVED_DECODER_LAYERS if any(k.startswith(HF5_SAVED_DECODER_LAYERS) for k in state_dict)
                      else _HF_DECODER_LAYERS)
    for dst, src in (("blocks.", enc + _HF_ENCODER_LAYERS[layout]), ("decoder_blocks.", decoder_layers)):
        for i in _block_indices(state_dict, src):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for name, hf_name in _HF_BLOCK[layout].items():
                for suffix in (".weight", ".bias"):
                    if s + hf_name + suffix in state_dict:
                        put(s + hf_name + suffix, d + name + suffix)
            for suffix in (".weight", ".bias"):
                parts = [s + hf_name + suffix for hf_name in _HF_QKV[layout]]
                have = [p in state_dict for p in parts]
                if any(have) and not all(have):
                    raise ConversionError(f"block {s!r} has {suffix[1:]} for only some of query, key and value")
                if all(have):
                    out[d + "attn.qkv" + suffix] = torch.cat([state_dict[p] for p in parts], dim=0)
                    used.update(parts)
    left = sorted(set(state_dict) - used)
    if left:
        raise ConversionError(f"these Hugging Face weights have no place in an MAE: {_short(left)} (a ViTMAE "
                              f"with another feature, such as qkv_bias=False)")
    return out


def hf_config(model_config: dict) -> dict:
    """The ``config.json`` of Hugging Face's ViTMAE for a fastmae MAE configuration (a
    :func:`fastmae.checkpoint.model_config`). ``layer_norm_eps`` is 1e-6, the official recipe's
    (Hugging Face's default, 1e-12, would not give the official numbers)."""
    c = model_config
    size = c["img_size"]
    decoder = c.get("decoder_depth") is not None
    cfg = {
        "model_type": "vit_mae",
        "architectures": ["ViTMAEForPreTraining" if decoder else "ViTMAEModel"],
        "hidden_size": c["embed_dim"], "num_hidden_layers": c["depth"], "num_attention_heads": c["num_heads"],
        "intermediate_size": int(c["embed_dim"] * c["mlp_ratio"]), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": c.get("layer_norm_eps", 1e-6),
        "image_size": list(size) if isinstance(size, (list, tuple)) else size,
        "patch_size": c["patch_size"], "num_channels": c["in_chans"], "qkv_bias": True,
        "mask_ratio": c.get("mask_ratio", 0.75), "norm_pix_loss": bool(c.get("norm_pix_loss", False)),
    }
    if decoder:
        cfg.update(decoder_hidden_size=c["decoder_embed_dim"], decoder_num_hidden_layers=c["decoder_depth"],
                   decoder_num_attention_heads=c["decoder_num_heads"],
                   decoder_intermediate_size=int(c["decoder_embed_dim"] * c["mlp_ratio"]))
    return cfg


def config_from_hf(hf: dict) -> dict:
    """A fastmae MAE configuration from Hugging Face's ViTMAE ``config.json`` (as a dict).
    ``layer_norm_eps`` is kept as the file says; see :func:`hf_config`."""
    def side(v):
        return v[0] if isinstance(v, (list, tuple)) else v

    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise ConversionError(f"a ViTMAE with hidden_act={hf.get('hidden_act')!r}, qkv_bias={hf.get('qkv_bias')} "
                              f"is not an MAE fastmae builds (gelu, qkv_bias=True)")
    width = hf.get("hidden_size", 768)
    size = hf.get("image_size", 224)
    return dict(
        img_size=list(size) if isinstance(size, (list, tuple)) else size, patch_size=side(hf.get("patch_size", 16)),
        in_chans=hf.get("num_channels", 3), embed_dim=width, depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12), decoder_embed_dim=hf.get("decoder_hidden_size", 512),
        decoder_depth=hf.get("decoder_num_hidden_layers", 8),
        decoder_num_heads=hf.get("decoder_num_attention_heads", 16),
        mlp_ratio=hf.get("intermediate_size", 4 * width) / width, norm_pix_loss=bool(hf.get("norm_pix_loss", False)),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
    )


# ---------------------------------------------------------------------------- timm
# timm model features fastmae's ViT does not have: keys that only exist when they are switched on.
_TIMM_ONLY = ("reg_token", "norm_pre.", "attn_pool.", ".ls1.", ".ls2.", ".attn.q_norm.", ".attn.k_norm.",
              ".attn.norm.", ".mlp.norm.", "head_drop.", "patch_embed.norm.")


def to_timm(state_dict: dict) -> dict:
    """A fastmae classifier or encoder state_dict (official layout) for timm's ``VisionTransformer``:
    the pre-training decoder (if any) dropped; a linear probe's head (``BatchNorm1d(affine=False)``
    then ``Linear``) folded into one ``Linear``, which timm's ``head`` is. The keys are otherwise
    timm's already; :func:`timm_config` gives the model arguments that fit."""
    if detect_layout(state_dict) != "official":
        raise ConversionError("to_timm takes a state_dict in the official (fastmae) layout; convert Hugging Face "
                              "weights with from_hf first")
    out = {k: v for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}
    if "head.1.weight" in out:  # the probe head: y = W (x - mean) / sqrt(var + eps) + b
        mean, var = out.pop("head.0.running_mean"), out.pop("head.0.running_var")
        out.pop("head.0.num_batches_tracked", None)
        weight, bias = out.pop("head.1.weight"), out.pop("head.1.bias")
        scale = (var.double() + PROBE_BN_EPS).rsqrt()
        out["head.weight"] = (weight.double() * scale).to(weight.dtype)
        out["head.bias"] = (bias.double() - out["head.weight"].double() @ mean.double()).to(bias.dtype)
    left = [k for k in out if k.startswith("head.") and k not in ("head.weight", "head.bias")]
    if left:
        raise ConversionError(f"a head timm has no counterpart for: {_short(left)}")
    return out


PROBE_BN_EPS = 1e-6  # the official linear probe's BatchNorm1d(affine=False, eps=1e-6)


def from_timm(state_dict: dict) -> dict:
    """A timm ``VisionTransformer`` state_dict in fastmae's layout (the same keys), refused when the
    model uses a timm feature fastmae's ViT lacks (register tokens, layer scale, q/k norms, ...)."""
    if detect_layout(state_dict) != "official":
        raise ConversionError("from_timm takes a timm VisionTransformer state_dict (keys patch_embed.proj, "
                              "blocks.N.attn.qkv, ...)")
    extra = [k for k in state_dict if k.startswith(_TIMM_ONLY) or any(t in k for t in _TIMM_ONLY if t[0] == ".")]
    if extra:
        raise ConversionError(f"these timm weights belong to features fastmae's ViT does not have: {_short(extra)}")
    return dict(state_dict)


TIMM_ARCHITECTURES = {  # (patch, width, depth, heads) -> the timm name of that ViT
    (16, 768, 12, 12): "vit_base_patch16_224", (16, 1024, 24, 16): "vit_large_patch16_224",
    (14, 1280, 32, 16): "vit_huge_patch14_224",
}


def timm_config(vit_config: dict, state_dict: dict | None = None) -> tuple[str, dict]:
    """``(architecture, model_args)`` for ``timm.create_model`` from a fastmae classifier or encoder
    configuration (:meth:`fastmae.VisionTransformer.config`). Global pooling is timm's
    ``global_pool="avg"`` with ``fc_norm=True`` (the official fine-tuning's), or with
    ``fc_norm=False`` for an encoder that kept its final ``norm`` (a pre-trained one, when
    ``state_dict`` says so); the cls token is ``global_pool="token"``."""
    c = vit_config
    arch = TIMM_ARCHITECTURES.get((c["patch_size"], c["embed_dim"], c["depth"], c["num_heads"]),
                                  "vit_base_patch16_224")
    fc_norm = bool(c["global_pool"]) if state_dict is None else "fc_norm.weight" in state_dict
    size = c["img_size"]
    args = dict(img_size=list(size) if isinstance(size, (list, tuple)) else size, patch_size=c["patch_size"],
                in_chans=c["in_chans"], embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                mlp_ratio=c["mlp_ratio"], num_classes=c["num_classes"], qkv_bias=True,
                global_pool="avg" if c["global_pool"] else "token", fc_norm=fc_norm)
    return arch, args
