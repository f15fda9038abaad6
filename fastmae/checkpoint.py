"""Checkpoints: atomic save, validated load, and the model rebuilt from its stored configuration.

A checkpoint is one ``torch.save`` file (loadable with ``weights_only=True``) holding

- ``model``: the state_dict with the official keys (loads into the official
  ``models_mae.MaskedAutoencoderViT`` with ``strict=True``);
- ``model_config``: the constructor arguments, so the model can be rebuilt from the file alone;
- ``optimizer``, ``scaler`` (fp16 GradScaler state or None), ``epoch`` (the epoch in progress),
  ``epoch_iter`` (data batches of that epoch already consumed), ``step`` (optimizer steps so far),
  ``meters`` (running sums for the epoch's log line), ``nonfinite`` (consecutive skipped steps);
- ``dataset_len`` and ``position_settings`` (batch size, accumulation, seed, process count): what
  fixes a mid-epoch position, checked by :func:`check_resume`;
- ``args``: the command-line arguments as a dict; ``rng``: the torch, CUDA, numpy and python
  RNG states;
- ``format`` / ``version``: what this file is.

The training engine (:mod:`fastmae.engine`) writes them; this module reads, checks and rebuilds.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the
target: a crash leaves either the old or the new checkpoint, never half of one. Reads verify the
CRC-32 of every record of the archive before unpickling, so damaged bytes are an error, not
silently wrong weights.
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch

FORMAT = "fastmae-checkpoint"
VERSION = 1
LAST = "checkpoint-last.pth"
REQUIRED_KEYS = ("model", "model_config", "optimizer", "scaler", "epoch", "epoch_iter", "step",
                 "args", "rng")
# Constructor arguments stored in ``model_config`` (norm_layer is always LayerNorm(eps)).
CONFIG_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
               "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio",
               "norm_pix_loss", "layer_norm_eps")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, not a fastmae checkpoint, or does not fit the run."""


# ---------------------------------------------------------------------------- model config
# Model kinds defined outside the core (their module registers them when imported, which
# ``import fastmae`` does): kind -> (class, ``build(config, reference_impl=..., **kwargs)``).
_KINDS: dict = {}


def register_kind(kind: str, cls: type, build) -> None:
    """Let checkpoints hold models of ``cls``: ``model.config()`` (with ``kind``) is stored, and
    ``build`` rebuilds the model from it."""
    _KINDS[kind] = (cls, build)


def model_config(model) -> dict:
    """The constructor arguments of an MAE (fast or reference), of a classifier
    (:class:`fastmae.VisionTransformer`, ``kind="vit"``) or of a VideoMAE (``kind="videomae"``), as
    plain Python values."""
    from .video import PretrainVisionTransformer
    from .vit import VisionTransformer

    if isinstance(model, (VisionTransformer, *(cls for cls, _ in _KINDS.values()))):
        return model.config()
    if isinstance(model, PretrainVisionTransformer):
        return videomae_config(model)
    pe = model.patch_embed
    blocks, dblocks = model.blocks, model.decoder_blocks
    return dict(
        img_size=list(pe.img_size), patch_size=pe.patch_size[0], in_chans=model.in_chans,
        embed_dim=model.cls_token.shape[-1], depth=len(blocks),
        num_heads=blocks[0].attn.num_heads if len(blocks) else 1,
        decoder_embed_dim=model.mask_token.shape[-1], decoder_depth=len(dblocks),
        decoder_num_heads=dblocks[0].attn.num_heads if len(dblocks) else 1,
        mlp_ratio=(blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features) if len(blocks) else 4.0,
        norm_pix_loss=bool(model.norm_pix_loss), layer_norm_eps=float(model.norm.eps),
    )


def videomae_config(model) -> dict:
    """The constructor arguments of a :class:`fastmae.video.PretrainVisionTransformer` (``kind="videomae"``)."""
    enc, dec, pe = model.encoder, model.decoder, model.encoder.patch_embed
    blocks = enc.blocks
    return dict(
        kind="videomae", img_size=list(pe.img_size), patch_size=pe.patch_size[0], num_frames=pe.num_frames,
        tubelet_size=pe.tubelet_size, encoder_in_chans=model.in_chans, encoder_embed_dim=pe.proj.out_channels,
        encoder_depth=len(blocks), encoder_num_heads=blocks[0].attn.num_heads if len(blocks) else 1,
        decoder_embed_dim=model.mask_token.shape[-1], decoder_depth=len(dec.blocks),
        decoder_num_heads=dec.blocks[0].attn.num_heads if len(dec.blocks) else 1,
        decoder_num_classes=dec.head.out_features,
        mlp_ratio=(blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features) if len(blocks) else 4.0,
        qkv_bias=bool(len(blocks) and blocks[0].attn.q_bias is not None), layer_norm_eps=float(enc.norm.eps),
    )


VIDEOMAE_CONFIG_KEYS = ("img_size", "patch_size", "num_frames", "tubelet_size", "encoder_in_chans",
                        "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim",
                        "decoder_depth", "decoder_num_heads", "decoder_num_classes", "mlp_ratio", "qkv_bias")


