"""Training data: the official MAE transform, ImageFolder datasets and the embedded default images.

Reproducibility: every random choice made for a sample (its crop, its flip and its masking noise)
is drawn from a generator seeded by ``(seed, epoch, index)``, not from a shared stream. The
batches a run sees therefore do not depend on the number of processes, on the number of
DataLoader workers, or on whether the run was interrupted and resumed: sample ``index`` of epoch
``epoch`` is always the same crop with the same mask. :class:`EpochSampler` hands out
``(index, epoch)`` keys in the order of a ``DistributedSampler`` and can start mid-epoch;
:class:`SeededSamples` turns a key into ``(image, noise)``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Photographs bundled inside scikit-image's wheel (no download): colour first, then grey ones,
# which are converted to RGB. ``stereo_motorcycle`` returns a stereo pair; its left view is used.
EMBEDDED_IMAGES = (
    "astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "coins", "moon", "clock", "grass", "gravel", "brick",
)
# What ``fastmae visualize`` shows when no --image is given.
EMBEDDED_PREVIEW = ("astronaut", "chelsea", "coffee", "rocket")
# One epoch of the embedded dataset visits each image this many times (as different crops).
EMBEDDED_REPEATS = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def train_transform(input_size: int):
    """The official MAE pre-training augmentation (main_pretrain.py)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def eval_transform(input_size: int):
    """Resize the short side to ``input_size`` (bicubic), centre-crop, normalise: for pictures."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(input_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def load_embedded_image(name: str):
    """One of scikit-image's bundled photographs as an RGB PIL image."""
    import skimage.data
    from PIL import Image

    if name not in EMBEDDED_IMAGES:
        raise ValueError(f"unknown embedded image {name!r}; choose one of {', '.join(EMBEDDED_IMAGES)}")
    arr = getattr(skimage.data, name)()
    if isinstance(arr, tuple):  # stereo pair
        arr = arr[0]
    return Image.fromarray(np.asarray(arr)).convert("RGB")


class EmbeddedImages(Dataset):
    """The default training set: scikit-image's bundled photographs, each visited ``repeats``
    times per epoch. Items are ``(PIL image, 0)``, like an untransformed ImageFolder."""

    def __init__(self, names=EMBEDDED_IMAGES, repeats: int = EMBEDDED_REPEATS, max_side: int = 512):
        from PIL import Image

        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.names = tuple(names)
        self.images = [load_embedded_image(n) for n in self.names]
        for im in self.images:  # the largest (retina, 1411 px) would make every crop slow
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        self.repeats = repeats

    def __len__(self):
        return len(self.images) * self.repeats

    def __getitem__(self, index):
        return self.images[index % len(self.images)], 0

    def __repr__(self):
        return (f"embedded scikit-image photographs ({len(self.images)} images x {self.repeats} "
                f"crops per epoch = {len(self)} samples)")


def image_folder(data_path: str):
    """The official dataset: ``ImageFolder(data_path/train)``, or ``ImageFolder(data_path)`` when
    there is no ``train`` subfolder. Clear errors for a missing or empty folder."""
    from torchvision import datasets

    if not os.path.exists(data_path):
        raise ValueError(f"--data_path {data_path!r} does not exist")
    if not os.path.isdir(data_path):
        raise ValueError(f"--data_path {data_path!r} is not a directory")
    root = os.path.join(data_path, "train")
    if not os.path.isdir(root):
        root = data_path
    try:
        ds = datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images in them
        raise ValueError(
            f"no training images found under {root!r}: expected {root}/<class>/<image> with one of "
            f"the extensions {', '.join(IMAGE_EXTENSIONS)} ({e})") from None
    return ds


def build_dataset(data_path: str | None):
    """``None`` -> the embedded photographs; otherwise an ImageFolder (see :func:`image_folder`)."""
    return EmbeddedImages() if data_path is None else image_folder(data_path)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of epoch ``epoch`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class SeededSamples(Dataset):
    """Wraps a dataset of ``(PIL image, label)``: key ``(index, epoch)`` -> ``(image, noise)``.

    ``image`` is ``transform(PIL image)``; ``noise [num_patches]`` is the masking noise the model
    argsorts (uniform in [0, 1), as ``torch.rand`` in the official ``random_masking``). Both are
    drawn with torch's CPU generator seeded by :func:`sample_seed`, whose previous state is then
    restored, so that the caller's RNG stream is left untouched (this matters with ``num_workers=0``).
    """

    def __init__(self, base, transform, num_patches: int, seed: int):
        if len(base) == 0:
            raise ValueError("the training dataset is empty")
        self.base, self.transform, self.num_patches, self.seed = base, transform, num_patches, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key
        img, _ = self.base[index]
        saved = torch.get_rng_state()  # torchvision's transforms draw from torch's CPU generator
        try:
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            img = self.transform(img)
            noise = torch.rand(self.num_patches)
        finally:
            torch.set_rng_state(saved)
        return img, noise


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (the official sampler, also for one process) that yields
    ``(index, epoch)`` keys and can start part-way through an epoch.

    ``set_epoch(epoch, start=k)`` skips this rank's first ``k`` samples of that epoch (what a run
    resumed after ``k / batch_size`` batches needs); the order is the same as without skipping.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= start <= self.num_samples:
            raise IndexError(f"cannot start epoch {epoch} at sample {start} of {self.num_samples}")
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return self.num_samples - self.start
