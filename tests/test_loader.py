"""The pre-training input pipeline (fastmae.loader) and unreadable files.

- ``--loader fast`` draws the same crop boxes, flips and masking noise as the official PIL path
  (the same seeds, the same order of draws) and its pixels are within one grey level of it;
- the batch cropped on the device (a CUDA run's path, run here on the CPU) equals the batch cropped
  in the workers' collate;
- truncated, empty and non-image files are skipped with a warning naming them, counted per epoch
  in log.txt, and more than --max-bad-frac of an epoch stops the run with a clear error, on both
  loaders; log.txt has the share of time spent waiting for data.
"""
import json
import os

import pytest
import torch
from trainkit import make_image_folder, pretrain_args

from fastmae import data, loader, train


def _grey_levels(a, b):
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    return ((a - b).abs() * std * 255).max().item()


def test_fast_and_pil_loaders_draw_the_same_crops_flips_and_masks():
    base = data.EmbeddedImages(repeats=1)
    pil = data.SeededSamples(base, data.train_transform(48), 36, seed=3)
    fast = loader.DecodedSamples(base, 36, seed=3)
    keys = [(i, epoch) for i in range(len(base)) for epoch in (0, 7)]
    imgs, noise, skipped = loader.Collate(48, crop_here=True)([fast[k] for k in keys])
    want = [pil[k] for k in keys]
    assert torch.equal(noise, torch.stack([w[1] for w in want])) and not skipped.any()
    assert imgs.shape == (len(keys), 3, 48, 48) and imgs.dtype == torch.float32
    assert _grey_levels(imgs, torch.stack([w[0] for w in want])) <= 1.0 + 1e-3
    # the boxes are those of torchvision's RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3)
    for key in keys:
        img, box, flip, _, _ = fast[key]
        top, left, h, w = box.tolist()
        assert 0 <= top and top + h <= img.shape[1] and 0 <= left and left + w <= img.shape[2]


def test_cropping_on_the_device_equals_cropping_in_the_workers():
    base = data.EmbeddedImages(repeats=1)
    fast = loader.DecodedSamples(base, 16, seed=0)
    samples = [fast[(i, 1)] for i in range(6)]
    here, noise, skipped = loader.Collate(32, crop_here=True)(samples)
    *packed, noise2, skipped2 = loader.Collate(32, crop_here=False)(samples)
    assert packed[0].dtype == torch.uint8 and packed[0].dim() == 1  # what crosses to the device
    assert torch.equal(loader.crop(*packed, 32), here) and torch.equal(noise, noise2)
    recipe = train.Pretraining(pretrain_args("unused"))
    model = torch.nn.Module()
    seen = {}
    model.forward = lambda imgs, mask_ratio, noise: seen.update(imgs=imgs) or (imgs.sum(), None, None)
    recipe.loss(model, (*packed, noise2))
    assert torch.equal(seen["imgs"], here)


def _folder_with_bad_files(root):
    """16 good PNGs and, among them in sorted order, a truncated JPEG, an empty file and a text file."""
    folder = make_image_folder(root, n=16, classes=1)
    cls = os.path.join(folder, "class0")
    good = open(os.path.join(cls, "3.png"), "rb").read()
    from PIL import Image

    Image.open(os.path.join(cls, "5.png")).convert("RGB").save(os.path.join(cls, "10a.jpg"), quality=90)
    jpeg = open(os.path.join(cls, "10a.jpg"), "rb").read()
    bad = {"10b.jpg": jpeg[: len(jpeg) // 2], "4a.png": b"", "7a.png": b"not an image at all"}
    for name, content in bad.items():
        with open(os.path.join(cls, name), "wb") as f:
            f.write(content)
    assert good  # the folder's good files are real images
    return folder, {os.path.join(cls, name) for name in bad}


def _expected_skips(folder, bad) -> int:
    """Each sample is read once per epoch; a bad one is replaced by the next readable file, so a
    run of k bad files in a row costs k + (k - 1) + ... + 1 failed reads."""
    from torchvision import datasets

    paths = [p for p, _ in datasets.ImageFolder(folder).samples]
    total = 0
    for i in range(len(paths)):
        j = i
        while paths[j % len(paths)] in bad:
            total += 1
            j += 1
    return total


@pytest.mark.parametrize("which", loader.LOADERS)
def test_unreadable_files_are_skipped_counted_and_named(tmp_path, which, recwarn):
    folder, bad = _folder_with_bad_files(tmp_path / "images")
    n = 19  # 16 good + 3 bad
    res = train.pretrain(pretrain_args(tmp_path / "run", "--data_path", folder, "--loader", which, "--batch_size",
                                       "19", "--accum_iter", "1", "--max-bad-frac", "0.5"))
    assert res.steps == 2  # two epochs of one whole batch: the run completed
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    want = _expected_skips(folder, bad)
    assert want >= len(bad) and [ln["skipped_files"] for ln in lines] == [want, want]
    assert all(0.0 <= ln["data_wait_frac"] <= 1.0 for ln in lines)
    named = " ".join(str(w.message) for w in recwarn if "skipping unreadable file" in str(w.message))
    assert all(path in named for path in bad), named
    assert n == len(bad) + 16


def test_too_many_unreadable_files_stop_the_run(tmp_path):
    folder, _ = _folder_with_bad_files(tmp_path / "images")
    with pytest.raises(data.UnreadableData, match="could not be read, more than --max-bad-frac 0.01"):
        train.pretrain(pretrain_args(tmp_path / "run", "--data_path", folder, "--batch_size", "19"))


def test_a_dataset_of_nothing_but_unreadable_files_is_a_clear_error(tmp_path):
    cls = tmp_path / "images" / "class0"
    cls.mkdir(parents=True)
    for i in range(4):
        (cls / f"{i}.jpg").write_bytes(b"")
    ds = loader.DecodedSamples(data.image_folder(str(tmp_path / "images")), 16, seed=0)
    with pytest.raises(data.UnreadableData, match="4 files in a row .* could not be read: check --data_path"):
        ds[(0, 0)]
