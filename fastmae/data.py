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

import contextlib
import os
import random
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from . import masking

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
MAX_CONSECUTIVE_BAD = 1000  # a run of this many unreadable files in a row is not a few bad files
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


def _posterize_keeping_no_bits():
    """timm's RandAugment at ``inc1`` asks ``ImageOps.posterize`` for 0 bits at times (a black
    image, what Pillow before 13 returned); Pillow 13 refuses 0. Give timm's posterize ops that
    result again, only where this Pillow refuses it."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass

    for name in [n for n in auto_augment.NAME_TO_OP if n.startswith("Posterize")]:
        op = auto_augment.NAME_TO_OP[name]
        if not isinstance(op, _PosterizeKeepingNoBits):
            auto_augment.NAME_TO_OP[name] = _PosterizeKeepingNoBits(op)


class _PosterizeKeepingNoBits:
    """timm's posterize op, with 0 bits giving the black image (picklable: DataLoader workers
    started by spawn receive the transform)."""

    def __init__(self, op):
        self.op = op

    def __call__(self, img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point(lambda _: 0)
        return self.op(img, bits_to_keep, **kwargs)


def classify_train_transform(input_size: int, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                             reprob: float = 0.25, remode: str = "pixel", recount: int = 1, color_jitter=None,
                             scale=(0.08, 1.0), hflip: float = 0.5):
    """The official fine-tuning augmentation (main_finetune.py's ``build_transform``): timm's
    ``create_transform``: RandomResizedCrop (bicubic, area ``scale``), flip (probability
    ``hflip``), RandAugment, normalise, RandomErasing."""
    from timm.data import create_transform

    _posterize_keeping_no_bits()
    return create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                            auto_augment=auto_augment or None, interpolation="bicubic", re_prob=reprob,
                            re_mode=remode, re_count=recount, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            scale=tuple(scale), hflip=hflip)


def probe_train_transform(input_size: int, scale=(0.08, 1.0), hflip: float = 0.5):
    """The official linear-probing augmentation (main_linprobe.py): crop (bicubic, area ``scale``)
    and flip (probability ``hflip``) only."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(hflip),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def classify_eval_transform(input_size: int):
    """The official evaluation transform: resize the short side to ``input_size / crop_pct``
    (crop_pct 224/256 up to 224 px, else 1), centre-crop ``input_size``, normalise."""
    from torchvision import transforms

    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
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


class EmbeddedDigits(Dataset):
    """The labelled default: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10
    classes; no download), upscaled once to ``size`` px (bicubic) and made RGB. A fixed split:
    every fifth image (by index) is in ``val`` (360 images), the rest in ``train`` (1,437).
    Items are ``(PIL image, label)``, like an untransformed ImageFolder."""

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train", size: int = 32):
        from PIL import Image
        from sklearn.datasets import load_digits

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        digits = load_digits()
        keep = [i for i in range(len(digits.target)) if (i % 5 == 0) == (split == "val")]
        grey = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self.images = [Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
                       for g in grey]
        self.targets = [int(t) for t in digits.target[keep]]
        self.split, self.size = split, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]

    def __repr__(self):
        return (f"embedded scikit-learn digits, {self.split} split ({len(self)} images, 10 classes, "
                f"upscaled to {self.size} px)")


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


