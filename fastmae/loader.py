"""The pre-training input pipeline: decode in the workers, crop-resize-flip-normalise as one op.

``--loader fast`` (the default): DataLoader workers only read and decode each image to uint8
(libjpeg-turbo and libpng through ``torchvision.io.decode_image``, PIL for what it cannot read) and
draw its crop box, flip and masking noise from the sample's own generator, exactly as the official
transform draws them (:func:`draw`: the same ``RandomResizedCrop`` parameters, scale 0.2-1, ratio
3/4-4/3, then the flip, then the noise, so both loaders see the same boxes). The batch is then
cropped, resized, flipped and normalised by :func:`fastmae.ops.resized_crop`: inside the workers'
collate for a CPU run (the training process does not pay for it), on the GPU after the uint8 batch
is moved there for a CUDA run (a quarter of fp32's bytes). ``--loader pil``: the official
per-sample PIL transform (:func:`fastmae.data.train_transform`).

Unreadable files (truncated, empty, not an image) never stop a run: a sample whose file cannot be
read is replaced by the next readable one (index + 1, + 2, ..., so the batch keeps its shape and
the choice is the same on every run), with one warning naming the file; each sample carries the
number of files skipped for it, which the engine counts per epoch (``log.txt``:
``skipped_files``) and checks against ``--max-bad-frac``.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils.data import Dataset

from . import data, masking
from .ops.resized_crop import PackedImages, pack, resized_crop

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; they are what the
# training data is decoded with until TorchCodec's are a dependency worth taking.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)

SCALE, RATIO = (0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # the official RandomResizedCrop's
LOADERS = ("fast", "pil")


# ---------------------------------------------------------------------------- decoding
def decode(path: str) -> torch.Tensor:
    """An image file as uint8 ``[3, H, W]`` RGB: torchvision's decoders (libjpeg-turbo, libpng,
    libwebp), PIL for the formats they do not read."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(path, mode=ImageReadMode.RGB)
        if img.dtype == torch.uint8:
            return img
    except RuntimeError:
        pass
    from PIL import Image

    with Image.open(path) as im:
        return pil_to_tensor(im)


def pil_to_tensor(im) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def draw(img: torch.Tensor, num_patches: int):
    """``(box [4], flip, noise [num_patches])`` drawn from torch's generator as the official
    transform draws them: ``RandomResizedCrop.get_params`` (scale 0.2-1, ratio 3/4-4/3), the flip
    (``RandomHorizontalFlip``: ``torch.rand(1) < 0.5``), then the masking noise."""
    from torchvision.transforms import RandomResizedCrop

    top, left, h, w = RandomResizedCrop.get_params(img, SCALE, RATIO)
    flip = bool(torch.rand(1) < 0.5)
    noise = masking.sample_noise(num_patches)
    return torch.tensor([top, left, h, w], dtype=torch.int64), flip, noise


class DecodedSamples(Dataset):
    """Key ``(index, epoch)`` -> ``(uint8 image [3, H, W], box [4], flip, noise [L], skipped)``.

    ``base``: an ImageFolder (its files are decoded here) or any dataset of ``(PIL image, label)``
    (converted once per worker and cached when it is small, as the embedded photographs)."""

    reports_skipped = True

    def __init__(self, base, num_patches: int, seed: int):
        if len(base) == 0:
            raise ValueError("the training dataset is empty")
        self.base, self.num_patches, self.seed = base, num_patches, seed
        self._cache: dict = {}

    def __len__(self):
        return len(self.base)

    def _image(self, index: int) -> torch.Tensor:
        samples = getattr(self.base, "samples", None)
        if samples is not None:
            return decode(samples[index][0])
        im, _ = self.base[index]
        key = id(im)
        if key not in self._cache:
            self._cache[key] = pil_to_tensor(im)
        return self._cache[key]

    def __getitem__(self, key):
        index, epoch = key
        (img, index), skipped = data.first_readable(self.base, index, lambda i: (self._image(i), i))
        with data.seeded(data.sample_seed(self.seed, epoch, index)):
            box, flip, noise = draw(img, self.num_patches)
        return img, box, flip, noise, skipped


class Collate:
    """Batches :class:`DecodedSamples`: ``(data, offsets, sizes, boxes, flips, noise, skipped)``
    with the images packed (for the op on the device), or, with ``crop_here``, the op run now:
    ``(imgs [N, 3, S, S] fp32, noise, skipped)``."""

    def __init__(self, input_size: int, crop_here: bool):
        self.input_size, self.crop_here = input_size, crop_here
        self._buffer = None  # cropping here, the packed bytes never leave: one buffer, reused

    def __call__(self, samples):
        imgs, boxes, flips, noise, skipped = zip(*samples)
        if self.crop_here:
            total = sum(im.numel() for im in imgs)
            if self._buffer is None or self._buffer.numel() < total:
                self._buffer = torch.empty(int(total * 1.25), dtype=torch.uint8)
            packed = pack(list(imgs), self._buffer)
        else:
            packed = pack(list(imgs))
        boxes, flips = torch.stack(boxes), torch.tensor(flips)
        noise, skipped = torch.stack(noise), torch.tensor(skipped, dtype=torch.int64)
        if self.crop_here:
            return crop(packed.data, packed.offsets, packed.sizes, boxes, flips, self.input_size), noise, skipped
        return packed.data, packed.offsets, packed.sizes, boxes, flips, noise, skipped


def crop(data_, offsets, sizes, boxes, flips, input_size: int, dtype=torch.float32) -> torch.Tensor:
    """The official pre-training crop (bicubic), flip and ImageNet normalisation of packed images."""
    return resized_crop(PackedImages(data_, offsets, sizes, 3), boxes, flips, input_size, data.IMAGENET_MEAN,
                        data.IMAGENET_STD, dtype=dtype, interpolation="bicubic")
