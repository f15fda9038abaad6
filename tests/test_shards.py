"""WebDataset shards (fastmae.shards): writing an ImageFolder as shards, streaming them for pre-training.

- ``prepare`` writes every readable image once (its own bytes, or re-encoded at ``max_side``), with
  its class, leaves the unreadable files out with a warning naming each, and writes index.json;
- ``ShardSamples`` yields ``DecodedSamples``' items, each drawn from the seed of its position in
  the dataset; an epoch covers the data once across the processes, the same number of samples on
  each, through a DataLoader with or without workers; the same seed gives the same batches, and
  ``set_epoch(e, start=k)`` gives exactly the rest of the uninterrupted epoch;
- undecodable samples and torn shards do not stop an epoch, and are counted in ``skipped``;
- end to end: ``fastmae prepare``, then ``fastmae pretrain`` on the shards with two torchrun
  processes (both ranks the same weights), and a run stopped mid-epoch resumes bit-identically.
"""
import json
import os
import shutil
from contextlib import nullcontext

import pytest
import torch
from trainkit import TINY, assert_states_equal, make_image_folder, run_two_processes

from fastmae import cli, data, loader, shards, train
from fastmae import checkpoint as ckpt_io

SEED, PATCHES, BATCH = 3, 16, 4
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _read_shards(urls):
    """Every sample of ``urls`` that webdataset reads, in order (a damaged shard's up to the damage)."""
    from webdataset import tariterators

    return list(tariterators.tarfile_samples([{"url": u} for u in urls], handler=lambda e: True))


def _noise_index(urls, epoch: int) -> dict:
    """The masking noise of each sample of epoch ``epoch`` -> the sample's position in the dataset:
    what identifies a sample in a batch."""
    out = {}
    for i, sample in enumerate(_read_shards(urls)):
        img = shards.decode_bytes(shards._image_of(sample)[1])
        with data.seeded(data.sample_seed(SEED, epoch, i)):
            _, _, noise = loader.draw(img, PATCHES)
        out[noise.numpy().tobytes()] = i
    return out


def _indices(noise: torch.Tensor, table: dict) -> list:
    return [table[row.numpy().tobytes()] for row in noise]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """24 good 40x48 PNGs in 2 classes as shards of 5 (the last one of 4)."""
    root = tmp_path_factory.mktemp("shards")
    folder = make_image_folder(root / "images", n=24)
    index = shards.prepare(folder, str(root / "out"), shard_size=5, log=lambda *a: None)
    return root / "out", index


def _same(a: list, b: list) -> bool:
    """Two lists of batches are equal, bit for bit."""
    return len(a) == len(b) and all(torch.equal(x, y) for u, v in zip(a, b) for x, y in zip(u, v, strict=True))


def _loader(ds, workers: int, persistent: bool = False):
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers, drop_last=True,
                                       collate_fn=loader.Collate(32, crop_here=True),
                                       persistent_workers=persistent and workers > 0)


