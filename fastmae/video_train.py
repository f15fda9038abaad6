"""VideoMAE pre-training with the official recipe (MCG-NJU/VideoMAE ``run_mae_pretraining.py``).

This module states the recipe (:class:`VideoPretraining`); :class:`fastmae.engine.Engine` runs it,
as it runs the image recipe of :mod:`fastmae.train`. The recipe: the model of
:mod:`fastmae.video` with ``--decoder_depth`` (4, the official script's default), tube masking at
``--mask_ratio`` (0.9), AdamW betas (0.9, 0.95) and weight decay 0.05 without decay on biases, norms
and the mask token, ``lr = blr * effective_batch / 256`` with linear warmup then half-cycle cosine
(:func:`fastmae.train.learning_rate`), and the official loss (:func:`fastmae.video.videomae_loss`,
targets normalised per tubelet unless ``--no-normlize_target``). Differences, each deliberate:

- the warmup starts at 0, not at the official ``--warmup_lr`` 1e-6 (the schedule of the image recipe);
- every random choice of a sample (its frames' start, its crop, its tube mask) is drawn from a
  generator seeded by ``(seed, epoch, index)`` (:func:`fastmae.data.sample_seed`), so runs are
  reproducible and a resumed run is bit-identical to an uninterrupted one;
- the batch carries the masks and the model is called with ``num_masked``, so it compiles.

Data. Without ``--data_path``: short clips synthesised from the bundled photographs
(:class:`PanningClips`): a camera panning and zooming across one photograph along a smooth random
path. With ``--data_path``: a folder of video files or a CSV list of them (:class:`VideoFiles`),
decoded with PyAV; ``--num_frames`` frames ``--sampling_rate`` apart from a random start, the
official multi-scale crop (side lengths from ``(1, .875, .75, .66)`` of the short side, no flip, as
the official pre-training augmentation), the same for every frame; a clip too short, or a file that
cannot be decoded, is skipped and counted like an unreadable image.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import checkpoint as ckpt_io
from . import data, train, video
from .engine import Engine, Recipe, Result

VIDEO_MODEL_NAMES = video.VIDEOMAE_NAMES
VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv")
DEFAULT_MASK_RATIO = 0.9  # the official scripts' --mask_ratio for video
EMBEDDED_CLIP_REPEATS = 8  # clips per photograph and epoch of the embedded default
CROP_SCALES = (1, .875, .75, .66)  # the official GroupMultiScaleCrop scales
PREVIEW = ("astronaut", "chelsea")  # the clips of the end-of-run picture


def is_video_model(name) -> bool:
    return name in VIDEO_MODEL_NAMES


# ---------------------------------------------------------------------------- model
def make_video_model(name: str, input_size: int, num_frames: int = 16, tubelet_size: int = 2, decoder_depth: int = 4,
                     attn_backend: str = "auto", **overrides) -> video.PretrainVisionTransformer:
    """The VideoMAE ``--model name`` built for ``--input_size`` and ``--num_frames``, with the errors
    named by their flags. ``overrides`` go to :func:`fastmae.video.create_videomae` (tests: a micro model)."""
    if name not in VIDEO_MODEL_NAMES:
        raise ValueError(f"unknown --model {name!r}; choose one of {', '.join(VIDEO_MODEL_NAMES)}")
    p = overrides.get("patch_size", video.videomae_config(name).get("patch_size", 16))
    for flag, v in (("--num_frames", num_frames), ("--tubelet_size", tubelet_size), ("--input_size", input_size),
                    ("--decoder_depth", decoder_depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if flag == "--decoder_depth" else 1):
            raise ValueError(f"{flag} must be a positive integer, got {v!r}")
    if num_frames % tubelet_size:
        raise ValueError(f"--num_frames {num_frames} is not divisible by --tubelet_size {tubelet_size}")
    if input_size % p:
        raise ValueError(f"--input_size {input_size} is not a multiple of the patch size {p} of {name}")
    return video.create_videomae(name, img_size=input_size, num_frames=num_frames, tubelet_size=tubelet_size,
                                 decoder_depth=decoder_depth, decoder_num_classes=3 * tubelet_size * p * p,
                                 attn_backend=attn_backend, **overrides)


def _grid(model) -> tuple[int, int, int, int, int]:
    """(T', h, w, patch, tubelet) of a VideoMAE."""
    pe = model.encoder.patch_embed
    return (*pe.grid_size, pe.patch_size[0], pe.tubelet_size)


def num_masked(model, mask_ratio: float) -> int:
    """The masked tubelets of every sample under tube masking (raises for a ratio masking none)."""
    t, h, w, _, _ = _grid(model)
    return int(video.tube_mask(t, h, w, mask_ratio).sum())


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames ``[T, H, W, C]`` -> the ImageNet-normalised float clip ``[C, T, H, W]``."""
    x = frames.permute(3, 0, 1, 2).float().div_(255)
    mean = torch.tensor(data.IMAGENET_MEAN).view(-1, 1, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(-1, 1, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------- data
def _uniform(gen, lo, hi) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


class PanningClips(Dataset):
    """The embedded default: for each clip a camera panning and zooming across one of the bundled
    photographs (each visited ``repeats`` times per epoch): square windows whose centre and side
    move from a random start to a random end along a smoothstep path, each resampled (bilinear,
    sub-pixel) to ``input_size``; the whole clip flipped with probability 1/2.
    ``clip(index, gen)`` -> uint8 frames ``[num_frames, input_size, input_size, 3]``."""

    def __init__(self, num_frames: int, input_size: int, names=data.EMBEDDED_IMAGES,
                 repeats: int = EMBEDDED_CLIP_REPEATS, max_side: int = 256):
        from PIL import Image

        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.names, self.repeats = tuple(names), repeats
        self.num_frames, self.input_size = num_frames, input_size
        self.images = [data.load_embedded_image(n) for n in self.names]
        for im in self.images:  # smaller sources make every frame cheap
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)

    def __len__(self):
        return len(self.images) * self.repeats

    def clip(self, index: int, gen: torch.Generator) -> torch.Tensor:
        from PIL import Image

        im = self.images[index % len(self.images)]
        W, H = im.size
        short = min(W, H)
        side0 = _uniform(gen, 0.35, 0.8) * short
        side1 = min(max(side0 * _uniform(gen, 0.7, 1.4), 0.25 * short), short)

        def centre(side):
            return _uniform(gen, side / 2, W - side / 2), _uniform(gen, side / 2, H - side / 2)

        (x0, y0), (x1, y1) = centre(side0), centre(side1)
        flip = _uniform(gen, 0, 1) < 0.5
        frames = []
        for t in range(self.num_frames):
            u = t / max(self.num_frames - 1, 1)
            u = u * u * (3 - 2 * u)  # smoothstep: the camera eases in and out
            side = side0 + (side1 - side0) * u
            cx, cy = x0 + (x1 - x0) * u, y0 + (y1 - y0) * u
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            frame = im.resize((self.input_size, self.input_size), Image.Resampling.BILINEAR, box=box)
            frames.append(np.asarray(frame.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else frame))
        return torch.from_numpy(np.stack(frames))

    def __repr__(self):
        return (f"embedded clips: a camera panning and zooming across {len(self.images)} scikit-image photographs "
                f"({self.repeats} clips each per epoch = {len(self)} clips of {self.num_frames} frames)")


def read_video_pyav(path: str) -> np.ndarray:
    """Every frame of a video file's first video stream as uint8 ``[F, H, W, 3]`` (PyAV)."""
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


def _default_reader():
    try:
        import av  # noqa: F401
    except ImportError:
        raise ValueError("--data_path with videos needs a video decoder: pip install av (PyAV); this torchvision "
                         "has no torchvision.io.read_video (its video decoding moved to torchcodec)") from None
    return read_video_pyav


def list_videos(data_path: str) -> list[tuple[str, int]]:
    """``[(path, label)]``: the video files under a folder (recursively, sorted), or the lines of a
    CSV list (``path`` or ``path,label`` / ``path label``; relative paths from the CSV's folder)."""
    if not os.path.exists(data_path):
        raise ValueError(f"--data_path {data_path!r} does not exist")
    if os.path.isdir(data_path):
        found = sorted(os.path.join(root, f) for root, _, files in os.walk(data_path) for f in files
                       if f.lower().endswith(VIDEO_EXTENSIONS))
        if not found:
            raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) found under {data_path!r}")
        return [(p, 0) for p in found]
    out, folder = [], os.path.dirname(os.path.abspath(data_path))
    with open(data_path, newline="") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = next(csv.reader([line])) if "," in line else line.split()
            if len(fields) > 2:
                raise ValueError(f"--data_path {data_path!r} line {n}: expected 'path' or 'path,label', got {line!r}")
            try:
                label = int(fields[1]) if len(fields) == 2 else 0
            except ValueError:
                if n == 1:  # a header line
                    continue
                raise ValueError(f"--data_path {data_path!r} line {n}: the label {fields[1]!r} is not an "
                                 f"integer") from None
            out.append((fields[0] if os.path.isabs(fields[0]) else os.path.join(folder, fields[0]), label))
    if not out:
        raise ValueError(f"--data_path {data_path!r} lists no videos")
    return out


