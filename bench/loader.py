"""The input pipeline's speed: images/s per DataLoader worker process, the official PIL path
against ``--loader fast`` (decode in the workers, the fused crop in their collate).

    fastmae bench loader [--data_path DIR] --out OUT [--workers 1] [--batch 64] [--size 224]

Without ``--data_path`` it times a folder of ImageNet-sized JPEGs (500x375 and 375x500, quality 90)
written from the embedded photographs into ``OUT/loader-images``. Both paths get the same dataset,
workers, batch and output size, the same sample keys and the masking noise of a 16-px-patch model;
each is timed over whole rounds of ``--batches`` batches after a warm-up round, the two paths
alternating (A B B A ...), and the median round is kept. ``decode`` times the fast path's workers
without the crop (reading, decoding, drawing the box), which is what bounds it.
``op_ms_per_image`` times the fused op alone against its reference (torchvision per image) on 256
decoded images, one thread. Writes ``OUT/loader.json``: ``{"pil": images/s, "fast": images/s,
"decode": images/s, "op_ms_per_image": {...}, ...}`` per worker process, with the settings and every
round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fastmae import data, loader

PATCH = 16  # the noise each sample carries is that of a 16-px-patch model


def make_jpeg_folder(root: str, n: int = 64) -> str:
    """``n`` JPEGs (quality 90) of the embedded photographs at 500x375 and 375x500, as
    ``root/photos/<i>.jpg``; kept when already there."""
    from PIL import Image

    folder = os.path.join(root, "photos")
    if os.path.isdir(folder) and len(os.listdir(folder)) >= n:
        return root
    os.makedirs(folder, exist_ok=True)
    photos = [data.load_embedded_image(name) for name in data.EMBEDDED_IMAGES]
    for i in range(n):
        im = photos[i % len(photos)]
        size = (500, 375) if i % 2 == 0 else (375, 500)
        w, h = im.size  # a centred crop of the right shape, resized: an ImageNet-like photograph
        r = min(w / size[0], h / size[1])
        box = ((w - size[0] * r) / 2, (h - size[1] * r) / 2, (w + size[0] * r) / 2, (h + size[1] * r) / 2)
        im.resize(size, Image.Resampling.BICUBIC, box=box).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


class _Keys(torch.utils.data.Sampler):
    """``(index, round)`` keys: every round visits the images in order, with new draws."""

    def __init__(self, n: int, count: int):
        self.n, self.count, self.round = n, count, 0

    def __iter__(self):
        self.round += 1
        return iter([(i % self.n, self.round) for i in range(self.count)])

    def __len__(self):
        return self.count


class _DecodeOnly:
    def __call__(self, samples):
        return len(samples)


def _loaders(base, size: int, batch: int, batches: int, workers: int) -> dict:
    L = (size // PATCH) ** 2
    common = dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                  worker_init_fn=data.init_worker)  # as the engine's loaders, for both paths
    fast = loader.DecodedSamples(base, L, seed=0)
    return {
        "pil": torch.utils.data.DataLoader(data.SeededSamples(base, data.train_transform(size), L, seed=0),
                                           sampler=_Keys(len(base), batch * batches), **common),
        "fast": torch.utils.data.DataLoader(fast, sampler=_Keys(len(base), batch * batches),
                                            collate_fn=loader.Collate(size, crop_here=True), **common),
        "decode": torch.utils.data.DataLoader(fast, sampler=_Keys(len(base), batch * batches),
                                              collate_fn=_DecodeOnly(), **common),
    }


def _round(dl) -> float:
    t0 = time.perf_counter()
    images = 0
    for b in dl:
        images += b if isinstance(b, int) else b[0].shape[0]
    return images / (time.perf_counter() - t0)


def time_op(base, size: int, n: int = 256, rounds: int = 5) -> dict:
    """The fused op (the CPU's kernel) against its reference (torchvision per image), one thread, on
    ``n`` decoded images with their drawn boxes and flips: ms per image, medians of alternating rounds."""
    from fastmae.ops.resized_crop import PackedImages, pack, resized_crop_ref

    ds = loader.DecodedSamples(base, (size // PATCH) ** 2, seed=0)
    samples = [ds[(i % len(base), i // len(base))] for i in range(n)]
    packed = pack([x[0] for x in samples])
    boxes, flips = torch.stack([x[1] for x in samples]), torch.tensor([x[2] for x in samples])
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    calls = {
        "op": lambda: loader.crop(packed.data, packed.offsets, packed.sizes, boxes, flips, size),
        "reference": lambda: resized_crop_ref(*PackedImages(*packed)[:3], boxes, flips, 3, size, mean, std,
                                              torch.float32, True),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for f in calls.values():
            f()
        times = {k: [] for k in calls}
        for r in range(rounds):
            for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                t0 = time.perf_counter()
                calls[k]()
                times[k].append((time.perf_counter() - t0) / n * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def run(data_path: str | None, out: str, workers: int = 1, batch: int = 64, size: int = 224, batches: int = 4,
        rounds: int = 5) -> dict:
    """Time the loaders (see the module doc); returns and writes ``out/loader.json``."""
    os.makedirs(out, exist_ok=True)
    root = data_path or make_jpeg_folder(os.path.join(out, "loader-images"))
    base = data.image_folder(root)
    dls = _loaders(base, size, batch, batches, workers)
    for dl in dls.values():  # warm-up: worker start-up, first decodes, the op's first call
        _round(dl)
    names = list(dls)
    per_round = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            per_round[name].append(_round(dls[name]) / max(workers, 1))
    result = {name: round(statistics.median(v), 1) for name, v in per_round.items()}
    result["op_ms_per_image"] = time_op(base, size, n=max(batch, 8) * 4 if batch < 64 else 256, rounds=rounds)
    result.update(kind="fastmae-bench-loader", unit="images/s per worker process", workers=workers, batch=batch,
                  size=size, batches_per_round=batches, rounds=per_round, data=root, images=len(base),
                  torch_threads_in_workers=1, backend_cpu=_cpu_backend(),
                  fast_over_pil=round(result["fast"] / result["pil"], 2))
    with open(os.path.join(out, "loader.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _cpu_backend() -> str:
    from fastmae.ops import select_backend

    return select_backend("cpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastmae bench loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", default=None, help="an ImageFolder (default: ImageNet-sized JPEGs written to OUT)")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4, help="batches per timed round")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    res = run(a.data_path, a.out, a.workers, a.batch, a.size, a.batches, a.rounds)
    print(f"images/s per worker process ({a.workers} worker(s), batch {a.batch}, {a.size} px): PIL {res['pil']}, "
          f"fast {res['fast']} ({res['fast_over_pil']}x), decode alone {res['decode']}")
    op = res["op_ms_per_image"]
    print(f"the fused op, one thread: {op['op']} ms per image, its torchvision reference {op['reference']} ms")
    print(f"wrote {os.path.join(a.out, 'loader.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
