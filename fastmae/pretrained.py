"""Encoders from checkpoints: a classifier built and loaded from a pre-training or fine-tuning file.

Reads (safely, ``weights_only``) a fastmae checkpoint (pre-training or fine-tuning), an official
one (``main_pretrain.py``'s full checkpoint, the released encoder-only ``mae_pretrain_vit_*.pth``,
a fine-tuned ``mae_finetuned_vit_*.pth``) or a plain state_dict, and loads its encoder into a
:class:`fastmae.VisionTransformer` as the official ``main_finetune.py`` does:

- the decoder (``decoder_*``, ``mask_token``) is dropped;
- the position table is resized for another image size: a fixed sin-cos table (pre-training) is
  regenerated for the new grid, a learned one (fine-tuned) interpolated bicubically;
- with global pooling the encoder's final ``norm`` is dropped and ``fc_norm`` starts fresh;
- a head that does not fit (another class count, or none) is initialised as the official code
  does (``trunc_normal_(std=2e-5)``);
- anything else that does not fit (another patch size, width or depth) is an error naming it.

What was loaded, left at its initialisation and dropped is returned as a :class:`LoadReport`.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt_io
from . import layouts
from .checkpoint import CheckpointError
from .pos_embed import get_2d_sincos_pos_embed
from .vit import VIT_CONFIGS, interpolate_pos_embed, sincos_pos_embed_like

from .layouts import DECODER_PREFIXES


@dataclass
class LoadReport:
    """What :func:`load_pretrained` (or :func:`load_encoder`) did: key lists and, for what was not
    loaded as it was, why."""
    source: str
    format: str
    loaded: list = field(default_factory=list)
    initialised: dict = field(default_factory=dict)  # key -> why it keeps the model's initialisation
    dropped: dict = field(default_factory=dict)  # key -> why the checkpoint's value was not used
    resized: dict = field(default_factory=dict)  # key -> how it was fitted to the model
    notes: list = field(default_factory=list)  # what else the user should know

    def lines(self) -> list[str]:
        out = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        for title, what in (("resized", self.resized), ("initialised", self.initialised), ("dropped", self.dropped)):
            for reason, keys in _by_reason(what).items():
                out.append(f"  {title}: {_short(keys)} ({reason})")
        return out + [f"  note: {n}" for n in self.notes]

    def __str__(self):
        return "\n".join(self.lines())


def _by_reason(what: dict) -> dict:
    grouped: dict[str, list] = {}
    for key, reason in what.items():
        grouped.setdefault(reason, []).append(key)
    return grouped


def _short(keys: list, n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


# ---------------------------------------------------------------------------- reading
def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


@dataclass
class Source:
    """A checkpoint read by :func:`read_source`: its weights in the official layout, its format,
    what describes its model (``meta``: a fastmae ``model_config``, the official ``args``, a Hugging
    Face ``hf_config`` or a timm ``timm_config``) and its name in messages."""
    state: dict
    format: str
    meta: dict
    label: str


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
SAFETENSORS_CONFIG = "fastmae_model_config"  # the metadata key of a fastmae configuration in a .safetensors


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(state_dict, metadata) of a ``.safetensors`` file, with clear errors for what is not one."""
    from safetensors import SafetensorError, safe_open

    ckpt_io.check_file(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path!r} is not a readable .safetensors file: it is corrupt, truncated or of "
                              f"another format ({type(e).__name__}: {ckpt_io._first_line(e)})") from None


def _read_config_json(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path!r} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path!r} is not a model configuration (a JSON object)")
    return cfg