def labelled_folders(data_path: str | None):
    """``(train, val)`` for the downstream commands: ``ImageFolder(DIR/train)`` and
    ``ImageFolder(DIR/val)`` with the same classes, or the embedded digits when ``data_path`` is None."""
    from torchvision import datasets

    if data_path is None:
        return EmbeddedDigits("train"), EmbeddedDigits("val")
    if not os.path.isdir(data_path):
        raise ValueError(f"--data_path {data_path!r} is not a directory")
    sets = []
    for split in ("train", "val"):
        root = os.path.join(data_path, split)
        if not os.path.isdir(root):
            raise ValueError(f"--data_path {data_path!r} has no {split}/ folder: expected "
                             f"{data_path}/train/<class>/<image> and {data_path}/val/<class>/<image>")
        try:
            sets.append(datasets.ImageFolder(root))
        except (FileNotFoundError, RuntimeError) as e:
            raise ValueError(f"no images found under {root!r}: expected {root}/<class>/<image> ({e})") from None
    train, val = sets
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"the classes of {data_path}/val differ from those of {data_path}/train (only in train: "
                         f"{only_train[:5]}; only in val: {only_val[:5]}): labels would not mean the same class")
    return train, val


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of epoch ``epoch`` of a run seeded ``seed``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def step_seed(seed: int, epoch: int, it: int, rank: int) -> int:
    """The seed of batch ``it`` of epoch ``epoch`` on process ``rank`` (apart from every
    :func:`sample_seed`)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, it, rank, 0x57E9]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seed_globally(seed: int) -> None:
    """Seed torch's (every device's), numpy's and python's global generators with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def init_worker(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: glibc in the worker keeps freed memory for reuse (mallopt's
    mmap and trim thresholds raised to 1 GiB) instead of returning every multi-MB block (a decoded
    image, a batch) to the system and faulting it back in for the next one, the allocator effect
    PERF.md describes. A worker's heap stays within a few batches. Nothing happens off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch's CPU generator, numpy's and python's global generators with ``seed`` for the
    block (torchvision draws from torch, timm's RandAugment, RandomErasing and Mixup from python and
    numpy), then restore their previous states, so the caller's streams are left untouched."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


# ---------------------------------------------------------------------------- unreadable files
class UnreadableData(ValueError):
    """Too many files of the dataset could not be read."""


_warned: set = set()


def _warn_bad(name: str, error: BaseException) -> None:
    if name not in _warned:  # once per file and process
        _warned.add(name)
        first = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(f"skipping unreadable file {name}: {type(error).__name__}: {first[:200]}", RuntimeWarning,
                      stacklevel=3)


def sample_name(base, index: int) -> str:
    """The file behind sample ``index`` of ``base`` (an ImageFolder's path), else its index."""
    samples = getattr(base, "samples", None)
    return samples[index][0] if samples is not None else f"sample {index} of {base!r}"


def first_readable(base, index: int, read):
    """``(read(i), skipped)`` for the first ``i`` of ``index, index + 1, ...`` (wrapping around)
    whose file can be read; ``skipped`` counts the unreadable ones passed over."""
    n = len(base)
    for skipped in range(min(n, MAX_CONSECUTIVE_BAD)):
        i = (index + skipped) % n
        try:
            return read(i), skipped
        except Exception as e:  # noqa: BLE001 - a decoder can raise anything for a bad file
            _warn_bad(sample_name(base, i), e)
    raise UnreadableData(f"{min(n, MAX_CONSECUTIVE_BAD)} files in a row from {sample_name(base, index)} on could "
                         f"not be read: check --data_path")


class LabelledSamples(Dataset):
    """Wraps a dataset of ``(PIL image, label)``: key ``(index, epoch)`` -> ``(image, label,
    skipped)`` (``skipped``: unreadable files passed over, see :func:`first_readable`),
    the transform drawn under :func:`seeded` with the sample's seed (batch-level choices, such as
    mixup's, are drawn by the training loop from :func:`step_seed`)."""

    reports_skipped = True

    def __init__(self, base, transform, seed: int):
        if len(base) == 0:
            raise ValueError("the training dataset is empty")
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key
        ((img, label), index), skipped = first_readable(self.base, index, lambda i: (self.base[i], i))
        with seeded(sample_seed(self.seed, epoch, index)):
            img = self.transform(img)
        return img, torch.tensor(label), skipped


class SeededSamples(Dataset):
    """Wraps a dataset of ``(PIL image, label)``: key ``(index, epoch)`` -> ``(image, noise,
    skipped)`` (``skipped``: unreadable files passed over, see :func:`first_readable`).

    ``image`` is ``transform(PIL image)``; ``noise [num_patches]`` is the masking noise the model
    argsorts (uniform in [0, 1), as ``torch.rand`` in the official ``random_masking``). Both are
    drawn with torch's CPU generator seeded by :func:`sample_seed`, whose previous state is then
    restored, so that the caller's RNG stream is left untouched (this matters with ``num_workers=0``).
    """

    reports_skipped = True

    def __init__(self, base, transform, num_patches: int, seed: int):
        if len(base) == 0:
            raise ValueError("the training dataset is empty")
        self.base, self.transform, self.num_patches, self.seed = base, transform, num_patches, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, epoch = key
        ((img, _), index), skipped = first_readable(self.base, index, lambda i: (self.base[i], i))
        saved = torch.get_rng_state()  # torchvision's transforms draw from torch's CPU generator
        try:
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            img = self.transform(img)
            noise = masking.sample_noise(self.num_patches)
        finally:
            torch.set_rng_state(saved)
        return img, noise, skipped


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
