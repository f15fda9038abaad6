"""Checkpoints in and out: fastmae, official, Hugging Face and timm formats.

- :func:`load_pretrained` loads any of them into a fastmae model (format detected; a report says
  what was loaded, left and why);
- :func:`from_hf` / :func:`to_hf` (``ViTMAEForPreTraining`` in transformers 4.x or 5.x keys, with
  :func:`hf_config` / :func:`config_from_hf`) and :func:`to_timm` / :func:`from_timm` (timm's
  ``VisionTransformer``, with :func:`timm_config`) map state_dicts (:mod:`fastmae.layouts`);
- :func:`export` writes a checkpoint in another format (``fastmae convert``).

Files from elsewhere are read without running code: ``torch.load(weights_only=True)`` or
safetensors (:func:`fastmae.pretrained.read_source`).
"""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ckpt_io
from . import pretrained
from .layouts import (DECODER_PREFIXES, HF_LAYOUTS, TIMM_ARCHITECTURES, ConversionError, config_from_hf,
                      detect_layout, from_hf, from_timm, hf_config, timm_config, to_hf, to_timm)
from .pretrained import load_pretrained, vit_config_of

__all__ = ["ConversionError", "HF_LAYOUTS", "TARGETS", "TIMM_ARCHITECTURES", "config_from_hf", "detect_layout",
           "export", "from_hf", "from_timm", "hf_config", "load_pretrained", "timm_config", "to_hf", "to_timm"]

# ---------------------------------------------------------------------------- files
TARGETS = ("fastmae", "official", "hf", "timm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _kind(state: dict) -> str:
    if any(k.startswith(DECODER_PREFIXES) for k in state):
        return "mae"
    return "classifier" if any(k.startswith("head.") for k in state) else "encoder"


def _save_safetensors(state: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    ckpt_io._write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def _save_json(obj: dict, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    ckpt_io._write_atomic(path, write)


def _check_fits(config: dict, state: dict, label: str) -> None:
    """The weights must fit the model ``config`` describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = ckpt_io.build_model(config)
    ckpt_io.check_state_dict(model, state, label)


def export(source, out: str, to: str, hf_layout: str = "4") -> list[str]:
    """Write ``source`` (anything :func:`fastmae.pretrained.read_source` reads) to ``out`` in the
    ``to`` format; returns the lines that say what was written and how to load it.

    - ``fastmae``: a checkpoint with the weights and ``model_config`` (``.pth``; or ``.safetensors``,
      the configuration in its metadata) that ``--finetune``, ``visualize`` and
      :func:`fastmae.checkpoint.load_model` read;
    - ``official``: ``{"model": state_dict}`` as the official scripts save (``.pth``), or the bare
      state_dict (``.safetensors``);
    - ``hf``: a Hugging Face model folder (``config.json``, ``model.safetensors``) for
      ``ViTMAEForPreTraining.from_pretrained`` (``ViTMAEModel`` for an encoder);
    - ``timm``: a timm model folder (``config.json``, ``model.safetensors``) for
      ``timm.create_model("local-dir:OUT")``, or the bare weights in a ``.safetensors`` / ``.pth`` file.
    """
    if to not in TARGETS:
        raise ConversionError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    src = pretrained.read_source(source)
    state, kind, lines = src.state, _kind(src.state), [f"read {src.label}: {src.format}"]
    if kind == "mae":
        config = pretrained.mae_config(src)
        if float(config["layer_norm_eps"]) != 1e-6:
            lines.append(f"note: its layer_norm_eps {config['layer_norm_eps']} (Hugging Face's default) is replaced by "
                         f"the official recipe's 1e-6")
            config["layer_norm_eps"] = 1e-6
    else:
        config = vit_config_of(src)
    is_file = out.endswith((".pth", ".pt", ".bin", ".safetensors"))
    safetensors_out = out.endswith(".safetensors")
    if to in ("fastmae", "official"):
        if not is_file:
            raise ConversionError(f"--to {to} writes one file: name it .pth or .safetensors, not {out!r}")
        _check_fits(config, state, src.label)
        if to == "fastmae" and safetensors_out:
            _save_safetensors(state, out, {pretrained.SAFETENSORS_CONFIG: json.dumps(config)})
        elif safetensors_out:
            _save_safetensors(state, out)
        else:
            ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "model": state,
                                 "model_config": config} if to == "fastmae" else {"model": state}, out)
        what = "fastmae weights checkpoint" if to == "fastmae" else "official-layout checkpoint"
        return lines + [f"wrote {out}: {what} ({kind}, {len(state)} tensors)"]
    if to == "hf":
        if kind == "classifier":
            raise ConversionError("a classifier has no Hugging Face ViTMAE counterpart (ViTMAE has no head); export "
                                  "it with --to timm or --to official")
        if is_file:
            raise ConversionError(f"--to hf writes a model folder (config.json, model.safetensors), not {out!r}")
        if kind == "encoder":  # an encoder's configuration for ViTMAEModel: no decoder keys
            config = {k: config[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth",
                                             "num_heads", "mlp_ratio", "layer_norm_eps")}
        hf_state = to_hf(state, hf_layout)
        os.makedirs(out, exist_ok=True)
        _save_safetensors(hf_state, os.path.join(out, "model.safetensors"))
        mask_ratio = float((src.meta.get("args") or {}).get("mask_ratio", 0.75))  # the ratio it was trained with
        _save_json(hf_config(dict(config, mask_ratio=mask_ratio)), os.path.join(out, "config.json"))
        cls = "ViTMAEForPreTraining" if kind == "mae" else "ViTMAEModel"
        return lines + [f"wrote {out}: Hugging Face {cls} (transformers {hf_layout}.x keys); load it with "
                        f"transformers.{cls}.from_pretrained({out!r})"]
    # timm
    timm_state = to_timm(state)
    if kind == "mae":  # its encoder, which keeps the final norm: timm's cls-token pooling, no head
        config = {k: config[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                         "mlp_ratio")} | dict(num_classes=0, global_pool=False)
    arch, args = timm_config(config, timm_state)
    call = f"timm.create_model({arch!r}, {', '.join(f'{k}={v!r}' for k, v in args.items())}"
    if kind == "classifier" and "head.1.weight" in state:
        lines.append("note: the linear probe's BatchNorm is folded into its Linear head (timm's head is one Linear)")
    if is_file:
        if safetensors_out:
            _save_safetensors(timm_state, out)
        else:
            ckpt_io.save_atomic(timm_state, out)
        return lines + [f"wrote {out}: timm VisionTransformer weights; load them with {call}, "
                        f"pretrained=True, pretrained_cfg_overlay=dict(file={out!r}))"]
    os.makedirs(out, exist_ok=True)
    _save_safetensors(timm_state, os.path.join(out, "model.safetensors"))
    _save_json({
        "architecture": arch, "num_classes": args["num_classes"], "num_features": args["embed_dim"],
        "global_pool": args["global_pool"], "model_args": args,
        "pretrained_cfg": {"input_size": [args["in_chans"], *_pair(args["img_size"])], "interpolation": "bicubic",
                           "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                           "num_classes": args["num_classes"], "first_conv": "patch_embed.proj",
                           "classifier": "head", "fixed_input_size": True},
    }, os.path.join(out, "config.json"))
    return lines + [f"wrote {out}: timm VisionTransformer ({arch} layout); load it with "
                    f"timm.create_model('local-dir:{out}', pretrained=True)"]


def _pair(size) -> list:
    return list(size) if isinstance(size, (list, tuple)) else [size, size]