def build_model(config: dict, reference_impl: bool = False, **kwargs):
    """An MAE, a classifier when ``config["kind"] == "vit"``, or a VideoMAE when it is ``"videomae"``,
    from a stored ``model_config`` (``reference_impl=True``: on the plain reference blocks)."""
    from functools import partial

    from . import reference
    from .model import MaskedAutoencoderViT

    if config.get("kind") == "vit":
        from .vit import VisionTransformer

        return VisionTransformer.from_config(config, reference_impl=reference_impl, **kwargs)
    if config.get("kind") in _KINDS:
        try:
            return _KINDS[config["kind"]][1](config, reference_impl=reference_impl, **kwargs)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if config.get("kind") == "videomae":
        from .video import PretrainVisionTransformer

        missing = [k for k in (*VIDEOMAE_CONFIG_KEYS, "layer_norm_eps") if k not in config]
        if missing:
            raise CheckpointError(f"VideoMAE model configuration lacks {', '.join(missing)}")
        cfg = {k: config[k] for k in VIDEOMAE_CONFIG_KEYS}
        cfg["img_size"] = tuple(cfg["img_size"]) if isinstance(cfg["img_size"], (list, tuple)) else cfg["img_size"]
        return PretrainVisionTransformer(**cfg, norm_layer=partial(torch.nn.LayerNorm, eps=config["layer_norm_eps"]),
                                         reference_impl=reference_impl, **kwargs)

    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"model configuration lacks {', '.join(missing)}")
    cfg = {k: config[k] for k in CONFIG_KEYS if k != "layer_norm_eps"}
    if isinstance(cfg["img_size"], (list, tuple)):
        cfg["img_size"] = tuple(cfg["img_size"])
    cfg["norm_layer"] = partial(torch.nn.LayerNorm, eps=config["layer_norm_eps"])
    cls = reference.MaskedAutoencoderViT if reference_impl else MaskedAutoencoderViT
    return cls(**cfg, **kwargs)


# ---------------------------------------------------------------------------- RNG states
def rng_states() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])
    n = states["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------------------- save / load
def _temporary(path: str) -> str:
    """The temporary file a write of ``path`` goes through (hidden, same folder, this process)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")


def _write_atomic(path: str, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed over it, the
    rename made durable. Any failure leaves ``path`` as it was and no temporary file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_atomic(obj, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file, fsync and rename."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    _write_atomic(path, write)


def copy_atomic(src: str, dst: str) -> None:
    """Make ``dst`` a copy of ``src`` (a hard link when the file system allows), atomically."""
    def write(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())

    _write_atomic(dst, write)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary checkpoint files (``.checkpoint-*.pth.tmp<pid>``) that processes no
    longer running left in ``folder`` (a run killed in the middle of a save); returns their paths.
    Nothing else is touched."""
    removed = []
    candidates = [p for pattern in (".checkpoint-*.pth.tmp*", "checkpoint-*.pth.tmp*")  # glob's * skips dot files
                  for p in glob.glob(os.path.join(glob.escape(folder), pattern))]
    for tmp in candidates:
        m = re.fullmatch(r"\.?checkpoint-[^/]*\.pth\.tmp(\d+)", os.path.basename(tmp))
        if m is None or _process_alive(int(m.group(1))):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def check_file(path: str) -> None:
    """A checkpoint path must name an existing, non-empty file."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")


def _legacy_format(path: str) -> bool:
    """Whether the file is in torch's pre-1.6 format (a bare pickle stream beginning with torch's
    magic number, no zip archive and so no CRC to check); torch.load still reads it."""
    with open(path, "rb") as f:
        return f.read(4) == b"\x80\x02\x8a\x0a"


def _check_crc(path: str) -> None:
    """``torch.save`` writes a zip archive with a CRC-32 per record, which ``torch.load`` does not
    verify: a flipped bit in tensor data would load silently. Check every record's CRC first."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError,
            NotImplementedError) as e:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or truncated and cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: the record {bad!r} does not match its "
                              f"stored CRC-32 checksum")


def read(path: str, map_location="cpu"):
    """Read any checkpoint file safely: checked for existence, emptiness and damaged bytes, then
    ``torch.load(weights_only=True)`` (no code runs from the file; an ``argparse.Namespace``, as
    the official scripts store their args, is allowed). :class:`CheckpointError` says what is wrong."""
    check_file(path)
    if not _legacy_format(path):
        _check_crc(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated and cannot be read "
                                  f"(UnpicklingError: {_first_line(e)})") from None
        raise CheckpointError(
            f"{path!r} holds Python objects that a safe (weights-only) load refuses, so it is not a "
            f"checkpoint fastmae reads ({_first_line(e)}); if you trust the file, load it yourself with "
            f"torch.load(weights_only=False) and save its state_dict") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or truncated and cannot be read "
            f"({type(e).__name__}: {_first_line(e)})") from None


