"""resized_crop: a batch of decoded images cropped, resized, flipped and normalised in one op.

``resized_crop(images, boxes, flips, size, mean, std, dtype=torch.float32,
interpolation="bicubic") -> [N, C, size, size]``, where ``images`` is a list of uint8 ``[C, H, W]``
tensors of different sizes (or a :class:`PackedImages`), ``boxes [N, 4]`` the integer crop boxes
``(top, left, height, width)`` (what ``RandomResizedCrop.get_params`` draws), ``flips [N]`` whether
each output is mirrored left-right. Each output is

    normalise(flip(resize(crop(image), size, antialias=True)) / 255, mean, std)

with the pixels of torchvision's ``resized_crop`` on the uint8 image (``antialias=True``), which
follows PIL's resampler (the official pipeline's): bicubic with ``a = -0.5``, or bilinear, the
filter widened by the scale when downscaling; a horizontal pass, its result rounded and clamped to
uint8, then a vertical pass, rounded and clamped, with torch's fixed-point weights. The C++ and
Triton kernels compute the same integers, so their pixels equal torchvision's (the tests allow one
grey level for the GPU's arithmetic). The output is then scaled to [0, 1], normalised and cast to
``dtype``.

The registered op takes the images packed: ``data`` (uint8, 1-D: every image's ``C*H*W`` bytes in
CHW order, back to back), ``offsets [N]`` (int64, where each image starts in ``data``) and
``sizes [N, 2]`` (int64, ``H, W``); :func:`pack` makes them. The crop is data preparation, not part
of a model: the op has no gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ._backend import register_kernels

INTERPOLATIONS = ("bicubic", "bilinear")
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class PackedImages(NamedTuple):
    """Images of different sizes in one uint8 tensor: ``data`` (1-D, CHW per image, back to back),
    ``offsets [N]`` and ``sizes [N, 2]`` (``H, W``), int64; ``channels`` is shared by all."""
    data: torch.Tensor
    offsets: torch.Tensor
    sizes: torch.Tensor
    channels: int


def pack(images: Sequence[torch.Tensor], buffer: torch.Tensor | None = None) -> PackedImages:
    """Pack uint8 ``[C, H, W]`` tensors (one channel count) into a :class:`PackedImages`; into the
    start of ``buffer`` (1-D uint8) when it is large enough, so a caller that packs batch after batch
    reuses its memory instead of faulting in fresh pages each time."""
    if len(images) == 0:
        raise ValueError("resized_crop needs at least one image")
    for i, im in enumerate(images):
        if not isinstance(im, torch.Tensor) or im.dim() != 3:
            raise ValueError(f"image {i} must be a [C, H, W] tensor, got "
                             f"{tuple(im.shape) if isinstance(im, torch.Tensor) else type(im).__name__}")
        if im.dtype != torch.uint8:
            raise ValueError(f"image {i} must be uint8 (decoded pixels), got {im.dtype}")
    channels = images[0].shape[0]
    bad = [i for i, im in enumerate(images) if im.shape[0] != channels]
    if bad:
        raise ValueError(f"every image must have {channels} channels like image 0; image {bad[0]} has "
                         f"{images[bad[0]].shape[0]}")
    counts = torch.tensor([im.numel() for im in images], dtype=torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    sizes = torch.tensor([tuple(im.shape[1:]) for im in images], dtype=torch.int64)
    total = int(counts.sum())
    flat = [im.reshape(-1) for im in images]
    if buffer is not None and buffer.numel() >= total and buffer.device == images[0].device:
        data = torch.cat(flat, out=buffer[:total])
    else:
        data = torch.cat(flat)
    return PackedImages(data, offsets.to(data.device), sizes.to(data.device), int(channels))


# ---------------------------------------------------------------------------- reference
def resized_crop_ref(data, offsets, sizes, boxes, flips, channels: int, size: int, mean: Sequence[float],
                     std: Sequence[float], dtype: torch.dtype, bicubic: bool) -> torch.Tensor:
    """The reference: torchvision's ``resized_crop`` (antialiased) of each uint8 image, flipped,
    scaled to [0, 1] and normalised. It runs on the CPU whatever the device (torchvision's uint8
    resampling on CUDA converts to float first and so rounds differently)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    mode = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
    cpu = data.cpu()
    outs = []
    for off, (H, W), (top, left, h, w), flip in zip(offsets.tolist(), sizes.tolist(), boxes.tolist(), flips.tolist()):
        img = cpu[off:off + channels * H * W].view(channels, H, W)
        out = F.resized_crop(img, top, left, h, w, [size, size], interpolation=mode, antialias=True)
        outs.append(out.flip(-1) if flip else out)
    x = torch.stack(outs).to(data.device).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype)