def test_prepare_writes_the_readable_images_and_an_index(tmp_path):
    from PIL import Image

    folder = make_image_folder(tmp_path / "images", n=10)
    cls0 = tmp_path / "images" / "class0"
    Image.open(cls0 / "0.png").convert("RGB").resize((150, 90)).save(cls0 / "big.jpeg", quality=95)
    (cls0 / "3a.jpg").write_bytes((cls0 / "big.jpeg").read_bytes()[:600])  # truncated JPEG
    (cls0 / "5a.png").write_bytes(b"not an image at all")
    with pytest.warns(RuntimeWarning, match="skipping unreadable file") as caught:
        index = shards.prepare(folder, str(tmp_path / "out"), max_side=60, shard_size=4, log=lambda *a: None)
    named = " ".join(str(w.message) for w in caught)
    assert str(cls0 / "3a.jpg") in named and str(cls0 / "5a.png") in named
    assert index["skipped"] == 2 and sorted(index["skipped_files"]) == ["class0/3a.jpg", "class0/5a.png"]
    assert index["samples"] == 11 and [s["samples"] for s in index["shards"]] == [4, 4, 3]
    assert index["classes"] == ["class0", "class1"] and index["resized"] == 1
    assert index["pattern"] == str(tmp_path / "out" / "shard-{000000..000002}.tar")
    assert json.loads((tmp_path / "out" / shards.INDEX).read_text()) == index
    assert shards.is_shard_source(index["pattern"]) and shards.is_shard_source(str(tmp_path / "out"))
    assert not shards.is_shard_source(folder)

    samples = _read_shards(sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar")))
    assert len(samples) == 11 and len({s["__key__"] for s in samples}) == 11
    for s in samples:
        ext, raw = shards._image_of(s)
        cls = int(s["cls"])
        if s["__key__"] == "class0/big":  # 150x90 > 60: re-encoded at 60x36
            assert ext == "jpg" and shards.decode_bytes(raw).shape == (3, 36, 60) and cls == 0
        else:  # the file's own bytes
            name = f"{s['__key__']}.{ext}"
            assert raw == (tmp_path / "images" / name).read_bytes() and name.startswith(f"class{cls}/")
    # the same output twice, and an existing output is not overwritten unless asked
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="already holds shards"):
        shards.prepare(folder, str(tmp_path / "out"), log=lambda *a: None)
    with pytest.warns(RuntimeWarning, match="skipping unreadable file"):  # decoded by two processes: the same
        again = shards.prepare(folder, str(tmp_path / "out"), max_side=60, shard_size=4, log=lambda *a: None,
                               overwrite=True, workers=2)
    assert again == index and {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == written


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_covers_the_data_once_across_processes(prepared, world):
    out, index = prepared
    urls = [str(out / s["name"]) for s in index["shards"]]
    per_rank = []
    for rank in range(world):
        ds = shards.ShardSamples(index["pattern"], PATCHES, SEED, rank=rank, world_size=world)
        assert len(ds) == 24 // world
        ds.set_epoch(5)
        items = list(ds)
        assert len(items) == len(ds) and all(skipped == 0 for *_, skipped in items)
        per_rank.append(_indices(torch.stack([it[3] for it in items]), _noise_index(urls, 5)))
        img, box, flip, noise, _ = items[0]
        assert img.dtype == torch.uint8 and img.shape == (3, 40, 48) and box.dtype == torch.int64
        assert noise.shape == (PATCHES,) and isinstance(flip, bool)
    seen = sorted(i for r in per_rank for i in r)
    assert seen == list(range(24))  # disjoint, and together all of it
    assert per_rank[0] != sorted(per_rank[0])  # shuffled


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_reproducible_and_resume_exactly(prepared, workers):
    out, index = prepared
    urls = [str(out / s["name"]) for s in index["shards"]]

    def epoch_batches(e, start=0, ds=None, dl=None):
        if ds is None:
            ds = shards.ShardSamples(str(out), PATCHES, SEED, rank=1, world_size=2, batch_size=BATCH,
                                     shuffle_buffer=4)
            dl = _loader(ds, workers)
        ds.set_epoch(e, start=start)
        return list(dl)

    first = epoch_batches(1)
    assert len(first) == 12 // BATCH
    imgs, noise, skipped = first[0]
    assert imgs.shape == (BATCH, 3, 32, 32) and imgs.dtype == torch.float32 and not skipped.any()
    again = epoch_batches(1)
    assert _same(first, again)
    ranks = [shards.ShardSamples(str(out), PATCHES, SEED, rank=r, world_size=2, batch_size=BATCH, shuffle_buffer=4)
             for r in (0, 1)]
    table = _noise_index(urls, 1)
    got = sorted(i for r in ranks for _, noise, _ in epoch_batches(1, ds=r, dl=_loader(r, workers)) for i in
                 _indices(noise, table))
    assert got == list(range(24))
    # one loader across epochs (persistent workers see set_epoch), and a resume after 1 and 2 batches
    ds = shards.ShardSamples(str(out), PATCHES, SEED, rank=1, world_size=2, batch_size=BATCH, shuffle_buffer=4)
    dl = _loader(ds, workers, persistent=True)
    assert not torch.equal(epoch_batches(0, ds=ds, dl=dl)[0][1], first[0][1])
    for k in (1, 2):
        tail = epoch_batches(1, start=k * BATCH, ds=ds, dl=dl)
        assert _same(first[k:], tail)


def test_undecodable_samples_are_replaced_by_the_next_and_counted(tmp_path):
    """Shards written by another tool, without index.json: counted by reading them."""
    import webdataset as wds

    good = make_image_folder(tmp_path / "images", n=7, classes=1)
    files = sorted((tmp_path / "images" / "class0").iterdir())
    with wds.ShardWriter(str(tmp_path / "s-%02d.tar"), maxcount=4, verbose=0) as w:
        for i, f in enumerate(files[:1] + [None] + files[1:]):
            w.write({"__key__": f"k{i}", "png": f.read_bytes() if f else b"garbage", "cls": 0})
    assert good and sorted(os.listdir(tmp_path))[-2:] == ["s-00.tar", "s-01.tar"]
    ds = shards.ShardSamples(str(tmp_path / "s-{00..01}.tar"), PATCHES, SEED, shuffle_buffer=1)
    assert len(ds) == 8 and not ds.indexed
    with pytest.warns(RuntimeWarning, match="skipping unreadable file .*s-00.tar:k1"):
        items = list(ds)
    assert len(items) == 8 and sum(it[4] for it in items) == 1
    bad = [i for i, it in enumerate(items) if it[4]]
    assert len(bad) == 1 and torch.equal(items[bad[0]][3], items[bad[0] + 1][3])  # the next one stands in


@pytest.mark.filterwarnings("ignore:skipping unreadable file")  # the sample torn in two
@pytest.mark.parametrize("workers", [0, 2])
def test_a_torn_shard_does_not_stop_the_epoch(prepared, tmp_path, workers):
    out, index = prepared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    torn = copy / "shard-000002.tar"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 3])  # 5 samples, most of them lost
    ds = shards.ShardSamples(str(copy), PATCHES, SEED, batch_size=BATCH)
    # (a worker's warnings go to its stderr, out of pytest's sight)
    with pytest.warns(RuntimeWarning, match="damaged shard .*shard-000002.tar") if not workers else nullcontext():
        batches = list(_loader(ds, workers))
    assert len(batches) == 24 // BATCH
    left = _read_shards([str(torn)])
    lost, broken = 5 - len(left), sum(shards._image_of(s)[1] is None for s in left)  # the one torn in two
    assert lost >= 2 and sum(int(b[2].sum()) for b in batches) == lost + broken
    ds.set_epoch(0, start=2 * BATCH)  # resuming behind the tear: the same rest of the epoch
    tail = list(_loader(ds, workers))
    assert _same(batches[2:], tail)