def load(path: str, map_location="cpu") -> dict:
    """Read and check a fastmae checkpoint; :class:`CheckpointError` says what is wrong."""
    ckpt = read(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is not a fastmae checkpoint (no format={FORMAT!r} marker); "
            f"only files written by fastmae's training commands can be resumed or visualized")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {ckpt.get('version')}, "
                              f"this fastmae reads version {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing and "model" in ckpt and "model_config" in ckpt and not {"optimizer", "epoch", "step"} & set(ckpt):
        raise CheckpointError(f"{path!r} holds weights only (as fastmae convert writes them), no training state: "
                              f"a run cannot resume from it, but it can start one (--finetune, or --resume with "
                              f"--eval)")
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: it lacks {', '.join(missing)}")
    return ckpt


def stored_kind(path: str) -> str | None:
    """The ``model_config`` kind of a fastmae checkpoint file (``"vit"``, ``"videomae"``; ``"mae"``
    without one), None for anything else: a cheap look (memory-mapped, tensors not read), no checks."""
    if not os.path.isfile(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not this function's to diagnose: the loaders report it
        return None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    return (obj.get("model_config") or {}).get("kind", "mae")


def _first_line(e: Exception) -> str:
    """The first line of an exception's message, without terminal colour codes."""
    text = str(e).splitlines()[0] if str(e) else ""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def plain_args(args) -> dict:
    """``vars(args)`` with every value a weights-only load accepts: non-plain values (a
    ``pathlib.Path`` from a Python caller, say) become strings."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return type(v)(plain(x) for x in v)
        return str(v)

    return {k: plain(v) for k, v in vars(args).items()}


def check_state_dict(model, state: dict, path: str) -> None:
    """Raise unless ``state`` has exactly the model's keys with the same shapes (checked before
    anything is copied, so a mismatch never leaves a half-loaded model)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"shape mismatches {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not fit the model: " + "; ".join(problems))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path!r} holds non-finite weights in {bad[:5]}")


def check_resume(ckpt: dict, path: str, *, model, model_config: dict, model_flags: str, optimizer,
                 dataset_len: int, position_settings: dict) -> None:
    """Everything that must match before a run resumes from ``ckpt`` (checked before anything is
    loaded, so a refused resume never leaves a half-loaded model or optimizer): the model's
    configuration (``model_flags`` name the flags that fix it), its state_dict, the optimizer's
    parameter groups and, for a checkpoint taken mid-epoch, the ``position_settings`` and the
    number of samples that fix the position within the epoch."""
    have = ckpt["model_config"]
    diff = [f"{k}: checkpoint {have.get(k)!r} vs this run {model_config[k]!r}"
            for k in model_config if have.get(k) != model_config[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {path!r} was trained with a different model ({'; '.join(diff)}); pass the "
            f"same {model_flags}, or a new --output_dir to start afresh")
    check_state_dict(model, ckpt["model"], path)
    sizes = [len(g["params"]) for g in ckpt["optimizer"].get("param_groups", [])]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != own:
        raise CheckpointError(
            f"checkpoint {path!r}: optimizer parameter groups of sizes {sizes} do not match this "
            f"model's {own}")
    if not ckpt["epoch_iter"]:
        return  # at an epoch's start any batch size, seed or process count can go on
    stored = ckpt.get("position_settings")
    if stored is None:  # written before they were stored: from its arguments and global batch
        a = ckpt.get("args") or {}
        per_process = (a.get("batch_size") or 0) * (a.get("accum_iter") or 0)
        stored = {"--batch_size": a.get("batch_size"), "--accum_iter": a.get("accum_iter"), "--seed": a.get("seed"),
                  "process count": (ckpt.get("global_batch") or 0) // per_process if per_process else None}
    stored = dict(stored, samples=ckpt.get("dataset_len"))
    diff = [f"{k}: checkpoint {stored.get(k)!r} vs this run {v!r}"
            for k, v in dict(position_settings, samples=dataset_len).items() if stored.get(k) != v]
    if diff:
        raise CheckpointError(
            f"checkpoint {path!r} stopped mid-epoch (batch {ckpt['epoch_iter']} of epoch {ckpt['epoch']}) "
            f"with other settings ({'; '.join(diff)}): resuming there needs the same data, --batch_size, "
            f"--accum_iter, --seed and process count, or the batches of that epoch would be skipped or "
            f"seen twice")


def run_checkpoints(output_dir: str) -> list[str]:
    """The checkpoints a run writes in ``output_dir``: ``checkpoint-last.pth`` and the numbered
    ``checkpoint-<epoch>.pth`` archives that exist."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, name) for name in os.listdir(output_dir)
                  if name == LAST or re.fullmatch(r"checkpoint-(\d+)\.pth", name))


def latest(output_dir: str) -> str | None:
    """The newest checkpoint in ``output_dir``: ``checkpoint-last.pth`` (rewritten whenever any
    checkpoint is), else the highest-numbered ``checkpoint-<epoch>.pth``; None when there is none."""
    last = os.path.join(output_dir, LAST)
    if os.path.isfile(last):
        return last
    numbered = []
    for p in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*.pth")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pth", os.path.basename(p))
        if m:
            numbered.append((int(m.group(1)), p))
    return max(numbered)[1] if numbered else None
