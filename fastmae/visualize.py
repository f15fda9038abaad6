"""Reconstruction pictures, as in the official MAE demo.

One row per image: original | masked (what the encoder sees) | reconstruction | reconstruction
with the visible patches pasted back. For a model trained with ``norm_pix_loss`` the predictions
are per-patch normalised pixels; they are un-normalised with the mean and variance of the
corresponding patch of the original image (the statistics the loss normalised the target with),
and the caption says so.
"""
from __future__ import annotations

import os

import torch

from . import checkpoint as ckpt_io
from . import data, masking, pretrained
from ._checks import num_kept
from .distributed import parse_device

COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")
GRAY = 0.5  # colour of removed patches in the "masked" column (in [0, 1] display space)


def embedded_images(names=data.EMBEDDED_PREVIEW):
    """[(name, PIL image)] for a few of the embedded photographs."""
    return [(n, data.load_embedded_image(n)) for n in names]


def load_images(paths):
    """[(file name, PIL image)] for image files, with a clear error for a missing/unreadable one."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"--image {p!r} does not exist")
        try:
            with Image.open(p) as im:
                out.append((os.path.basename(p), im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--image {p!r} is not a readable image ({e})") from None
    return out


@torch.no_grad()
def reconstruct(model, images: torch.Tensor, mask_ratio: float, seed: int = 0, mask_type: str = "random"):
    """Normalised images [N, C, H, W] -> dict of display-ready [N, C, H, W] tensors in [0, 1]
    (``original``, ``masked``, ``reconstruction``, ``pasted``) and the per-image loss. The masks are
    drawn by ``mask_type`` (:class:`fastmae.masking.ImageMasking`) from a generator seeded by ``seed``."""
    model.eval()
    N = images.shape[0]
    L = model.patch_embed.num_patches
    gen = torch.Generator().manual_seed(seed)
    if mask_type == "random":
        noise = torch.rand(N, L, generator=gen)
    else:
        draw = masking.ImageMasking(mask_type, tuple(model.patch_embed.grid_size), mask_ratio)
        noise = torch.stack([draw(gen) for _ in range(N)])
    noise = noise.to(images.device)
    _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    target = model.patchify(images)
    if model.norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        per_patch = ((pred - (target - mean) / (var + 1e-6) ** 0.5) ** 2).mean(-1)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    else:
        per_patch = ((pred - target) ** 2).mean(-1)
    loss = (per_patch * mask).sum(1) / mask.sum(1)
    rec = model.unpatchify(pred)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]).to(pred.dtype))
    mean_t = torch.tensor(data.IMAGENET_MEAN, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(data.IMAGENET_STD, device=images.device).view(1, -1, 1, 1)

    def show(x):
        return (x * std_t + mean_t).clamp(0, 1).cpu()

    return {
        "original": show(images),
        "masked": (show(images) * (1 - m.cpu()) + GRAY * m.cpu()),
        "reconstruction": show(rec),
        "pasted": show(images * (1 - m) + rec * m),
        "loss": loss.cpu(),
    }


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(draw, text, font, width):
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    return lines + ([cur] if cur else [])


def render(out: dict, names, caption: str, tile: int = 192):
    """The picture: a title/caption block, column headers, then one row of four tiles per image."""
    from PIL import Image, ImageDraw

    to_pil = lambda t: Image.fromarray((t.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))  # noqa: E731
    H, W = out["original"].shape[-2:]
    scale = max(1, round(tile / max(H, W)))
    th, tw = H * scale, W * scale
    pad, head_h = 8, 22
    font, small = _font(15), _font(13)
    width = pad + 4 * (tw + pad)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_lines = [ln for para in caption.split("\n") for ln in _wrap(probe, para, small, width - 2 * pad)]
    cap_h = pad + 17 * len(cap_lines) + pad
    row_h = th + 20 + pad
    img = Image.new("RGB", (width, cap_h + head_h + len(names) * row_h), "white")
    d = ImageDraw.Draw(img)
    for i, ln in enumerate(cap_lines):
        d.text((pad, pad + 17 * i), ln, fill="black", font=small)
    for c, name in enumerate(COLUMNS):
        x = pad + c * (tw + pad)
        d.text((x + tw / 2, cap_h + head_h / 2), name, fill="black", font=font, anchor="mm")
    keys = ("original", "masked", "reconstruction", "pasted")
    for r, name in enumerate(names):
        y = cap_h + head_h + r * row_h
        for c, k in enumerate(keys):
            x = pad + c * (tw + pad)
            img.paste(to_pil(out[k][r]).resize((tw, th), Image.NEAREST), (x, y))
        d.text((pad, y + th + 3), f"{name}   loss on removed patches {out['loss'][r]:.3f}", fill="#333333", font=small)
    return img


def caption_for(model, mask_ratio: float, seed: int, title: str | None = None, mask_type: str = "random") -> str:
    L = model.patch_embed.num_patches
    K = num_kept(L, mask_ratio)
    p = model.patch_embed.patch_size[0]
    H, W = model.patch_embed.img_size
    kind = "" if mask_type == "random" else f"{mask_type} masking, "
    lines = [f"MAE reconstructions{f' ({title})' if title else ''}: {H}x{W} images, {p}x{p} patches, "
             f"{kind}mask ratio {mask_ratio:g} ({K} of {L} patches visible to the encoder, removed ones "
             f"shown grey; masks drawn with seed {seed}). The loss covers only removed patches, so the "
             f"reconstruction of visible ones is untrained; the last column pastes the visible input back."]
    if model.norm_pix_loss:
        lines.append("Trained with norm_pix_loss: the model predicts each patch normalised by its own mean "
                     "and variance; for display the predictions are un-normalised with the mean and variance "
                     "of the original image's patch, which the model did not see for removed patches.")
    return "\n".join(lines)


def save_grid(model, images, path: str, mask_ratio: float = 0.75, seed: int = 0, device="cpu",
              title: str | None = None, mask_type: str = "random") -> str:
    """Write the picture for ``images`` ([(name, PIL image)]) to ``path`` (PNG); returns the path."""
    if not images:
        raise ValueError("no images to visualize")
    H, W = model.patch_embed.img_size
    if H != W:
        raise ValueError(f"pictures need a square model input, got {H}x{W}")
    tf = data.eval_transform(H)
    batch = torch.stack([tf(im) for _, im in images]).to(device)
    was_training = model.training
    out = reconstruct(model, batch, mask_ratio, seed, mask_type)
    model.train(was_training)
    pic = render(out, [n for n, _ in images], caption_for(model, mask_ratio, seed, title, mask_type))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    pic.save(path)
    return path


def visualize(checkpoint: str, image_paths=None, out: str | None = None, mask_ratio: float | None = None,
              seed: int = 0, device: str = "cpu", mask_type: str | None = None) -> str:
    """``fastmae visualize``: the picture for a checkpoint; returns the PNG path (a VideoMAE
    checkpoint's clips are drawn by :func:`fastmae.video_train.visualize`)."""
    device = parse_device(device)  # a clear error for a bad or unavailable --device
    if ckpt_io.stored_kind(checkpoint) == "videomae":  # its pictures are drawn by fastmae.video_train
        raise ckpt_io.CheckpointError(f"{checkpoint!r} holds a VideoMAE: draw its clips with "
                                      f"fastmae.video_train.visualize (the command line does)")
    model, ckpt = pretrained.load_model(checkpoint, device=device)
    if ckpt["model_config"].get("kind") == "vit":
        raise ckpt_io.CheckpointError(f"{checkpoint!r} holds a classifier (from fastmae finetune or linprobe), which "
                                      f"has no decoder to reconstruct with: pass a pre-training checkpoint")
    if ckpt["model_config"].get("kind") == "maskalign":
        raise ckpt_io.CheckpointError(f"{checkpoint!r} holds a MaskAlign student, which aligns features and has no "
                                      f"decoder to reconstruct pixels with: evaluate it with fastmae knn or linprobe")
    if mask_type is None:  # the masking it was trained with
        mask_type = ckpt["args"].get("mask_type") or "random"
        mask_type = mask_type if mask_type in masking.IMAGE_MASK_TYPES else "random"
    if mask_ratio is None:
        mask_ratio = float(ckpt["args"].get("mask_ratio", 0.75))
    images = load_images(image_paths) if image_paths else embedded_images()
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "reconstruction.png")
    name = ckpt["args"].get("model", "MAE")
    return save_grid(model, images, out, mask_ratio=mask_ratio, seed=seed, device=device,
                     title=name if ckpt["step"] is None else f"{name}, step {ckpt['step']}", mask_type=mask_type)