def test_clear_errors():
    with pytest.raises(ValueError, match="do not exist"):
        shards.ShardSamples("/nonexistent/shard-{0..3}.tar", PATCHES, SEED)
    assert shards.worker_quotas(10, 4, 2) == [6, 4] and shards.worker_quotas(10, 4, 3) == [4, 4, 2]


# ---------------------------------------------------------------------------- end to end
def _pretrain_argv(out, source, *extra):
    return ["pretrain", *TINY, "--data_path", str(source), "--output_dir", str(out), "--log_dir", str(out),
            *map(str, extra)]


def test_prepare_then_pretrain_on_two_processes(tmp_path):
    folder = make_image_folder(tmp_path / "images", n=24)
    assert cli.main(["prepare", "--data_path", folder, "--out", str(tmp_path / "shards"), "--shard-size", "6"]) == 0
    proc, (r0, r1) = run_two_processes(tmp_path, "train", "pretrain",
                                       _pretrain_argv(tmp_path / "run", tmp_path / "shards", "--batch_size", "3"))
    assert "x 2 process(es)" in proc.stdout and "WebDataset shards" in proc.stdout
    assert_states_equal(r0, r1, "rank0 vs rank1")
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [4, 8]  # 12 samples per process, batches of 3
    assert all(ln["skipped_files"] == 0 for ln in lines)


def test_a_run_on_shards_resumes_mid_epoch_bit_identically(prepared, tmp_path):
    out, _ = prepared
    whole = train.pretrain(cli.build_parser().parse_args(_pretrain_argv(tmp_path / "a", out, "--num_workers", "2")))
    first = cli.build_parser().parse_args(_pretrain_argv(tmp_path / "b", out, "--num_workers", "2", "--max-steps", "9"))
    train.pretrain(first)
    assert ckpt_io.load(str(tmp_path / "b" / ckpt_io.LAST))["epoch_iter"] == 3  # stopped inside epoch 2
    resumed = train.pretrain(cli.build_parser().parse_args(
        _pretrain_argv(tmp_path / "b", out, "--num_workers", "2", "--resume", "auto")))
    assert_states_equal(whole.model.state_dict(), resumed.model.state_dict(), "resumed vs whole")
    with pytest.raises(ckpt_io.CheckpointError, match="--num_workers"):  # a streamed order depends on it
        train.pretrain(cli.build_parser().parse_args(_pretrain_argv(tmp_path / "c", out, "--max-steps", "9")))
        train.pretrain(cli.build_parser().parse_args(
            _pretrain_argv(tmp_path / "c", out, "--num_workers", "1", "--resume", "auto")))