class VideoFiles(Dataset):
    """Video files (:func:`list_videos`), sampled as VideoMAE pre-training does:
    ``clip(index, gen)`` -> ``num_frames`` frames ``sampling_rate`` apart from a random start, the
    official multi-scale crop (width and height each from ``CROP_SCALES`` of the short side, at
    most one scale step apart, at a random place; one crop for every frame), resized (bilinear) to
    ``input_size``. A clip shorter than ``num_frames * sampling_rate`` frames is refused with an error
    (the dataset wrapper skips and counts it). ``reader(path)`` -> uint8 ``[F, H, W, 3]`` (default: PyAV)."""

    def __init__(self, data_path: str, num_frames: int, sampling_rate: int, input_size: int, reader=None):
        if sampling_rate < 1:
            raise ValueError(f"--sampling_rate must be a positive integer, got {sampling_rate}")
        self.reader = reader or _default_reader()
        self.data_path = data_path
        self.samples = list_videos(data_path)
        self.num_frames, self.sampling_rate, self.input_size = num_frames, sampling_rate, input_size

    def __len__(self):
        return len(self.samples)

    def decode(self, index: int) -> np.ndarray:
        """The video's frames, uint8 ``[F, H, W, 3]`` (decoded once for ``--num_sample`` clips)."""
        return self.reader(self.samples[index][0])

    def clip(self, index: int, gen: torch.Generator, frames: np.ndarray | None = None) -> torch.Tensor:
        path = self.samples[index][0]
        frames = self.decode(index) if frames is None else frames
        span = self.num_frames * self.sampling_rate
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"{path}: expected frames [F, H, W, 3], got {tuple(frames.shape)}")
        if len(frames) < span:
            raise ValueError(f"{path} has {len(frames)} frames, fewer than --num_frames {self.num_frames} x "
                             f"--sampling_rate {self.sampling_rate} = {span}")
        start = int(torch.randint(0, len(frames) - span + 1, (), generator=gen))
        x = torch.from_numpy(np.ascontiguousarray(frames[start:start + span:self.sampling_rate]))
        H, W = x.shape[1:3]
        sizes = [int(min(H, W) * s) for s in CROP_SCALES]
        pairs = [(w, h) for i, w in enumerate(sizes) for j, h in enumerate(sizes) if abs(i - j) <= 1]
        cw, ch = pairs[int(torch.randint(len(pairs), (), generator=gen))]
        x0 = int(torch.randint(0, W - cw + 1, (), generator=gen))
        y0 = int(torch.randint(0, H - ch + 1, (), generator=gen))
        crop = x[:, y0:y0 + ch, x0:x0 + cw].permute(0, 3, 1, 2).float()
        crop = F.interpolate(crop, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return crop.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def __repr__(self):
        return f"{self.data_path} ({len(self)} videos)"


class ClipSamples(Dataset):
    """Key ``(index, epoch)`` -> ``(clip [C, T, H, W], mask [N] bool)`` (``, decode_mask`` with
    ``decoder_mask_ratio``; ``, skipped`` for files): the clip of ``base.clip`` normalised, its tube
    mask and VideoMAE V2's running-cell decoder mask, drawn from a generator seeded by
    :func:`fastmae.data.sample_seed` of the sample."""

    def __init__(self, base, grid: tuple[int, int, int], mask_ratio: float, seed: int, reports_skipped: bool,
                 decoder_mask_ratio: float = 0.0, num_sample: int = 1):
        if len(base) == 0:
            raise ValueError("the training dataset is empty")
        self.base, self.grid, self.mask_ratio, self.seed = base, grid, mask_ratio, seed
        self.reports_skipped, self.decoder_mask_ratio, self.num_sample = reports_skipped, decoder_mask_ratio, num_sample

    def __len__(self):
        return len(self.base)

    def _read(self, index: int, epoch: int):
        """``num_sample`` clips of one video (decoded once) and the generator they were drawn from."""
        gen = torch.Generator().manual_seed(data.sample_seed(self.seed, epoch, index))
        decoded = {"frames": self.base.decode(index)} if hasattr(self.base, "decode") else {}
        return [self.base.clip(index, gen, **decoded) for _ in range(self.num_sample)], gen

    def _masks(self, gen):
        out = [video.tube_mask(*self.grid, self.mask_ratio, generator=gen)]
        if self.decoder_mask_ratio:
            out.append(video.running_cell_mask(*self.grid, self.decoder_mask_ratio, generator=gen))
        return out

    def __getitem__(self, key):
        index, epoch = key
        if self.reports_skipped:  # an unreadable or too short video: the next one, counted
            (clips, gen), skipped = data.first_readable(self.base, index, lambda i: self._read(i, epoch))
        else:
            clips, gen = self._read(index, epoch)
        samples = [(normalize(c), *self._masks(gen)) for c in clips]
        # one sample as it is; --num_sample of them stacked (the recipe flattens them into the batch)
        out = samples[0] if self.num_sample == 1 else tuple(torch.stack(t) for t in zip(*samples))
        return (*out, skipped) if self.reports_skipped else out


# ---------------------------------------------------------------------------- the recipe
class VideoPretraining(Recipe):
    """``fastmae pretrain --model pretrain_videomae_*``: a VideoMAE learns to reconstruct the masked
    tubelets of its clips.

    ``base``: a clip source (``clip(index, gen)``, see :class:`PanningClips`) used instead of
    ``--data_path``; ``model_overrides``: arguments of :func:`fastmae.video.create_videomae`."""

    command = "pretrain"
    model_flags = "--model/--input_size/--num_frames/--tubelet_size/--decoder_depth/--normlize_target"
    output_files = ("reconstruction.png", "reconstruction.gif")

    def __init__(self, args, base=None, model_overrides: dict | None = None):
        self.args, self.base, self.overrides = args, base, dict(model_overrides or {})
        if getattr(args, "mask_ratio", None) is None:
            args.mask_ratio = DEFAULT_MASK_RATIO
        if getattr(args, "norm_pix_loss", False):
            raise ValueError("--norm_pix_loss is the image MAE's flag; VideoMAE normalises its targets by default "
                             "(--normlize_target, off with --no-normlize_target)")
        if isinstance(self.num_sample, bool) or self.num_sample < 1:
            raise ValueError(f"--num_sample must be a positive integer, got {args.num_sample}")

    @property
    def num_sample(self) -> int:
        return int(getattr(self.args, "num_sample", 1) or 1)

    @property
    def samples_per_item(self) -> int:  # the engine's batch count and lr rule
        return self.num_sample

    @property
    def decoder_mask_ratio(self) -> float:
        return float(getattr(self.args, "decoder_mask_ratio", 0.0) or 0.0)

    @property
    def normalize_target(self) -> bool:
        return bool(getattr(self.args, "normlize_target", True))

    def build_model(self):
        a = self.args
        model = make_video_model(a.model, a.input_size, a.num_frames, a.tubelet_size, a.decoder_depth,
                                 a.attn_backend, **self.overrides)
        self.num_masked = num_masked(model, a.mask_ratio)  # a clear error now, not at the first step
        self.grid = _grid(model)
        self.num_decoded = None
        if self.decoder_mask_ratio:  # VideoMAE V2's decoder masking: the decoder predicts ~decode_mask
            t, h, w = self.grid[:3]
            self.num_decoded = int((~video.running_cell_mask(t, h, w, self.decoder_mask_ratio, offset=0)).sum())
        return model

    def model_config(self, model) -> dict:
        return dict(ckpt_io.model_config(model), normalize_target=self.normalize_target)

    def optimizer(self, model):
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.AdamW(train.param_groups(model, self.args.weight_decay), lr=self.args.lr,
                                 betas=(0.9, 0.95), fused=fused)

    def train_set(self, model):
        a = self.args
        base, files = self.base, False
        if base is None:
            if a.data_path is None:
                base = PanningClips(a.num_frames, a.input_size)
            else:
                base, files = VideoFiles(a.data_path, a.num_frames, a.sampling_rate, a.input_size), True
        return ClipSamples(base, _grid(model)[:3], a.mask_ratio, a.seed, reports_skipped=files,
                           decoder_mask_ratio=self.decoder_mask_ratio, num_sample=self.num_sample)

    def learning_rate(self, epoch: float) -> float:
        return train.learning_rate(epoch, self.args)

    def loss(self, model, batch):
        if self.num_sample > 1:  # [B, num_sample, ...] -> [B * num_sample, ...]
            batch = [t.flatten(0, 1) for t in batch]
        videos, mask, *decode = batch
        decode_mask = decode[0] if decode else None
        outputs = model(videos, mask, num_masked=self.num_masked, decode_mask=decode_mask,
                        num_decoded=self.num_decoded)
        _, _, _, p, ts = self.grid
        return video.videomae_loss(videos, mask, outputs, p, ts, normalize_target=self.normalize_target,
                                   decode_mask=decode_mask)

    def describe(self, model, train_set) -> list[str]:
        a = self.args
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        t, h, w, p, ts = _grid(model)
        return [f"model {a.model} at {a.num_frames}x{a.input_size}x{a.input_size} ({n_params / 1e6:.2f}M trainable "
                f"parameters, decoder depth {len(model.decoder.blocks)}, tubelets {ts}x{p}x{p}: {t}x{h}x{w} = "
                f"{t * h * w}, tube mask ratio {a.mask_ratio} ({self.num_masked} masked), "
                f"normalize_target={self.normalize_target})",
                f"data: {train_set.base!r}" + ("" if a.data_path is None else f", every {a.sampling_rate} frames")]

    def finish(self, model, device, step: int) -> dict[str, str]:
        a = self.args
        if not (a.output_dir and getattr(a, "picture", True)):
            return {}
        png, gif = (os.path.join(a.output_dir, f) for f in self.output_files)
        save_clip_pictures(model, png, gif, mask_ratio=a.mask_ratio, normalize_target=self.normalize_target,
                           seed=a.seed, device=device, title=f"{a.model}, step {step}")
        return {"reconstructions": png, "animation": gif}


def pretrain(args, base=None, model_overrides: dict | None = None, on_step=None) -> Result:
    """Run VideoMAE pre-training as described by ``args`` (the ``fastmae pretrain`` namespace with a
    VideoMAE ``--model``). ``base``: a clip source instead of ``--data_path``; ``model_overrides``:
    arguments of :func:`fastmae.video.create_videomae`; ``on_step(step)``: after each optimizer step."""
    return Engine(args, VideoPretraining(args, base, model_overrides), on_step=on_step).run()


# ---------------------------------------------------------------------------- pictures
def _unpatchify(tubelets: torch.Tensor, grid) -> torch.Tensor:
    """``[B, N, C, ts*p*p]`` (token order, pixels in (dt, di, dj) order) -> ``[B, C, T, H, W]``."""
    t, h, w, p, ts = grid
    B, _, C, _ = tubelets.shape
    x = tubelets.reshape(B, t, h, w, C, ts, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, C, t * ts, h * p, w * p)


@torch.no_grad()
def reconstruct_clips(model, videos: torch.Tensor, masks: torch.Tensor, normalize_target: bool) -> dict:
    """Normalised clips ``[B, C, T, H, W]`` and their masks -> display-ready ``[B, C, T, H, W]`` in
    [0, 1] (``original``, ``masked``, ``prediction``: the masked tubelets predicted, the visible
    ones grey; ``pasted``: the prediction with the visible tubelets put back) and the per-clip loss.
    With ``normalize_target`` the predictions are un-normalised per tubelet and channel with the
    mean and std of the original tubelet, as the official visualisation does; without it,
    ``mean_colour_loss`` is the loss of predicting each clip's mean colour (of its visible
    tubelets) for every masked one: what a model that learnt no content gets."""
    was_training = model.training
    model.eval()
    try:
        out = model(videos, masks).float()
    finally:
        model.train(was_training)
    grid = _grid(model)
    t, h, w, p, ts = grid
    B, C = videos.shape[:2]
    N, M = masks.shape[1], out.shape[1]
    mean = torch.tensor(data.IMAGENET_MEAN, device=videos.device).view(-1, 1)
    std = torch.tensor(data.IMAGENET_STD, device=videos.device).view(-1, 1)
    all_ids = torch.arange(N, device=videos.device).expand(B, N)
    pix = video.gather_tubelets(videos.float(), all_ids, p, ts).view(B, N, C, -1) * std + mean  # [B, N, C, K]
    order = video.token_order(masks)[:, -M:]  # the masked tubelets, in the order of the outputs
    pred = out.view(B, M, -1, C).transpose(2, 3)  # [B, M, C, K]
    target = torch.gather(pix, 1, order[:, :, None, None].expand(-1, -1, C, pix.shape[-1]))
    if normalize_target:
        mu, sd = target.mean(-1, keepdim=True), target.var(-1, unbiased=True, keepdim=True).sqrt() + 1e-6
        loss = ((pred - (target - mu) / sd) ** 2).mean(dim=(1, 2, 3))
        pred = pred * sd + mu
    else:
        loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    m = masks[:, :, None, None].to(pix.dtype).expand_as(pix)
    colour = (pix * (1 - m)).sum(dim=(1, 3)) / ((1 - m).sum(dim=(1, 3)))  # [B, C] over the visible pixels
    extra = {} if normalize_target else {"mean_colour_loss": ((target - colour[:, None, :, None]) ** 2).mean(
        dim=(1, 2, 3)).cpu()}
    pred_full = pix.scatter(1, order[:, :, None, None].expand_as(pred), pred)
    grey = torch.full_like(pix, 0.5)
    show = lambda x: _unpatchify(x, grid).clamp(0, 1).cpu()  # noqa: E731
    return {"original": show(pix), "masked": show(pix * (1 - m) + grey * m),
            "prediction": show(pred_full * m + grey * (1 - m)), "pasted": show(pred_full), "loss": loss.cpu(),
            **extra}


ROWS = (("original", "original"), ("masked", "masked input"), ("prediction", "prediction (masked tubelets)"),
        ("pasted", "prediction + visible"))


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _to_pil(x: torch.Tensor, scale: int):
    from PIL import Image

    im = Image.fromarray((x.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def render_clips(out: dict, names, caption: str, tile: int = 112):
    """The PNG: per clip a block of four rows (``ROWS``) by ``T`` frames, and ``[GIF frames]``: per
    time step the four views of every clip side by side."""
    from PIL import Image, ImageDraw

    B, _, T, H, W = out["original"].shape
    scale = max(1, round(tile / max(H, W)))
    th, tw, pad, label_w = H * scale, W * scale, 4, 200
    font, small = _font(13), _font(12)
    cap_lines = caption.split("\n")
    cap_h = 8 + 16 * len(cap_lines)
    block_h = 18 + 4 * (th + pad) + 6
    width = max(label_w + T * (tw + pad) + pad, *(int(small.getlength(ln)) + 2 * pad for ln in cap_lines))
    png = Image.new("RGB", (width, cap_h + B * block_h), "white")
    d = ImageDraw.Draw(png)
    for i, ln in enumerate(cap_lines):
        d.text((pad, 4 + 16 * i), ln, fill="black", font=small)
    for b in range(B):
        y0 = cap_h + b * block_h
        head = f"{names[b]}   loss on masked tubelets {out['loss'][b]:.4f}"
        if "mean_colour_loss" in out:
            head += f" (the clip's mean colour would give {out['mean_colour_loss'][b]:.4f})"
        d.text((pad, y0 + 2), head, fill="#333333", font=font)
        for r, (key, label) in enumerate(ROWS):
            y = y0 + 18 + r * (th + pad)
            d.text((pad, y + th / 2), label, fill="black", font=small, anchor="lm")
            for f in range(T):
                png.paste(_to_pil(out[key][b, :, f], scale), (label_w + f * (tw + pad), y))
    gif = []
    for f in range(T):
        frame = Image.new("RGB", (4 * (tw + pad) + pad, B * (th + pad) + pad + 16), "white")
        fd = ImageDraw.Draw(frame)
        fd.text((pad, 2), f"frame {f + 1}/{T}: " + " | ".join(label for _, label in ROWS), fill="black", font=small)
        for b in range(B):
            for c, (key, _) in enumerate(ROWS):
                frame.paste(_to_pil(out[key][b, :, f], scale), (pad + c * (tw + pad), 16 + pad + b * (th + pad)))
        gif.append(frame)
    return png, gif


def preview_clips(model, mask_ratio: float, seed: int = 0, names=PREVIEW):
    """Fixed clips of the embedded photographs for ``model`` and their tube masks (seeded by ``seed``)."""
    t, h, w, p, ts = _grid(model)
    pe = model.encoder.patch_embed
    H, W = pe.img_size
    if H != W:
        raise ValueError(f"pictures need a square model input, got {H}x{W}")
    clips = PanningClips(pe.num_frames, H, names=names, repeats=1)
    videos, masks = [], []
    for i in range(len(clips)):
        gen = torch.Generator().manual_seed(data.sample_seed(seed, 0, i))
        videos.append(normalize(clips.clip(i, gen)))
        masks.append(video.tube_mask(t, h, w, mask_ratio, generator=gen))
    return torch.stack(videos), torch.stack(masks)


def save_clip_pictures(model, png_path: str, gif_path: str | None, mask_ratio: float, normalize_target: bool,
                       seed: int = 0, device="cpu", title: str | None = None) -> tuple[str, str | None]:
    """Write the reconstruction PNG (and the animated GIF) of the preview clips; returns the paths."""
    videos, masks = preview_clips(model, mask_ratio, seed)
    out = reconstruct_clips(model, videos.to(device), masks.to(device), normalize_target)
    t, h, w, p, ts = _grid(model)
    n_masked = int(masks[0].sum())
    lines = [f"VideoMAE reconstructions{f' ({title})' if title else ''}: {videos.shape[2]} frames of "
             f"{videos.shape[3]}x{videos.shape[4]}, tubelets {ts}x{p}x{p}, tube mask ratio {mask_ratio:g} "
             f"({t * h * w - n_masked} of {t * h * w} tubelets visible; masks drawn with seed {seed}).",
             "Masked tubelets shown grey; the model predicts only the masked ones."]
    if normalize_target:
        lines.append("Trained with normalize_target: predictions un-normalised per tubelet with the original "
                     "tubelet's mean and std (as the official visualisation).")
    png, gif = render_clips(out, list(PREVIEW), "\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    png.save(png_path)
    if gif_path:
        gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=250, loop=0)
    return png_path, gif_path


def is_video_checkpoint(path: str) -> bool:
    """Whether ``path`` is a fastmae checkpoint of a VideoMAE (a cheap look: tensors are not read)."""
    return ckpt_io.stored_kind(path) == "videomae"


def visualize(checkpoint: str, out: str | None = None, mask_ratio: float | None = None, seed: int = 0,
              device="cpu") -> str:
    """``fastmae visualize --checkpoint`` of a VideoMAE checkpoint: the PNG (and GIF beside it)."""
    from .distributed import parse_device

    device = parse_device(device)
    ckpt = ckpt_io.load(checkpoint)
    model = ckpt_io.build_model(ckpt["model_config"])
    ckpt_io.check_state_dict(model, ckpt["model"], checkpoint)
    model.load_state_dict(ckpt["model"], strict=True)
    model = model.to(device).eval()
    if mask_ratio is None:
        mask_ratio = float(ckpt["args"].get("mask_ratio") or DEFAULT_MASK_RATIO)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "reconstruction.png")
    gif = os.path.splitext(out)[0] + ".gif"
    name = ckpt["args"].get("model", "VideoMAE")
    save_clip_pictures(model, out, gif, mask_ratio, bool(ckpt["model_config"].get("normalize_target", True)),
                       seed=seed, device=device, title=f"{name}, step {ckpt['step']}")
    return out