def _folder_weights(path: str):
    """The weights of a model folder: one file of :data:`WEIGHT_FILES`, or the shards a
    ``*.index.json`` lists (as ``save_pretrained`` splits large models)."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return _read_path(os.path.join(path, name))[0]
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, name)):
            weight_map = _read_config_json(os.path.join(path, name)).get("weight_map") or {}
            state = {}
            for shard in sorted(set(weight_map.values())):
                part = _read_path(os.path.join(path, shard))[0]
                if not _is_state_dict(part):
                    raise CheckpointError(f"{os.path.join(path, shard)!r}, a shard of {path!r}, holds no state_dict")
                state.update(part)
            return state
    raise CheckpointError(f"the folder {path!r} holds no weights ({' or '.join(WEIGHT_FILES)}, or shards with an "
                          f"index)")


def _read_path(path: str) -> tuple[object, dict, str]:
    """(what the file holds, meta from beside it, the library that wrote it or "") for a file or a
    Hugging Face / timm model folder (``config.json`` beside the weights)."""
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        cfg = _read_config_json(cfg_path) if os.path.isfile(cfg_path) else {}
        if "model_type" in cfg and cfg["model_type"] != "vit_mae":
            raise CheckpointError(f"{path!r} holds a Hugging Face {cfg['model_type']!r} model; fastmae reads "
                                  f"ViTMAE (vit_mae) models")
        if "architecture" in cfg and not str(cfg["architecture"]).startswith("vit_"):
            raise CheckpointError(f"{path!r} holds a timm {cfg['architecture']!r} model; fastmae reads timm "
                                  f"VisionTransformers (vit_*)")
        obj = _folder_weights(path)
        if "model_type" in cfg:
            return obj, {"hf_config": cfg}, "hf"
        if "architecture" in cfg:
            return obj, {"timm_config": cfg}, "timm"
        return obj, {}, ""
    if path.endswith(".safetensors"):
        state, metadata = read_safetensors(path)
        if SAFETENSORS_CONFIG in metadata:
            return {"format": ckpt_io.FORMAT, "model": state,
                    "model_config": json.loads(metadata[SAFETENSORS_CONFIG])}, {}, ""
        return state, {}, ""
    return ckpt_io.read(path), {}, ""


def read_source(source, name: str = "checkpoint") -> Source:
    """Read a path (a checkpoint file, a ``.safetensors`` file, a Hugging Face or timm model folder),
    an in-memory checkpoint or a state_dict (a :class:`Source` is returned as it is), in any layout
    :mod:`fastmae.convert` reads; the weights come back in the official layout."""
    if isinstance(source, Source):
        return source
    meta, origin = {}, ""
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        obj, meta, origin = _read_path(label)
    else:
        label, obj = f"the given {name}", source
    if isinstance(obj, dict) and obj.get("format") == ckpt_io.FORMAT:
        state = obj.get("model")
        meta = {"model_config": obj.get("model_config") or {}, "args": obj.get("args") or {}, "step": obj.get("step")}
        kind = "fine-tuning" if meta["model_config"].get("kind") == "vit" else "pre-training"
        fmt = f"fastmae {kind} checkpoint"
    elif isinstance(obj, dict) and "model" in obj and _is_state_dict(obj["model"]):
        state, fmt = obj["model"], "official checkpoint"
        args = obj.get("args")
        meta = dict(meta, args=vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}))
    elif _is_state_dict(obj):
        state, fmt = obj, "state_dict"
    else:
        raise CheckpointError(f"{label} is neither a checkpoint with a 'model' state_dict nor a state_dict")
    if not _is_state_dict(state):
        raise CheckpointError(f"{label} holds no weights")
    if any(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        layout = layouts.detect_layout(state)
    except CheckpointError as e:
        raise CheckpointError(f"{label} does not hold a ViT encoder: {e}") from None
    if layout.startswith("hf"):
        saved_by_5 = any(k.startswith(layouts.HF5_SAVED_DECODER_LAYERS) for k in state)
        state = layouts.from_hf(state)
        cls = "ViTMAEForPreTraining" if any(k.startswith(DECODER_PREFIXES) for k in state) else "ViTMAEModel"
        fmt = (f"Hugging Face {cls} (transformers {layout[2:]}.x keys"
               f"{', as transformers 5 saves them' if saved_by_5 else ''})")
    elif origin == "timm":
        state, fmt = layouts.from_timm(state), "timm VisionTransformer"
    elif fmt != "state_dict" and not fmt.startswith("fastmae"):
        fmt = ("official pre-training checkpoint" if any(k.startswith(DECODER_PREFIXES) for k in state)
               else "official fine-tuned checkpoint" if "head.weight" in state
               else "official encoder-only pre-training checkpoint")
    return Source(state, fmt, meta, label)


def _stored_config(meta: dict) -> dict | None:
    """The configuration a checkpoint carries (fastmae's ``model_config``, or one made from a Hugging
    Face or timm ``config.json``), with at least ``num_heads`` and ``img_size``; None without one."""
    if meta.get("model_config"):
        return meta["model_config"]
    if meta.get("hf_config"):
        return layouts.config_from_hf(meta["hf_config"])
    if meta.get("timm_config"):
        cfg = dict(meta["timm_config"].get("model_args") or {})
        known = {v: k for k, v in layouts.TIMM_ARCHITECTURES.items()}.get(meta["timm_config"]["architecture"])
        cfg.setdefault("num_heads", known[3] if known else None)
        cfg.setdefault("img_size", list((meta["timm_config"].get("pretrained_cfg") or {}).get(
            "input_size", (3, 224, 224))[1:]))
        return cfg
    return None


def _known_config(configs: dict, key: tuple, name: str | None):
    """The configuration named by the official ``args.model``, else the only one of these shapes."""
    return configs.get(name or "") or next(
        (c for c in configs.values() if tuple(c[k] for k in ("patch_size", "embed_dim", "depth")) == key), None)


def encoder_config(source: Source) -> dict:
    """The classifier configuration a checkpoint's encoder needs: ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads``, ``mlp_ratio``, ``in_chans``, ``img_size``, from the stored
    configuration, else the official ``args.model``, else the weights' shapes (the head count
    then from the known configuration of that width, depth and patch size)."""
    state = source.state
    proj = state["patch_embed.proj.weight"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    cfg = dict(patch_size=proj.shape[-1], embed_dim=proj.shape[0], depth=depth, in_chans=proj.shape[1],
               mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0] if depth else 4.0)
    stored = _stored_config(source.meta)
    if stored:
        cfg["num_heads"] = stored["num_heads"]
        size = stored["img_size"]
        cfg["img_size"] = tuple(size) if isinstance(size, (list, tuple)) else size
        return cfg
    args = source.meta.get("args") or {}
    name = str(args.get("model", "")).replace("mae_", "", 1).replace("_dec512d8b", "")
    known = _known_config(VIT_CONFIGS, (cfg["patch_size"], cfg["embed_dim"], depth), name)
    cfg["num_heads"] = known["num_heads"] if known else None  # None: the caller must be told the model
    grid = int(round((state["pos_embed"].shape[-2] - 1) ** 0.5)) if "pos_embed" in state else 224 // cfg["patch_size"]
    cfg["img_size"] = args.get("input_size") or grid * cfg["patch_size"]
    return cfg


def mae_config(source: Source) -> dict:
    """The MAE configuration (:func:`fastmae.checkpoint.model_config`) of a pre-training
    checkpoint: stored, else from the official ``args``, else from the weights' shapes and the
    known configurations. :class:`CheckpointError` when the weights hold no decoder or the head
    counts cannot be known."""
    from . import reference

    state = source.state
    if "decoder_embed.weight" not in state:
        raise CheckpointError(f"{source.label} holds an encoder without the pre-training decoder, not an MAE")
    stored = _stored_config(source.meta)
    if stored and stored.get("kind") != "vit" and "decoder_depth" in stored:
        return dict(stored)
    enc = encoder_config(source)
    dec_depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
    dec_dim = state["decoder_embed.weight"].shape[0]
    args = source.meta.get("args") or {}
    configs = {**reference.MODEL_CONFIGS, **reference.SMALL_CONFIGS}
    known = _known_config(configs, (enc["patch_size"], enc["embed_dim"], enc["depth"]), args.get("model"))
    if enc["num_heads"] is None or known is None or (known["decoder_embed_dim"], known["decoder_depth"]) != (
            dec_dim, dec_depth):
        raise CheckpointError(f"{source.label}: the head counts of this MAE ({enc['embed_dim']} wide, {enc['depth']} "
                              f"blocks, decoder {dec_dim} wide, {dec_depth} blocks) are not stored and it is no known "
                              f"configuration; convert it from a file that carries its configuration")
    return dict(img_size=list(enc["img_size"]) if isinstance(enc["img_size"], tuple) else enc["img_size"],
                patch_size=enc["patch_size"], in_chans=enc["in_chans"], embed_dim=enc["embed_dim"],
                depth=enc["depth"], num_heads=enc["num_heads"], decoder_embed_dim=dec_dim, decoder_depth=dec_depth,
                decoder_num_heads=known["decoder_num_heads"], mlp_ratio=enc["mlp_ratio"],
                norm_pix_loss=bool(args.get("norm_pix_loss", False)), layer_norm_eps=1e-6)


def vit_config_of(source) -> dict:
    """The :meth:`fastmae.VisionTransformer.config` of a classifier's or an encoder's weights (a
    :class:`fastmae.pretrained.Source`): stored, else from the weights and the known configurations."""
    stored = source.meta.get("model_config") or {}
    if stored.get("kind") == "vit":
        return dict(stored)
    cfg = encoder_config(source)
    if cfg["num_heads"] is None:
        raise CheckpointError(f"{source.label}: the head count of this {cfg['embed_dim']}-wide encoder is not stored "
                              f"and it is no known configuration")
    state = source.state
    head = state.get("head.weight", state.get("head.1.weight"))
    return dict(kind="vit", img_size=list(cfg["img_size"]) if isinstance(cfg["img_size"], tuple) else cfg["img_size"],
                patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
                num_classes=0 if head is None else head.shape[0], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], qkv_bias=True,
                global_pool="fc_norm.weight" in state, layer_norm_eps=1e-6,
                head="bn_linear" if "head.1.weight" in state else "linear")


def load_model(path: str, device="cpu", reference_impl: bool = False, **kwargs):
    """(model, info): the model a checkpoint describes (an MAE, or a classifier for one of ``fastmae
    finetune``/``linprobe``), with its weights, in eval mode. Any checkpoint
    :func:`read_source` reads will do (fastmae's, the official ones, Hugging Face
    and timm folders, ``.safetensors``); ``info`` has ``model_config``, ``args`` (the training
    arguments, ``{}`` when the file has none), ``step`` (None when unknown) and ``format``."""
    src = read_source(path)
    if src.meta.get("model_config") and src.format.startswith("fastmae"):
        config = src.meta["model_config"]
    elif "decoder_embed.weight" in src.state:
        config = mae_config(src)
    else:
        config = vit_config_of(src)
    try:
        model = ckpt_io.build_model(config, reference_impl=reference_impl, **kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} has an invalid model configuration: {e}") from None
    ckpt_io.check_state_dict(model, src.state, path)
    model.load_state_dict(src.state, strict=True)
    info = dict(model_config=config, args=src.meta.get("args") or {}, step=src.meta.get("step"), format=src.format)
    return model.to(device).eval(), info


# ---------------------------------------------------------------------------- loading
def _is_sincos(pos_embed: torch.Tensor, grid) -> bool:
    """Whether ``pos_embed [1, 1 + h*w, D]`` is the fixed sin-cos table of the ``(h, w)`` grid."""
    n, dim = pos_embed.shape[-2] - 1, pos_embed.shape[-1]
    if grid[0] * grid[1] != n or dim % 4:
        return False
    table = get_2d_sincos_pos_embed(dim, grid, cls_token=True)
    return torch.allclose(pos_embed.reshape(table.shape).float(), table, atol=1e-5)


def _source_grid(src: Source, patch_size: int) -> tuple[int, int]:
    """The checkpoint's patch grid: from its stored image size when it has one, else square."""
    size = (_stored_config(src.meta) or {}).get("img_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        return h // patch_size, w // patch_size
    rows = src.state["pos_embed"].shape[-2] - 1
    side = int(round(rows ** 0.5))
    if side * side != rows:
        raise CheckpointError(f"{src.label}: its position table has {rows} patch rows, not a square grid, and it "
                              f"does not say its image size, so the table cannot be resized")
    return side, side


def check_architecture(model, state: dict, label: str) -> None:
    """The encoder's shapes must be the model's: patch size, channels, width, depth, MLP width."""
    own = model.state_dict()
    problems = []
    if tuple(state["patch_embed.proj.weight"].shape) != tuple(own["patch_embed.proj.weight"].shape):
        c, i, p, _ = state["patch_embed.proj.weight"].shape
        oc, oi, op, _ = own["patch_embed.proj.weight"].shape
        problems.append(f"patch embedding: {p}-px patches, {i} channels, width {c} in the checkpoint vs "
                        f"{op}, {oi}, {oc} in the model")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    if depth != len(model.blocks):
        problems.append(f"{depth} blocks in the checkpoint vs {len(model.blocks)} in the model")
    wrong = [k for k in own if k.startswith("blocks.") and k in state and state[k].shape != own[k].shape]
    if wrong:
        problems.append(f"shapes of {_short(wrong)}")
    if problems:
        raise CheckpointError(f"{label} holds another architecture: {'; '.join(problems)}; build the model with "
                              f"the checkpoint's configuration (leave out --model)")


def load_encoder(model, source, name: str = "checkpoint") -> LoadReport:
    """Load the encoder of ``source`` (a path, a checkpoint dict or a state_dict) into ``model``
    (a :class:`fastmae.VisionTransformer`), as the official fine-tuning does; see the module doc."""
    src = read_source(source, name)
    label, state = src.label, dict(src.state)
    report = LoadReport(source=label, format=src.format)
    check_architecture(model, state, label)
    own = model.state_dict()

    for k in [k for k in state if k.startswith(DECODER_PREFIXES)]:
        report.dropped[k] = "the pre-training decoder (or MaskAlign adapters)"
        del state[k]
    final, other = ("fc_norm", "norm") if model.global_pool else ("norm", "fc_norm")
    for k in [k for k in state if k.startswith(other + ".")]:
        report.dropped[k] = ("global pooling normalises the pooled tokens with fc_norm instead, as the official code"
                             if model.global_pool else "this model takes the cls token through norm")
        del state[k]
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    if head and not (set(head) == {k for k in own if k.startswith("head.")}
                     and all(v.shape == own[k].shape for k, v in head.items())):
        for k in head:
            report.dropped[k] = f"a head of another shape or kind than this model's ({model.num_classes} classes)"
            del state[k]
    src_grid = _source_grid(src, model.patch_embed.patch_size[0]) if "pos_embed" in state else None
    if src_grid is not None and src_grid != tuple(model.patch_embed.grid_size):
        grid, old = "x".join(map(str, model.patch_embed.grid_size)), "x".join(map(str, src_grid))
        if _is_sincos(state["pos_embed"], src_grid):
            state["pos_embed"] = sincos_pos_embed_like(model).to(state["pos_embed"].dtype)
            report.resized["pos_embed"] = f"the fixed sin-cos table regenerated for the {grid} grid (was {old})"
        else:
            try:
                interpolate_pos_embed(model, state, grid=src_grid)
            except ValueError as e:
                raise CheckpointError(f"{label}: {e}") from None
            report.resized["pos_embed"] = f"interpolated bicubically to the {grid} grid from {old}"
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{label} holds weights this model has no place for: {_short(unexpected)}")
    missing = sorted(set(own) - set(state))
    allowed = ("head.", final + ".")
    not_allowed = [k for k in missing if not k.startswith(allowed)]
    if not_allowed:
        raise CheckpointError(f"{label} lacks encoder weights: {_short(not_allowed)}")
    model.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    head_missing = [k for k in missing if k.startswith("head.")]
    for k in missing:
        report.initialised[k] = ("the head, initialised as the official fine-tuning does" if k.startswith("head.")
                                 else f"{final} starts at ones and zeros, as the official fine-tuning")
    if head_missing:
        model.init_head(std=0.01 if isinstance(model.head, torch.nn.Sequential) else 2e-5)
    return report


def _eps_notes(src: Source, model) -> list[str]:
    """A Hugging Face config whose ``layer_norm_eps`` is not the model's is worth a line: its default
    (1e-12) is not the official recipe's 1e-6, and the outputs differ slightly."""
    hf = src.meta.get("hf_config")
    eps = (getattr(model, "final_norm", None) or model.norm).eps
    if hf and float(hf.get("layer_norm_eps", 1e-12)) != eps:
        return [f"its config.json has layer_norm_eps={hf.get('layer_norm_eps', 1e-12)}, this model {eps} (the "
                f"official recipe's): outputs differ slightly from the Hugging Face model's"]
    return []


def load_pretrained(model, source, name: str = "checkpoint") -> LoadReport:
    """Load ``source`` into ``model`` whatever its format: a fastmae, official (pre-training, encoder-only
    or fine-tuned), Hugging Face ViTMAE (either key layout; a model folder, ``.safetensors`` or
    state_dict) or timm checkpoint, detected from its keys and files.

    - A classifier (:class:`fastmae.VisionTransformer`) gets the encoder as the official fine-tuning
      loads it (:func:`load_encoder`).
    - An MAE (:class:`fastmae.MaskedAutoencoderViT`, fast or reference) gets every weight; a
      checkpoint without the decoder leaves the decoder at its initialisation, a classifier's head is
      dropped, and a fixed sin-cos table of another grid is regenerated for the model's.

    Returns a :class:`LoadReport`: what was loaded, resized, initialised and dropped, and why."""
    from .vit import VisionTransformer

    src = read_source(source, name)
    if isinstance(model, VisionTransformer):
        report = load_encoder(model, src, name)
    else:
        report = _load_mae(model, src)
    report.notes += _eps_notes(src, model)
    return report


def _load_mae(model, src: Source) -> LoadReport:
    state, own, label = dict(src.state), model.state_dict(), src.label
    report = LoadReport(source=label, format=src.format)
    for k in [k for k in state if k.startswith(("head.", "fc_norm."))]:
        report.dropped[k] = "a classifier's; an MAE has none"
        del state[k]
    for key in ("pos_embed", "decoder_pos_embed"):
        if key in state and key in own and state[key].shape != own[key].shape:
            grid = tuple(model.patch_embed.grid_size)
            side = int(round((state[key].shape[-2] - 1) ** 0.5))
            if not _is_sincos(state[key], (side, side)):
                raise CheckpointError(f"{label}: {key} is a learned table for another grid; an MAE's is the fixed "
                                      f"sin-cos table")
            state[key] = own[key]
            report.resized[key] = f"the fixed sin-cos table regenerated for the {grid[0]}x{grid[1]} grid"
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{label} holds weights this MAE has no place for: {_short(unexpected)}")
    wrong = [k for k in state if state[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{label} holds another architecture than this MAE: {_short(wrong)} differ in shape; "
                              f"build the model with the checkpoint's configuration")
    missing = sorted(set(own) - set(state))
    not_allowed = [k for k in missing if not k.startswith(DECODER_PREFIXES + ("norm.",))]
    if not_allowed:
        raise CheckpointError(f"{label} lacks encoder weights: {_short(not_allowed)}")
    model.load_state_dict(state, strict=False)
    report.loaded = sorted(state)
    for k in missing:
        report.initialised[k] = ("the checkpoint has no decoder: left at this model's initialisation"
                                 if k.startswith(DECODER_PREFIXES) else "the checkpoint has no final norm")
    return report
