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
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError
from .pos_embed import get_2d_sincos_pos_embed
from .vit import VIT_CONFIGS, interpolate_pos_embed, sincos_pos_embed_like

DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass
class LoadReport:
    """What :func:`load_encoder` did: key lists and, for what was not loaded as it was, why."""
    source: str
    format: str
    loaded: list = field(default_factory=list)
    initialised: dict = field(default_factory=dict)  # key -> why it keeps the model's initialisation
    dropped: dict = field(default_factory=dict)  # key -> why the checkpoint's value was not used
    resized: dict = field(default_factory=dict)  # key -> how it was fitted to the model

    def lines(self) -> list[str]:
        out = [f"loaded {len(self.loaded)} tensors from {self.source} ({self.format})"]
        for title, what in (("resized", self.resized), ("initialised", self.initialised), ("dropped", self.dropped)):
            for reason, keys in _by_reason(what).items():
                out.append(f"  {title}: {_short(keys)} ({reason})")
        return out

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
    """A checkpoint read by :func:`read_source`: its weights, its format, what describes its model
    (``meta``: a fastmae ``model_config`` or the official ``args``) and its name in messages."""
    state: dict
    format: str
    meta: dict
    label: str


def read_source(source, name: str = "checkpoint") -> Source:
    """Read a path, an in-memory checkpoint or a state_dict (a :class:`Source` is returned as it is)."""
    if isinstance(source, Source):
        return source
    label = source if isinstance(source, str) else f"the given {name}"
    obj = ckpt_io.read(source) if isinstance(source, str) else source
    meta: dict = {}
    if isinstance(obj, dict) and obj.get("format") == ckpt_io.FORMAT:
        state, meta = obj.get("model"), {"model_config": obj.get("model_config") or {}}
        kind = "fine-tuning" if meta["model_config"].get("kind") == "vit" else "pre-training"
        fmt = f"fastmae {kind} checkpoint"
    elif isinstance(obj, dict) and "model" in obj and _is_state_dict(obj["model"]):
        state, fmt = obj["model"], "official checkpoint"
        args = obj.get("args")
        meta = {"args": vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})}
    elif _is_state_dict(obj):
        state, fmt = obj, "state_dict"
    else:
        raise CheckpointError(f"{label} is neither a checkpoint with a 'model' state_dict nor a state_dict")
    if not _is_state_dict(state):
        raise CheckpointError(f"{label} holds no weights")
    if any(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state or "cls_token" not in state:
        raise CheckpointError(f"{label} does not hold a ViT encoder (no patch_embed.proj.weight / cls_token); "
                              f"its keys begin {list(state)[:4]}")
    if fmt != "state_dict" and not fmt.startswith("fastmae"):
        fmt = ("official pre-training checkpoint" if any(k.startswith(DECODER_PREFIXES) for k in state)
               else "official fine-tuned checkpoint" if "head.weight" in state
               else "official encoder-only pre-training checkpoint")
    return Source(state, fmt, meta, label)


def encoder_config(source: Source) -> dict:
    """The classifier configuration a checkpoint's encoder needs: ``patch_size``, ``embed_dim``,
    ``depth``, ``num_heads``, ``mlp_ratio``, ``in_chans``, ``img_size``, from the stored
    configuration, else the official ``args.model``, else the weights' shapes (the head count
    then from the known configuration of that width, depth and patch size)."""
    state, meta = source.state, source.meta
    proj = state["patch_embed.proj.weight"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    cfg = dict(patch_size=proj.shape[-1], embed_dim=proj.shape[0], depth=depth, in_chans=proj.shape[1],
               mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / proj.shape[0] if depth else 4.0)
    mc = meta.get("model_config")
    args = meta.get("args") or {}
    if mc:
        cfg["num_heads"] = mc["num_heads"]
        cfg["img_size"] = tuple(mc["img_size"]) if isinstance(mc["img_size"], (list, tuple)) else mc["img_size"]
        return cfg
    name = str(args.get("model", "")).replace("mae_", "", 1).replace("_dec512d8b", "")
    known = VIT_CONFIGS.get(name) or next(
        (c for c in VIT_CONFIGS.values() if (c["patch_size"], c["embed_dim"], c["depth"]) ==
         (cfg["patch_size"], cfg["embed_dim"], cfg["depth"])), None)
    cfg["num_heads"] = known["num_heads"] if known else None  # None: the caller must be told the model
    grid = int(round((state["pos_embed"].shape[-2] - 1) ** 0.5)) if "pos_embed" in state else 224 // cfg["patch_size"]
    cfg["img_size"] = args.get("input_size") or grid * cfg["patch_size"]
    return cfg


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
    size = (src.meta.get("model_config") or {}).get("img_size")
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
        report.dropped[k] = "the pre-training decoder"
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
