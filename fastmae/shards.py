"""WebDataset shards: an ImageFolder written once as tar shards, streamed back for pre-training.

:func:`prepare` (``fastmae prepare``) reads ``DIR/train/<class>/<image>`` (or ``DIR/<class>/<image>``)
and writes ``OUT/shard-000000.tar``, ``shard-000001.tar``, ... with webdataset's ``ShardWriter``,
each sample an image (its file's bytes as they are, or re-encoded smaller with ``max_side``) and its
class, plus ``OUT/index.json`` (the shards, their sample counts, the classes, the pattern to train
on). Files the training decoder cannot read are left out, one warning each, and counted.

:class:`ShardSamples` streams them back, the shard-reading counterpart of
:class:`fastmae.loader.DecodedSamples`: the same ``(uint8 image [3, H, W], box [4], flip, noise [L],
skipped)`` per sample, the crop box, flip and masking noise drawn by :func:`fastmae.loader.draw`
from :func:`fastmae.data.sample_seed` ``(seed, epoch, index)``, ``index`` the sample's position in
the dataset (its shard's offset plus its place in the shard), so a sample is the same crop with the
same mask wherever and whenever it is read.

The order of an epoch, what makes it reproducible and resumable:

- the shards are concatenated in an order drawn from ``(seed, epoch)``; process ``rank`` takes
  samples ``[rank * n, (rank + 1) * n)`` of that sequence, ``n = total // world_size`` (the same
  on every process; the few left over differ from epoch to epoch);
- the DataLoader's workers take turns batch by batch (worker ``j % W`` makes batch ``j``), so each
  worker is given the contiguous part of its process's samples that fills its batches, reads only
  the shards holding it, and shuffles it through a buffer seeded by ``(seed, epoch, rank, worker)``;
- hence the batches depend on the seed, the process count, the batch size and the worker count
  (not on timing): a resumed run must use the same four. ``set_epoch(epoch, start=k)`` skips the
  first ``k`` samples of this process's epoch (the skipped records are read, not decoded).

Damaged data never stops a run, and never shifts what comes after it: a sample whose bytes cannot
be decoded is replaced by the next one of its worker's stream (as ``DecodedSamples`` takes the next
file), with one warning naming it; samples lost to a torn or missing shard are made up for by the
samples that follow the worker's part (one warning per shard). Either way the sample's ``skipped``
field counts what it stands in for, which the engine counts per epoch against ``--max-bad-frac``.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import posixpath
import random
import warnings
from collections import deque

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import data, loader

INDEX = "index.json"
SHARD_NAME = "shard-%06d.tar"
INDEX_FORMAT = "fastmae-shards/1"
IMAGE_EXTS = tuple(e.lstrip(".") for e in data.IMAGE_EXTENSIONS)  # the keys a sample's image may have
DEFAULT_BUFFER = 1000  # samples held by each worker's shuffle buffer (their encoded bytes)
_ORDER_TAG, _BUFFER_TAG = 0x5A4D, 0xB0FF  # keep the shard order's and the buffers' seeds apart


def _require_webdataset():
    try:
        import webdataset
    except ImportError as e:
        raise ImportError(f"WebDataset shards need the webdataset package: pip install webdataset ({e})") from None
    return webdataset


def _expand(pattern: str) -> list[str]:
    """A brace pattern (``dir/shard-{000000..000012}.tar``) as its list of shards."""
    import braceexpand  # webdataset's dependency

    return list(braceexpand.braceexpand(pattern))


def is_shard_source(path) -> bool:
    """Whether ``--data_path`` names shards: a ``.tar`` file, a brace pattern of them, or a folder
    written by :func:`prepare` (it holds ``index.json``)."""
    path = str(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, INDEX))
    try:
        urls = _expand(path)
    except ImportError:
        urls = [path]
    return bool(urls) and all(u.endswith(".tar") for u in urls)


# ---------------------------------------------------------------------------- decoding
def decode_bytes(buf) -> torch.Tensor:
    """An encoded image (bytes) as uint8 ``[3, H, W]`` RGB, decoded as :func:`fastmae.loader.decode`
    decodes a file: torchvision's decoders, PIL for the formats they do not read."""
    from torchvision.io import ImageReadMode, decode_image

    if buf is None or len(buf) == 0:
        raise ValueError("no image bytes")
    try:
        img = decode_image(torch.frombuffer(bytearray(buf), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if img.dtype == torch.uint8:
            return img
    except RuntimeError:
        pass
    from PIL import Image

    with Image.open(io.BytesIO(buf)) as im:
        return loader.pil_to_tensor(im)


def _image_of(sample: dict):
    """``(extension, bytes)`` of a webdataset sample's image, ``(None, None)`` when it has none."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None, None


# ---------------------------------------------------------------------------- writing
def _sample_key(rel: str, taken: set) -> str:
    """A webdataset key from a file's path relative to the folder: the extension dropped, the
    file name's other dots made ``_`` (a key ends at its first dot), made unique with ``_2``, ...
    when two files would share one (``a.png`` and ``a.jpg``)."""
    head, tail = posixpath.split(posixpath.splitext(rel)[0])
    key = posixpath.join(head, tail.replace(".", "_"))
    unique, n = key, 1
    while unique in taken:
        n += 1
        unique = f"{key}_{n}"
    taken.add(unique)
    return unique


def _encode(job):
    """``(ok, payload)`` for one file: ``(True, (extension, bytes, resized))`` with the bytes as
    they are, or re-encoded as JPEG at ``max_side`` (PIL LANCZOS) when the longer side exceeds it;
    ``(False, (error type, message))`` when the training decoder cannot read the file."""
    path, max_side, quality = job
    try:
        with open(path, "rb") as f:
            raw = f.read()
        img = decode_bytes(raw)  # the check: what training will decode
        h, w = img.shape[1:]
        if max_side is None or max(h, w) <= max_side:
            return True, (os.path.splitext(path)[1].lstrip(".").lower(), raw, False)
        from PIL import Image

        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = Image.fromarray(img.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.LANCZOS)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=quality)
        return True, ("jpg", out.getvalue(), True)
    except Exception as e:  # noqa: BLE001 - a decoder can raise anything for a bad file
        return False, (type(e).__name__, str(e))


def prepare(data_path: str, out: str, max_side: int | None = None, shard_size: int = 1000, quality: int = 90,
            log=print, *, shuffle: bool = True, workers: int = 0, overwrite: bool = False) -> dict:
    """Write the ImageFolder ``data_path`` as WebDataset shards ``out/shard-NNNNNN.tar`` of
    ``shard_size`` samples and ``out/index.json``; returns the index.

    Each sample: ``__key__`` (its path under the folder, see :func:`_sample_key`), the image under
    its file's extension in lower case (``jpg``, ``jpeg``, ``png``, ...), and ``cls`` (its class
    index). The bytes are the file's own, unless ``max_side`` is given and the image's longer side
    exceeds it: then it is resized to that longer side (aspect kept, PIL LANCZOS) and re-encoded as
    JPEG at ``quality``. Every file is decoded once, as training decodes it; those that fail are
    left out with one warning each, and listed in the index.

    The order is deterministic: ImageFolder's (sorted classes, sorted files), then, with
    ``shuffle`` (the default), permuted by a fixed seed so that each shard mixes the classes
    (the readers shuffle shards and a window of samples, not the whole dataset).
    ``workers``: processes decoding in parallel (0: this one). ``overwrite``: replace the shards
    and index already in ``out`` (refused otherwise).
    """
    wds = _require_webdataset()
    if shard_size < 1:
        raise ValueError(f"the shard size must be at least 1 sample, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1 pixel, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"the JPEG quality must be within 1-100, got {quality}")
    folder = data.image_folder(data_path)
    root = folder.root
    os.makedirs(out, exist_ok=True)
    old = sorted(f for f in os.listdir(out) if f == INDEX or (f.startswith("shard-") and f.endswith(".tar")))
    if old:
        if not overwrite:
            raise ValueError(f"{out!r} already holds shards ({', '.join(old[:3])}{' ...' if len(old) > 3 else ''}): "
                             f"choose another folder, or overwrite them")
        for f in old:
            os.remove(os.path.join(out, f))

    order = list(range(len(folder.samples)))
    if shuffle:
        random.Random(0).shuffle(order)
    files = [folder.samples[i] for i in order]
    jobs = [(path, max_side, quality) for path, _ in files]
    log(f"writing {len(files)} images of {len(folder.classes)} classes from {root} as shards of {shard_size} "
        f"in {out}" + (f" (images larger than {max_side} px re-encoded)" if max_side else ""))

    counts: dict[str, int] = {}
    skipped, resized, taken = [], 0, set()
    pool = None
    if workers > 0:
        import multiprocessing

        pool = multiprocessing.get_context().Pool(workers)
        results = pool.imap(_encode, jobs, chunksize=16)  # in order: the output does not depend on timing
    else:
        results = map(_encode, jobs)
    writer = wds.ShardWriter(os.path.join(out, SHARD_NAME), maxcount=shard_size, verbose=0, mtime=0,
                             post=lambda f: log(f"wrote {f} ({counts[os.path.basename(f)]} samples)"))
    try:
        for (path, cls), (ok, payload) in zip(files, results, strict=True):
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if not ok:  # as data._warn_bad words it (each file is read once here)
                first = payload[1].splitlines()[0][:200] if payload[1] else ""
                warnings.warn(f"skipping unreadable file {path}: {payload[0]}: {first}", RuntimeWarning, stacklevel=2)
                skipped.append(rel)
                continue
            ext, raw, was_resized = payload
            writer.write({"__key__": _sample_key(rel, taken), ext: raw, "cls": cls})
            name = os.path.basename(writer.fname)
            counts[name] = counts.get(name, 0) + 1
            resized += was_resized
    finally:
        if pool is not None:
            pool.terminate()
        if counts:
            writer.close()
        else:  # nothing written: no empty shard left behind
            writer.tarstream.close()
            os.remove(writer.fname)
    if not counts:
        raise data.UnreadableData(f"none of the {len(files)} files under {root!r} could be read as images")

    names = sorted(counts)
    last = len(names) - 1
    pattern = os.path.join(out, names[0] if last == 0 else "shard-{%06d..%06d}.tar" % (0, last))
    index = {
        "format": INDEX_FORMAT, "pattern": pattern,
        "shards": [{"name": n, "samples": counts[n]} for n in names],
        "samples": sum(counts.values()), "classes": list(folder.classes), "source": os.path.abspath(root),
        "max_side": max_side, "quality": quality if max_side else None, "resized": resized, "shuffled": shuffle,
        "skipped": len(skipped), "skipped_files": skipped,
    }
    tmp = os.path.join(out, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out, INDEX))
    bad = f", {len(skipped)} unreadable files left out" if skipped else ""
    log(f"{index['samples']} samples in {len(names)} shards{bad}; train with --data_path {pattern}")
    return index


# ---------------------------------------------------------------------------- reading
_warned_shards: set = set()


def _warn_shard(url: str, what: str, error) -> None:
    if url not in _warned_shards:  # once per shard and process
        _warned_shards.add(url)
        why = f" ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})" if error else ""
        warnings.warn(f"damaged shard {url}: {what}{why}", RuntimeWarning, stacklevel=3)


def _shard_samples(url: str, errors: list):
    """webdataset's samples of one shard; a read error ends it (recorded in ``errors``) instead of
    the stream (webdataset's ``warn_and_continue`` without its warning and its half-second sleep)."""
    from webdataset import tariterators

    return tariterators.tarfile_samples([{"url": url}], handler=lambda e: errors.append(e) or True)


def _count(url: str) -> int:
    errors: list = []
    n = sum(1 for _ in _shard_samples(url, errors))
    if errors:
        _warn_shard(url, f"only its first {n} samples could be read", errors[0])
    return n


def _counts(urls: list[str]) -> tuple[list[int], bool, list | None]:
    """The sample count of each shard, from the ``index.json`` beside it (:func:`prepare`'s), or
    counted by reading it; whether all came from an index; the classes of the (first) index."""
    indexes: dict = {}
    counts, indexed, classes = [], True, None
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in indexes:
            path = os.path.join(folder, INDEX)
            indexes[folder] = None
            if os.path.isfile(path):
                with open(path) as f:
                    index = json.load(f)
                indexes[folder] = {s["name"]: int(s["samples"]) for s in index.get("shards", [])}
                classes = classes if classes is not None else index.get("classes")
        known = indexes[folder]
        if known is not None and os.path.basename(url) in known:
            counts.append(known[os.path.basename(url)])
        else:
            counts.append(_count(url))
            indexed = False
    return counts, indexed, classes


def _shuffled(items, size: int, rng: random.Random):
    """``items`` through a shuffle buffer of ``size`` (drawn from ``rng``); ``size <= 1``: as they come."""
    if size <= 1:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def worker_quotas(n: int, batch_size: int, workers: int) -> list[int]:
    """How many of a process's ``n`` samples each DataLoader worker yields when worker ``j % workers``
    makes batch ``j`` (the last, partial batch included)."""
    nb, rem = divmod(n, batch_size)
    quotas = [batch_size * len(range(w, nb, workers)) for w in range(workers)]
    quotas[nb % workers] += rem
    return quotas


def _consumed(w: int, start: int, batch_size: int, workers: int) -> int:
    """How many of worker ``w``'s samples come before sample ``start`` of its process's epoch."""
    m, r = divmod(start, batch_size)
    return batch_size * len(range(w, m, workers)) + (r if m % workers == w else 0)


class _Entry:
    __slots__ = ("index", "name", "raw", "lost", "img", "error")

    def __init__(self, record, lost: bool):
        self.index, self.name, self.raw = record
        self.lost, self.img, self.error = lost, None, None


class ShardSamples(IterableDataset):
    """WebDataset shards streamed as :class:`fastmae.loader.DecodedSamples`' items:
    ``(uint8 image [3, H, W], box [4] int64, flip, noise [num_patches], skipped)``.

    ``source``: a shard, a brace pattern of shards (``dir/shard-{000000..000012}.tar``, local
    paths or any URL webdataset opens), or a folder written by :func:`prepare`. The sample counts
    come from the ``index.json`` beside the shards, or are counted once here by reading them.
    ``rank``, ``world_size``: this process and the process count (default: torch.distributed's, or
    0 and 1). ``batch_size``: the DataLoader's; needed to give each of several workers the samples of
    its batches (with ``num_workers`` above 1 it is required). ``shuffle_buffer``: samples each
    worker shuffles among (their encoded bytes are held).

    ``len()``: the samples each process yields per epoch, ``total // world_size``, the same on every
    process. ``set_epoch(epoch, start=0)``: the next iteration yields ``epoch`` from this process's
    ``start``-th sample on, exactly as an uninterrupted iteration would have from there, given the
    same seed, process count, batch size and worker count. The position reaches DataLoader workers
    through shared memory, so it works with ``persistent_workers`` too.
    """

    reports_skipped = True

    def __init__(self, source: str, num_patches: int, seed: int, rank: int | None = None,
                 world_size: int | None = None, batch_size: int | None = None,
                 shuffle_buffer: int = DEFAULT_BUFFER):
        _require_webdataset()
        source = str(source)
        if os.path.isdir(source):
            with open(os.path.join(source, INDEX)) as f:
                names = [s["name"] for s in json.load(f)["shards"]]
            self.urls = [os.path.join(source, n) for n in names]
        else:
            self.urls = _expand(source)
        missing = [u for u in self.urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
        if not self.urls or missing:
            raise ValueError(f"no shards at {source!r}" if not self.urls else f"{len(missing)} of the "
                             f"{len(self.urls)} shards of {source!r} do not exist: {missing[0]}, ...")
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0 if rank is None else rank
            world_size = torch.distributed.get_world_size() if dist else 1 if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.source, self.num_patches, self.seed = source, num_patches, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.shuffle_buffer = shuffle_buffer
        self.counts, self.indexed, self.classes = _counts(self.urls)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).tolist()  # each shard's first index
        self.total = int(self.offsets[-1])
        self.per_rank = self.total // world_size
        if self.per_rank == 0:
            raise ValueError(f"the shards {source!r} hold {self.total} samples: fewer than one per process "
                             f"({world_size} processes)")
        # (epoch, start) in shared memory: DataLoader workers (persistent ones too) read set_epoch's values
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __len__(self):
        return self.per_rank

    def __repr__(self):
        counted = "index.json" if self.indexed else "counted"
        return (f"WebDataset shards {self.source} ({len(self.urls)} shards, {self.total} samples ({counted}), "
                f"{self.per_rank} per process)")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.per_rank:
            raise IndexError(f"cannot start epoch {epoch} at sample {start} of {self.per_rank}")
        self._position[0], self._position[1] = epoch, start

    # ------------------------------------------------------------------------ the epoch's plan
    def _rng(self, *key) -> random.Random:
        s = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.seed >> 32, *key]).generate_state(2, np.uint32)
        return random.Random((int(s[0]) << 32) | int(s[1]))

    def shard_order(self, epoch: int) -> list[int]:
        """The order the shards are concatenated in for ``epoch``."""
        order = list(range(len(self.urls)))
        self._rng(epoch, _ORDER_TAG).shuffle(order)
        return order

    def _records(self, order: list[int], v: int, length: int | None):
        """``(index, name, image bytes)`` of the samples at positions ``v, v + 1, ...`` of the
        epoch's sequence of shards, ``length`` of them (fewer if shards are damaged) or, with None,
        on and on, wrapping around."""
        starts = np.concatenate([[0], np.cumsum([self.counts[s] for s in order])]).tolist()
        j = bisect.bisect_right(starts, v % self.total) - 1
        first, left, barren = v % self.total - starts[j], length, 0
        while left is None or left > 0:
            s = order[j]
            take = self.counts[s] - first if left is None else min(self.counts[s] - first, left)
            if take > 0:
                got = 0
                for rec in self._read(s, first, take):
                    got += 1
                    yield rec
                barren = 0 if got else barren + 1
                if left is not None:
                    left -= take
            if left is None and barren > len(order):
                raise data.UnreadableData(f"no sample of the shards {self.source!r} could be read")
            j, first = (j + 1) % len(order), 0

    def _read(self, s: int, first: int, count: int):
        """Samples ``first .. first + count - 1`` of shard ``s`` (the ones before are read, not kept)."""
        url, errors, got = self.urls[s], [], 0
        samples = _shard_samples(url, errors)
        try:
            for i, sample in enumerate(samples):
                if i >= first + count:
                    break
                if i >= first:
                    got += 1
                    yield self.offsets[s] + i, f"{url}:{sample['__key__']}", _image_of(sample)[1]
        finally:
            samples.close()
        if got < count:
            _warn_shard(url, f"its samples from {first + got} on could not be read ({first + count} expected), "
                             f"others stand in for them", errors[0] if errors else None)

    def __iter__(self):
        epoch, start = (int(x) for x in self._position.tolist())
        info = get_worker_info()
        workers, wid = (1, 0) if info is None else (info.num_workers, info.id)
        batch = self.batch_size
        if batch is None:
            if workers > 1:
                raise ValueError("ShardSamples read by several DataLoader workers needs the DataLoader's batch_size "
                                 "(ShardSamples(..., batch_size=B)) to give each worker the samples of its batches")
            batch = 1
        if workers > 1 and start % batch and start != self.per_rank:
            raise ValueError(f"with {workers} workers an epoch resumes at a whole batch, not at sample {start}")
        # after k batches the DataLoader's worker 0 makes batch k: worker ``wid`` plays the part of
        # worker (wid + k) % workers of the uninterrupted epoch
        part = (wid + start // batch) % workers
        quotas = worker_quotas(self.per_rank, batch, workers)
        quota, skip = quotas[part], _consumed(part, start, batch, workers)
        if skip >= quota:
            return
        order = self.shard_order(epoch)
        begin = self.rank * self.per_rank + sum(quotas[:part])
        mine = _shuffled(self._records(order, begin, quota), self.shuffle_buffer,
                         self._rng(epoch, self.rank, part, workers, _BUFFER_TAG))
        beyond = self._records(order, begin + quota, None)  # what makes up for lost samples
        stream = (_Entry(r, lost) for lost, part_ in ((False, mine), (True, beyond)) for r in part_)
        for _ in range(skip):
            next(stream)
        window: deque = deque()
        for _ in range(skip, quota):
            passed = 0
            while True:  # the first decodable of this position's sample and those after it
                if len(window) <= passed:
                    window.append(next(stream))
                entry = window[passed]
                if entry.img is None and entry.error is None:
                    try:
                        entry.img = decode_bytes(entry.raw)
                    except Exception as e:  # noqa: BLE001 - a decoder can raise anything for bad bytes
                        entry.error = e
                        data._warn_bad(entry.name, e)
                    entry.raw = None
                if entry.img is not None:
                    break
                passed += 1
                if passed >= data.MAX_CONSECUTIVE_BAD:
                    raise data.UnreadableData(f"{passed} samples in a row from {window[0].name} on could not be "
                                              f"decoded as images: check the shards")
            lost = window.popleft().lost
            with data.seeded(data.sample_seed(self.seed, epoch, entry.index)):
                box, flip, noise = loader.draw(entry.img, self.num_patches)
            yield entry.img, box, flip, noise, passed + int(lost)