# ---------------------------------------------------------------------------- registered op
def _check(data, offsets, sizes, boxes, flips, channels, size, mean, std, dtype, bicubic):
    """The value checks every backend makes (the C++ kernel makes them itself): each image inside
    ``data``, each box non-empty and inside its image. A ValueError naming the first bad image on
    the CPU; on CUDA the checks are queued on the device (``torch._assert_async``), so neither the
    loader nor a compiled graph waits for the host."""
    if offsets.shape[0] == 0:
        return
    H, W = sizes[:, 0], sizes[:, 1]
    top, left, h, w = boxes.unbind(1)
    room = data.numel() - offsets  # written so that no sum or product of huge values can wrap around
    placed = (offsets < 0) | (room < 0) | (H <= 0) | (W <= 0) | (H > room.clamp(min=0) // (channels * W.clamp(min=1)))
    empty = (h <= 0) | (w <= 0)
    outside = (top < 0) | (left < 0) | (h > H - top) | (w > W - left)
    if data.is_cuda:
        torch._assert_async(~placed.any(), "resized_crop: an image does not lie inside the packed data")
        torch._assert_async(~empty.any(), "resized_crop: a box (top, left, height, width) is empty")
        torch._assert_async(~outside.any(), "resized_crop: a box (top, left, height, width) lies outside its image")
        return
    if bool(placed.any()):
        i = int(placed.nonzero()[0])
        raise ValueError(f"image {i} (offset {int(offsets[i])}, size {int(H[i])}x{int(W[i])}, {channels} channels) "
                         f"does not lie inside the {data.numel()} bytes of data")
    if bool(empty.any()):
        i = int(empty.nonzero()[0])
        raise ValueError(f"box {i} {tuple(boxes[i].tolist())} (top, left, height, width) is empty")
    if bool(outside.any()):
        i = int(outside.nonzero()[0])
        raise ValueError(f"box {i} {tuple(boxes[i].tolist())} (top, left, height, width) lies outside its "
                         f"{int(H[i])}x{int(W[i])} image")


@torch.library.custom_op("fastmae::resized_crop", mutates_args=())
def _resized_crop_op(data: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor,
                     flips: torch.Tensor, channels: int, size: int, mean: Sequence[float], std: Sequence[float],
                     dtype: torch.dtype, bicubic: bool) -> torch.Tensor:
    args = (data, offsets, sizes, boxes, flips, channels, size, mean, std, dtype, bicubic)
    _check(*args)
    return resized_crop_ref(*args)


@_resized_crop_op.register_fake
def _(data, offsets, sizes, boxes, flips, channels, size, mean, std, dtype, bicubic):
    return data.new_empty((offsets.shape[0], channels, size, size), dtype=dtype)


register_kernels(_resized_crop_op, check=_check, torch_impl=resized_crop_ref,
                 cpp="resized_crop_fwd", triton=("resized_crop", "resized_crop"))


# ---------------------------------------------------------------------------- public API
def resized_crop(images, boxes: torch.Tensor, flips: torch.Tensor, size: int, mean: Sequence[float],
                 std: Sequence[float], dtype: torch.dtype = torch.float32,
                 interpolation: str = "bicubic") -> torch.Tensor:
    """Crop, resize, flip and normalise a batch of uint8 images (see the module doc).

    ``images``: a list of uint8 ``[C, H, W]`` tensors or a :class:`PackedImages`; ``boxes [N, 4]``
    integer ``(top, left, height, width)``; ``flips [N]`` bool; ``mean``/``std``: one value per
    channel, of pixels scaled to [0, 1]; ``dtype``: fp32, bf16 or fp16."""
    packed = images if isinstance(images, PackedImages) else pack(list(images))
    data, offsets, sizes, channels = packed
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed image data must be a 1-D uint8 tensor, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} of {getattr(data, 'dim', lambda: '?')()} dims")
    n = offsets.shape[0] if isinstance(offsets, torch.Tensor) else -1
    if n < 1 or offsets.dim() != 1 or offsets.dtype != torch.int64:
        raise ValueError(f"offsets must be a non-empty 1-D int64 tensor, got {offsets!r:.80}")
    if not isinstance(sizes, torch.Tensor) or sizes.dtype != torch.int64 or tuple(sizes.shape) != (n, 2):
        raise ValueError(f"sizes must be an int64 [{n}, 2] tensor (H, W per image)")
    if not isinstance(boxes, torch.Tensor) or boxes.dtype.is_floating_point or tuple(boxes.shape) != (n, 4):
        raise ValueError(f"boxes must be an integer [{n}, 4] tensor (top, left, height, width per image), got "
                         f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
    if not isinstance(flips, torch.Tensor) or tuple(flips.shape) != (n,):
        raise ValueError(f"flips must be a [{n}] tensor (one per image)")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if channels < 1 or len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
    if any(float(s) == 0.0 for s in std):
        raise ValueError(f"std must not be 0, got {list(std)}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {dtype}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    devices = {t.device for t in (data, offsets, sizes, boxes, flips)}
    if len(devices) > 1:
        raise ValueError(f"the images, offsets, sizes, boxes and flips must be on one device, got "
                         f"{sorted(map(str, devices))}")
    return _resized_crop_op(data.contiguous(), offsets.contiguous(), sizes.contiguous(),
                            boxes.to(torch.int64).contiguous(), flips.to(torch.bool).contiguous(), int(channels),
                            int(size), [float(m) for m in mean], [float(s) for s in std], dtype,
                            interpolation == "bicubic")
