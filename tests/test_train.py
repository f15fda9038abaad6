"""The training recipe, data pipeline, checkpoints, resumption and DDP of ``fastmae pretrain``."""
import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastmae import checkpoint as ckpt_io
from fastmae import data, engine, pretrained, train
from helpers import load_golden
from trainkit import (TINY, assert_states_equal, assert_trained_close, make_image_folder, pretrain_args,
                      run_two_processes)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 small photographs in 2 class folders (4 steps of 4 images per epoch)."""
    return make_image_folder(tmp_path_factory.mktemp("images"), n=16)


def run(out, folder, *extra, **kw):
    return train.pretrain(pretrain_args(out, "--data_path", folder, *extra), **kw)


# ---------------------------------------------------------------------------- module structure
def _fastmae_imports() -> dict:
    """{module: the fastmae/*.py modules it imports, at the top or inside functions}."""
    import ast

    root = pathlib.Path(train.__file__).parent
    names = {p.stem for p in root.glob("*.py")} - {"__init__"}
    graph = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if not node.level and not module.startswith("fastmae"):
                    continue
                module = module if node.level else module.removeprefix("fastmae").lstrip(".")
                deps |= {module.split(".")[0]} if module else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("fastmae.")}
        graph[path.stem] = (deps & names) - {path.stem}
    return graph


def test_fastmae_modules_import_each_other_without_cycles():
    graph = _fastmae_imports()
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module not in done:
            path.append(module)
            for dep in sorted(graph[module]):
                visit(dep)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)
    # the engine is shared by every training command: it knows no model, recipe or picture
    assert not graph["engine"] & {"model", "reference", "train", "visualize"}, graph["engine"]


# ---------------------------------------------------------------------------- recipe
def test_learning_rate_schedule_is_warmup_then_half_cosine():
    args = SimpleNamespace(lr=2.0, min_lr=0.5, warmup_epochs=4, epochs=10)
    assert train.learning_rate(0, args) == 0
    assert train.learning_rate(1, args) == pytest.approx(0.5)  # linear: lr * epoch / warmup
    assert train.learning_rate(3.5, args) == pytest.approx(1.75)
    assert train.learning_rate(4, args) == pytest.approx(2.0)  # peak
    assert train.learning_rate(7, args) == pytest.approx(1.25)  # cosine midpoint: (lr + min_lr) / 2
    assert train.learning_rate(10, args) == pytest.approx(0.5)  # min_lr at the end
    decay = [train.learning_rate(4 + 0.25 * i, args) for i in range(25)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_weight_decay_groups():
    model = train.make_model("mae_vit_micro_patch8", 32)
    no_decay, decay = train.param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    dd = {names[id(p)] for p in decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert nd | dd == trainable and not nd & dd
    assert {"cls_token", "mask_token", "norm.weight", "blocks.0.norm1.weight", "decoder_pred.bias"} <= nd
    assert all(n.endswith(".weight") and "norm" not in n for n in dd)
    assert "blocks.0.attn.qkv.weight" in dd and "patch_embed.proj.weight" in dd
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable  # frozen sin-cos


def test_lr_rule_and_optimizer(tmp_path, folder):
    res = run(tmp_path, folder, "--accum_iter", "2", "--blr", "1e-3", "--max-steps", "1")
    ckpt = ckpt_io.load(res.checkpoint)
    assert ckpt["args"]["lr"] == pytest.approx(1e-3 * 4 * 2 / 256)  # blr * batch * accum * procs / 256
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["betas"] for g in groups] == [(0.9, 0.95)] * 2
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05]
    res = run(tmp_path / "abs", folder, "--lr", "0.123", "--max-steps", "1")
    assert ckpt_io.load(res.checkpoint)["args"]["lr"] == 0.123  # --lr wins over --blr


def test_attn_backend_reaches_every_attention_layer(tmp_path, folder, monkeypatch):
    from fastmae import ops

    used, real = [], ops.attention

    def spy(q, k, v, backend="auto"):
        used.append(backend)
        return real(q, k, v, backend=backend)

    monkeypatch.setattr(ops, "attention", spy)  # what the model's Attention layers call
    run(tmp_path, folder, "--attn-backend", "math", "--max-steps", "1")
    assert len(used) >= 3 and set(used) == {"math"}  # 2 encoder + 1 decoder blocks, at least once each


def test_the_schedule_sets_the_optimizers_lr(tmp_path, folder):
    """Each step's lr is the schedule's at its first batch: after 3 steps of 4 per epoch with 1
    warmup epoch, the third step ran at lr * 2/4, in every parameter group."""
    res = run(tmp_path, folder, "--max-steps", "3")
    ckpt = ckpt_io.load(res.checkpoint)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [pytest.approx(0.5 * ckpt["args"]["lr"])] * 2


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clip_grad_bounds_the_norm_the_optimizer_steps_with(tmp_path, folder, precision, monkeypatch):
    """--clip-grad: the gradients AdamW steps with have at most that norm. With fp16 the scaler
    may hand the fused AdamW still-scaled gradients and their scale (``grad_scale``), which it
    divides by itself: the norm is taken after that division, so clipping the scaled gradients
    (before unscaling them) would fail here."""
    norms = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        scale = getattr(self, "grad_scale", None)
        norms.append(float(torch.nn.utils.get_total_norm(grads)) / (1.0 if scale is None else float(scale)))
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run(tmp_path / "free", folder, "--precision", precision, "--max-steps", "3")
    free = norms[:]
    norms.clear()
    run(tmp_path / "clipped", folder, "--precision", precision, "--max-steps", "3", "--clip-grad", "0.01")
    assert len(free) == len(norms) == 3 and min(free) > 0.1  # unclipped, every norm is far above 0.01
    assert max(norms) <= 0.01 * (1 + 1e-4) and min(norms) >= 0.01 * (1 - 1e-2)


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_huge_patch14", "mae_vit_tiny_patch8"])
def test_input_size_builds_the_model_for_that_size(name):
    p = {"mae_vit_huge_patch14": 14}.get(name, 16 if "patch16" in name else 8)
    size = 3 * p if name != "mae_vit_tiny_patch8" else 40
    model = train.make_model(name, size) if "tiny" in name else None
    if model is None:  # full-size encoders are big: check the configuration on the meta device
        with torch.device("meta"):
            model = train.make_model(name, size)
    assert model.patch_embed.img_size == (size, size)
    assert model.pos_embed.shape[1] == (size // p) ** 2 + 1


def test_bad_model_and_input_size():
    with pytest.raises(ValueError, match="unknown --model 'mae_vit_gigantic'.*mae_vit_base_patch16"):
        train.make_model("mae_vit_gigantic", 224)
    with pytest.raises(ValueError, match="--input_size 100 is not a multiple of the patch size 16"):
        train.make_model("mae_vit_base_patch16", 100)


# ---------------------------------------------------------------------------- data
def test_image_folder_with_and_without_train_subfolder(tmp_path):
    flat = make_image_folder(tmp_path / "flat", n=6)
    make_image_folder(tmp_path / "nested" / "train", n=5)
    assert len(data.build_dataset(flat)) == 6
    assert len(data.build_dataset(str(tmp_path / "nested"))) == 5  # DIR/train is used when present
    img, label = data.build_dataset(flat)[0]
    assert img.mode == "RGB" and label in (0, 1)


def test_bad_data_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.build_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no training images found"):
        data.build_dataset(str(tmp_path / "empty"))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no training images found"):
        data.build_dataset(str(tmp_path / "noimg"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        data.build_dataset(str(tmp_path / "file.png"))


def test_embedded_photographs_are_real_images():
    ds = data.EmbeddedImages(repeats=2)
    assert len(ds) == 2 * len(data.EMBEDDED_IMAGES)
    for i in range(len(data.EMBEDDED_IMAGES)):
        img, _ = ds[i]
        assert img.mode == "RGB" and min(img.size) >= 150
        arr = torch.tensor(__import__("numpy").array(img), dtype=torch.float32)
        assert arr.std() > 10  # a photograph, not a flat colour


def test_transform_is_the_official_one():
    from torchvision import transforms

    tf = data.train_transform(48)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.ToTensor,
                     transforms.Normalize]
    crop = tf.transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert tf.transforms[3].mean == data.IMAGENET_MEAN and tf.transforms[3].std == data.IMAGENET_STD


def test_samples_are_seeded_by_seed_epoch_index():
    ds = data.SeededSamples(data.EmbeddedImages(repeats=1), data.train_transform(32), 16, seed=3)
    before = torch.get_rng_state()
    a_img, a_noise, skipped = ds[(2, 5)]
    assert skipped == 0
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG stream is untouched
    torch.manual_seed(123)  # ... and does not influence the sample
    b_img, b_noise, _ = ds[(2, 5)]
    assert torch.equal(a_img, b_img) and torch.equal(a_noise, b_noise)
    assert a_img.shape == (3, 32, 32) and a_noise.shape == (16,)
    c_img, c_noise, _ = ds[(2, 6)]  # next epoch: another crop and mask
    assert not torch.equal(a_img, c_img) and not torch.equal(a_noise, c_noise)
    assert len({data.sample_seed(0, e, i) for e in range(20) for i in range(50)}) == 1000


def test_epoch_sampler_resumes_and_shards():
    ds = list(range(40))
    full = data.EpochSampler(ds, 1, 0, seed=7)
    full.set_epoch(3)
    order = list(full)
    assert sorted(i for i, _ in order) == ds and all(e == 3 for _, e in order)
    full.set_epoch(3, start=12)
    assert list(full) == order[12:] and len(full) == 28
    shards = [data.EpochSampler(ds, 2, r, seed=7) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    r0, r1 = (list(s) for s in shards)
    # per step, two ranks with batch b see exactly the samples one process sees with batch 2b
    b = 4
    for k in range(len(r0) // b):
        assert set(r0[k * b:(k + 1) * b] + r1[k * b:(k + 1) * b]) == set(order[2 * k * b:2 * (k + 1) * b])
    with pytest.raises(IndexError, match="cannot start epoch"):
        full.set_epoch(0, start=41)


# ---------------------------------------------------------------------------- runs, logs, checkpoints
def test_run_writes_log_checkpoints_and_summary(tmp_path, folder, capsys):
    res = run(tmp_path, folder, "--epochs", "3", "--warmup_epochs", "1")
    out = capsys.readouterr().out
    lines = [json.loads(ln) for ln in (tmp_path / "log.txt").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [0, 1, 2]
    for ln in lines:
        assert {"train_lr", "train_loss", "epoch"} <= ln.keys() and math.isfinite(ln["train_loss"])
    assert [ln["step"] for ln in lines] == [4, 8, 12]
    assert res.steps == 12 and res.final_loss is not None
    written = sorted(f for f in os.listdir(tmp_path) if not f.startswith("events.out.tfevents"))  # TensorBoard's, if installed
    assert written == ["checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-last.pth", "log.txt"]
    last = ckpt_io.load(str(tmp_path / "checkpoint-last.pth"))
    assert (last["epoch"], last["epoch_iter"], last["step"]) == (3, 0, 12)
    assert torch.equal(last["model"]["cls_token"], ckpt_io.load(str(tmp_path / "checkpoint-2.pth"))["model"]["cls_token"])
    assert last["model_config"]["img_size"] == [32, 32] and last["args"]["model"] == "mae_vit_micro_patch8"
    assert {"torch", "numpy", "python", "cuda"} <= last["rng"].keys()
    for text in ("done: 12 steps", "images/s", "final loss", f"checkpoint: {tmp_path}", "epoch 3/3  loss"):
        assert text in out
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary files left behind


def test_loss_falls_on_the_embedded_photographs(tmp_path):
    args = pretrain_args(tmp_path, "--epochs", "6", "--warmup_epochs", "1", "--batch_size", "8")
    res = train.pretrain(args, dataset=data.EmbeddedImages(repeats=4))  # 60 crops per epoch
    assert len(res.losses) == 6
    assert res.losses[-1] < 0.8 * res.losses[0], res.losses


def test_progress_bar_shows_loss_lr_and_throughput(tmp_path, folder, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    run(tmp_path, folder, "--epochs", "1")
    text = term.getvalue()
    assert "epoch 1/1" in text and "loss=" in text and "lr=" in text and "img_s=" in text


def test_tensorboard_scalars(tmp_path, folder, monkeypatch):
    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("closed", None, None))

    monkeypatch.setattr(engine, "_tensorboard", lambda log_dir: Writer())
    run(tmp_path, folder, "--epochs", "1")
    assert [t for t, _, _ in scalars].count("train_loss") == 4 and [t for t, _, _ in scalars].count("lr") == 4
    assert [s for t, _, s in scalars if t == "lr"] == [250, 500, 750, 1000]  # epoch_1000x, as official
    assert scalars[-1][0] == "closed"


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert engine._tensorboard(str(tmp_path)) is None
    assert engine._tensorboard(None) is None


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, folder, precision, monkeypatch):
    """--precision runs the forward under autocast (the decoder's output layer computes in that
    dtype), with fp32 master weights and, for fp16, a gradient scaler."""
    seen = []
    real = train.make_model

    def create(*a, **k):
        model = real(*a, **k)
        model.decoder_pred.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(train, "make_model", create)
    res = run(tmp_path, folder, "--precision", precision, "--max-steps", "3", "--clip-grad", "1.0")
    assert seen and set(seen) == {train.PRECISIONS[precision]}
    assert math.isfinite(res.final_loss)
    ckpt = ckpt_io.load(res.checkpoint)
    assert (ckpt["scaler"] is not None) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # master weights stay fp32


def test_accumulation_equals_a_bigger_batch(tmp_path, folder):
    """accum_iter=2 with batch 4 takes the same steps as batch 8 (same samples, same lr)."""
    a = run(tmp_path / "a", folder, "--accum_iter", "2", "--epochs", "1")
    b = run(tmp_path / "b", folder, "--batch_size", "8", "--epochs", "1")
    assert a.steps == b.steps == 2
    assert_trained_close(a.model.state_dict(), b.model.state_dict(), ckpt_io.load(a.checkpoint)["args"]["lr"], 2)


def test_result_does_not_depend_on_the_worker_count(tmp_path, folder):
    a = run(tmp_path / "a", folder, "--max-steps", "2")
    b = run(tmp_path / "b", folder, "--max-steps", "2", "--num_workers", "2")
    assert_states_equal(a.model.state_dict(), b.model.state_dict(), "model")


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("accum", [1, 2])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, folder, accum):
    """Stop mid-epoch (--max-steps), resume with --resume auto: same weights, bit for bit."""
    steps_per_epoch = 4 // accum
    flags = ("--accum_iter", accum, "--epochs", "3")
    full = run(tmp_path / "full", folder, *flags)
    part = tmp_path / "part"
    first = run(part, folder, *flags, "--max-steps", steps_per_epoch + 1)
    stop = ckpt_io.load(first.checkpoint)
    assert (stop["epoch"], stop["epoch_iter"], stop["step"]) == (1, accum, steps_per_epoch + 1)
    rest = run(part, folder, *flags, "--resume", "auto")
    assert rest.steps == full.steps == 3 * steps_per_epoch
    a, b = ckpt_io.load(str(tmp_path / "full" / "checkpoint-last.pth")), ckpt_io.load(str(part / "checkpoint-last.pth"))
    assert_states_equal(a["model"], b["model"], "model")
    assert_states_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    logs = [(tmp_path / d / "log.txt").read_text().splitlines() for d in ("full", "part")]
    strip = lambda ln: {k: v for k, v in json.loads(ln).items() if k in ("train_lr", "train_loss", "epoch", "step")}  # noqa: E731
    assert [strip(x) for x in logs[0]] == [strip(x) for x in logs[1]]  # the epoch interrupted logs the same line


def test_resume_from_a_save_every_checkpoint_after_a_crash(tmp_path, folder):
    """--save-every 2, the process dies at step 3: the step-2 checkpoint resumes bit-exactly."""
    full = run(tmp_path / "full", folder, "--epochs", "2")

    class Crash(Exception):
        pass

    def crash_at(step):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        run(tmp_path / "part", folder, "--epochs", "2", "--save-every", "2", on_step=crash_at)
    saved = ckpt_io.load(str(tmp_path / "part" / "checkpoint-last.pth"))
    assert (saved["epoch"], saved["epoch_iter"], saved["step"]) == (0, 2, 2)
    rest = run(tmp_path / "part", folder, "--epochs", "2", "--resume", str(tmp_path / "part" / "checkpoint-last.pth"))
    assert rest.steps == full.steps
    assert_states_equal(full.model.state_dict(), rest.model.state_dict(), "model")


def test_latest_checkpoint(tmp_path):
    assert ckpt_io.latest(str(tmp_path)) is None
    for name in ("checkpoint-3.pth", "checkpoint-12.pth", "checkpoint-7.pth", "checkpoint-x.pth", "other.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert ckpt_io.latest(str(tmp_path)) == str(tmp_path / "checkpoint-12.pth")  # numerically, not by name
    (tmp_path / "checkpoint-last.pth").write_bytes(b"x")
    assert ckpt_io.latest(str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    odd = tmp_path / "runs[1]*?"  # glob's special characters in the folder name
    odd.mkdir()
    (odd / "checkpoint-20.pth").write_bytes(b"x")
    assert ckpt_io.latest(str(odd)) == str(odd / "checkpoint-20.pth")


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, folder, capsys):
    res = run(tmp_path, folder, "--epochs", "1", "--resume", "auto")
    assert res.steps == 4 and "no checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def good_ckpt(tmp_path, folder):
    return run(tmp_path / "good", folder, "--max-steps", "1").checkpoint


def _resume_error(tmp_path, folder, path, *extra):
    with pytest.raises(ckpt_io.CheckpointError) as info:
        run(tmp_path / "resume", folder, "--resume", path, *extra)
    return str(info.value)


class _Unsafe:
    """An object a weights-only load refuses to rebuild."""


def test_missing_empty_truncated_and_garbage_checkpoints(tmp_path, folder, good_ckpt):
    assert "does not exist" in _resume_error(tmp_path, folder, str(tmp_path / "nope.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert "empty" in _resume_error(tmp_path, folder, str(empty))
    blob = open(good_ckpt, "rb").read()
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10  # one bit, inside the tensor data: torch.load alone would not notice
    for name, content in [("truncated", blob[: len(blob) // 2]), ("garbage", os.urandom(4096)),
                          ("cut_tail", blob[:-100]), ("bit_flip", bytes(flipped))]:
        p = tmp_path / f"{name}.pth"
        p.write_bytes(content)
        assert "corrupt" in _resume_error(tmp_path, folder, str(p)), name
    official = tmp_path / "official.pth"  # what the official main_pretrain.py writes (args: a Namespace)
    torch.save({"model": {}, "optimizer": {}, "epoch": 3, "scaler": {},
                "args": argparse.Namespace(lr=1e-3, output_dir="out")}, official)
    assert "not a fastmae checkpoint" in _resume_error(tmp_path, folder, str(official))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {}, "obj": _Unsafe()}, pickled)
    assert "a safe (weights-only) load refuses" in _resume_error(tmp_path, folder, str(pickled))
    incomplete = torch.load(good_ckpt, weights_only=True)
    del incomplete["optimizer"]
    torch.save(incomplete, tmp_path / "incomplete.pth")
    assert "lacks optimizer" in _resume_error(tmp_path, folder, str(tmp_path / "incomplete.pth"))


def test_checkpoint_of_a_python_caller_with_path_arguments_loads(tmp_path, folder):
    """A Python caller may pass pathlib.Path values; the stored args stay weights-only loadable."""
    args = pretrain_args(tmp_path, "--data_path", folder, "--epochs", "1")
    args.output_dir, args.data_path = tmp_path, pathlib.Path(folder)
    train.pretrain(args)
    ckpt = ckpt_io.load(str(tmp_path / ckpt_io.LAST))
    assert ckpt["args"]["output_dir"] == str(tmp_path) and ckpt["args"]["data_path"] == folder


def test_mismatched_checkpoints_are_refused_before_loading_anything(tmp_path, folder, good_ckpt, monkeypatch):
    loads = []
    real = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: loads.append(1) or real(self, *a, **k))
    msg = _resume_error(tmp_path, folder, good_ckpt, "--input_size", "40")
    assert "different model" in msg and "img_size" in msg
    msg = _resume_error(tmp_path, folder, good_ckpt, "--norm_pix_loss")
    assert "norm_pix_loss" in msg
    bad = torch.load(good_ckpt, weights_only=True)
    bad["model"]["blocks.0.attn.qkv.weight"] = bad["model"]["blocks.0.attn.qkv.weight"][:-1]
    torch.save(bad, tmp_path / "shape.pth")
    assert "blocks.0.attn.qkv.weight" in _resume_error(tmp_path, folder, str(tmp_path / "shape.pth"))
    bad = torch.load(good_ckpt, weights_only=True)
    bad["model"]["extra.weight"] = torch.zeros(1)
    del bad["model"]["norm.bias"]
    torch.save(bad, tmp_path / "keys.pth")
    msg = _resume_error(tmp_path, folder, str(tmp_path / "keys.pth"))
    assert "missing keys ['norm.bias']" in msg and "unexpected keys ['extra.weight']" in msg
    bad = torch.load(good_ckpt, weights_only=True)
    bad["model"]["norm.weight"][0] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    assert "non-finite" in _resume_error(tmp_path, folder, str(tmp_path / "nan.pth"))
    mid = torch.load(good_ckpt, weights_only=True)
    assert mid["epoch_iter"] == 1
    msg = _resume_error(tmp_path, folder, good_ckpt, "--batch_size", "2")
    assert "mid-epoch" in msg
    assert loads == []  # nothing was loaded by any refused resume


def test_mid_epoch_resume_needs_the_settings_that_fix_the_position(tmp_path, folder, good_ckpt):
    """epoch_iter counts batches of --batch_size and the epoch's order follows --seed: resuming
    mid-epoch with the same global batch split otherwise, or another seed, would skip or repeat
    samples (or stop on a batch that is not a step's first)."""
    assert ckpt_io.load(good_ckpt)["epoch_iter"] == 1  # batch 4 x accum 1, stopped after 1 of 4 batches
    msg = _resume_error(tmp_path, folder, good_ckpt, "--batch_size", "2", "--accum_iter", "2")
    assert "mid-epoch" in msg and "--batch_size: checkpoint 4 vs this run 2" in msg
    assert "--accum_iter: checkpoint 1 vs this run 2" in msg
    assert "--seed: checkpoint 0 vs this run 7" in _resume_error(tmp_path, folder, good_ckpt, "--seed", "7")
    other = torch.load(good_ckpt, weights_only=True)
    other["position_settings"]["process count"] = 2  # written by 2 processes
    torch.save(other, tmp_path / "two.pth")
    assert "process count: checkpoint 2 vs this run 1" in _resume_error(tmp_path, folder, str(tmp_path / "two.pth"))
    fewer = make_image_folder(tmp_path / "fewer", n=12)
    msg = _resume_error(tmp_path, fewer, good_ckpt)
    assert "samples: checkpoint 16 vs this run 12" in msg
    # a checkpoint written before the settings were stored: read from its arguments
    old = torch.load(good_ckpt, weights_only=True)
    del old["position_settings"]
    old["global_batch"] = 4
    torch.save(old, tmp_path / "old.pth")
    msg = _resume_error(tmp_path, folder, str(tmp_path / "old.pth"), "--batch_size", "2", "--accum_iter", "2")
    assert "--accum_iter: checkpoint 1 vs this run 2" in msg and "process count: checkpoint" not in msg
    assert run(tmp_path / "old", folder, "--resume", str(tmp_path / "old.pth")).steps == 8  # the same: resumes
    # at an epoch's start nothing is mid-way: another split of the batch goes on
    run(tmp_path / "edge", folder, "--epochs", "1")
    res = run(tmp_path / "edge", folder, "--batch_size", "2", "--accum_iter", "2", "--seed", "3", "--resume", "auto")
    assert res.steps == 4 + 4


def test_a_fresh_run_never_replaces_an_earlier_runs_checkpoints(tmp_path, folder):
    out, other = tmp_path / "run", tmp_path / "other"
    first = run(out, folder, "--epochs", "1")
    elsewhere = run(other, folder, "--epochs", "1", "--seed", "3").checkpoint
    before = {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pth")}
    assert set(before) == {"checkpoint-last.pth", "checkpoint-0.pth"}
    for extra in [(), ("--resume", elsewhere)]:  # afresh, or continuing a run from another folder
        with pytest.raises(ValueError, match=r"holds an earlier run's checkpoint.*--resume auto.*--overwrite"):
            run(out, folder, "--epochs", "2", "--seed", "5", *extra)
    assert {p.name: p.read_bytes() for p in out.glob("checkpoint-*.pth")} == before
    # continuing the folder's own run is allowed, by auto or by its path
    assert run(out, folder, "--epochs", "2", "--resume", "auto").steps == 8
    assert run(out, folder, "--epochs", "3", "--resume", first.checkpoint).steps == 12
    assert {p.name for p in out.glob("checkpoint-*.pth")} == {"checkpoint-last.pth", "checkpoint-0.pth",
                                                              "checkpoint-1.pth", "checkpoint-2.pth"}
    # --overwrite deletes the earlier run's checkpoints, log and picture before it starts
    (out / "reconstruction.png").write_bytes(b"an earlier run's picture")
    again = run(out, folder, "--epochs", "1", "--seed", "5", "--overwrite")
    assert not (out / "reconstruction.png").exists()  # (--no-picture: this run writes none)
    assert {p.name for p in out.glob("checkpoint-*.pth")} == {"checkpoint-last.pth", "checkpoint-0.pth"}
    assert ckpt_io.load(again.checkpoint)["args"]["seed"] == 5
    assert len((out / "log.txt").read_text().splitlines()) == 1


def test_a_resumed_runs_errors_name_the_checkpoint_it_resumed(tmp_path, monkeypatch):
    """Stopped on non-finite losses before its own first save, a resumed run names the file it
    resumed as the last good checkpoint; its result names only files it wrote."""
    good = train.pretrain(pretrain_args(tmp_path, "--epochs", "1"), dataset=Poisoned(16, poisoned=())).checkpoint
    _poison_transform(monkeypatch)
    args = pretrain_args(tmp_path, "--epochs", "2", "--max-nonfinite", "2", "--resume", "auto")
    with pytest.raises(train.NonFiniteLossError, match=f"the last good checkpoint is {good}"):
        train.pretrain(args, dataset=Poisoned(16, poisoned=range(16)))
    resumed = train.pretrain(pretrain_args(tmp_path / "none", "--epochs", "1", "--resume", good, "--output_dir", ""),
                             dataset=Poisoned(16, poisoned=()))
    assert resumed.checkpoint is None  # nothing written by this run (no --output_dir)


def test_atomic_save_leaves_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / "c.pth")
    ckpt_io.save_atomic({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ckpt_io.save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pth"]


@pytest.mark.parametrize("link", [True, False], ids=["hard-link", "copy"])
def test_atomic_copy(tmp_path, monkeypatch, link):
    """The epoch archive copy (a hard link, or a copy where links fail): the new file appears
    whole; an interrupted copy leaves the old file and no temporary behind."""
    src, dst = str(tmp_path / "last.pth"), str(tmp_path / "checkpoint-0.pth")
    ckpt_io.save_atomic({"a": torch.arange(3.0)}, src)
    ckpt_io.save_atomic({"a": torch.zeros(1)}, dst)
    if not link:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("links not supported")))
    ckpt_io.copy_atomic(src, dst)
    assert torch.equal(torch.load(dst, weights_only=True)["a"], torch.arange(3.0))
    ckpt_io.save_atomic({"a": torch.ones(2)}, src)
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("links not supported")))
    monkeypatch.setattr(ckpt_io.shutil, "copyfileobj", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt_io.copy_atomic(src, dst)
    assert torch.equal(torch.load(dst, weights_only=True)["a"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0.pth", "last.pth"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, folder, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f".checkpoint-last.pth.tmp{dead}"
    live = tmp_path / f".checkpoint-9.pth.tmp{os.getpid()}"  # a save of a running process (this one)
    other = tmp_path / f".notes.txt.tmp{dead}"  # not a checkpoint's: never touched
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"in progress")
    other.write_bytes(b"someone else's")
    run(tmp_path, folder, "--epochs", "1")
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed {stale}" in capsys.readouterr().out


def test_saved_model_loads_into_the_official_model_strictly(tmp_path, folder):
    res = run(tmp_path, folder, "--max-steps", "2", "--norm_pix_loss")
    ckpt = ckpt_io.load(res.checkpoint)
    official = ckpt_io.build_model(ckpt["model_config"], reference_impl=True)
    official.load_state_dict(ckpt["model"], strict=True)
    fast, _ = pretrained.load_model(res.checkpoint)
    imgs, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    a, b = official(imgs, noise=noise), fast(imgs, noise=noise)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert set(ckpt["model_config"]) == set(ckpt_io.CONFIG_KEYS)


def test_stored_configuration_is_the_official_constructor():
    """A model_config in the golden file's format (official constructor arguments) rebuilds a model
    that takes the official code's weights strictly and computes the official loss."""
    golden = load_golden()
    for name in ("p8_64px_normpix1_mask0.75", "p4_32px_normpix0_mask0.5"):
        case = golden["cases"][name]
        assert set(case["config"]) == set(ckpt_io.CONFIG_KEYS)
        for reference_impl in (True, False):
            model = ckpt_io.build_model(case["config"], reference_impl=reference_impl)
            model.load_state_dict(case["state_dict"], strict=True)
            assert ckpt_io.model_config(model) == dict(case["config"], img_size=[case["config"]["img_size"]] * 2)
            loss, _, _ = model(case["imgs"], mask_ratio=case["mask_ratio"], noise=case["noise"])
            torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- non-finite losses
class Poisoned(torch.utils.data.Dataset):
    """Photographs whose transform is replaced so that marked samples become NaN images."""

    def __init__(self, n, poisoned):
        self.base = data.EmbeddedImages(repeats=1)
        self.n, self.poisoned = n, set(poisoned)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img, _ = self.base[i % len(self.base)]
        return (img, i in self.poisoned)


def _poison_transform(monkeypatch):
    real = data.SeededSamples.__getitem__

    def getitem(self, key):
        img, noise, skipped = real(self, key)
        if self.base[key[0]][1]:
            img = torch.full_like(img, float("nan"))
        return img, noise, skipped

    monkeypatch.setattr(data.SeededSamples, "__getitem__", getitem)
    monkeypatch.setattr(train.Pretraining, "_loader", lambda self: "pil")  # NaN pixels need the float path


def test_nonfinite_loss_skips_the_step(tmp_path, monkeypatch, capsys):
    _poison_transform(monkeypatch)
    args = pretrain_args(tmp_path, "--epochs", "2")
    res = train.pretrain(args, dataset=Poisoned(16, poisoned={5}))
    out = capsys.readouterr().out
    assert out.count("non-finite loss") == 2  # sample 5 spoils one step per epoch
    assert res.steps == 8
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())
    lines = [json.loads(ln) for ln in (tmp_path / "log.txt").read_text().splitlines()]
    assert [ln["skipped_steps"] for ln in lines] == [1, 1] and all(math.isfinite(ln["train_loss"]) for ln in lines)


def test_too_many_nonfinite_losses_stop_the_run(tmp_path, monkeypatch):
    _poison_transform(monkeypatch)
    closed = []

    class Writer:
        def add_scalar(self, *a):
            pass

        def flush(self):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(engine, "_tensorboard", lambda log_dir: Writer())
    args = pretrain_args(tmp_path, "--max-nonfinite", "3")
    with pytest.raises(train.NonFiniteLossError, match="non-finite for 3 consecutive steps"):
        train.pretrain(args, dataset=Poisoned(16, poisoned=range(16)))
    assert closed == [True]  # the logged scalars reach disk although the run stopped on an error


def _nan_gradients_at(monkeypatch, backward_calls):
    """The model's decoder_pred.weight gets a NaN gradient in the given backward calls (1-based)."""
    real, seen = train.make_model, [0]

    def create(*a, **k):
        model = real(*a, **k)

        def hook(grad):
            seen[0] += 1
            return grad * float("nan") if seen[0] in backward_calls else grad

        model.decoder_pred.weight.register_hook(hook)
        return model

    monkeypatch.setattr(train, "make_model", create)


def test_nonfinite_gradients_skip_the_step(tmp_path, monkeypatch, capsys):
    """fp32 has no gradient scaler: a finite loss with NaN gradients must skip its step, not turn
    every weight into NaN (AdamW spreads one NaN gradient into its whole tensor)."""
    _nan_gradients_at(monkeypatch, {2, 7})
    res = train.pretrain(pretrain_args(tmp_path, "--epochs", "2"), dataset=Poisoned(16, poisoned=()))
    assert capsys.readouterr().out.count("non-finite gradients, step skipped") == 2
    assert res.steps == 8
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())
    lines = [json.loads(ln) for ln in (tmp_path / "log.txt").read_text().splitlines()]
    assert [ln["skipped_steps"] for ln in lines] == [1, 1]


def test_nonfinite_weights_never_replace_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """Weights that went non-finite (here set so after step 2) are never saved: the run stops on
    the non-finite losses, and checkpoint-last.pth still holds step 2's finite weights."""
    def poison(step):
        if step == 2:
            with torch.no_grad():
                model.decoder_pred.weight.fill_(float("nan"))

    real = train.make_model

    def create(*a, **k):
        nonlocal model
        model = real(*a, **k)
        return model

    model = None
    monkeypatch.setattr(train, "make_model", create)
    args = pretrain_args(tmp_path, "--save-every", "1", "--max-nonfinite", "3")
    with pytest.raises(train.NonFiniteLossError, match=r"last good checkpoint is .*checkpoint-last\.pth"):
        train.pretrain(args, dataset=Poisoned(16, poisoned=()), on_step=poison)
    assert "not saving" in capsys.readouterr().out
    ckpt = ckpt_io.load(str(tmp_path / ckpt_io.LAST))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ---------------------------------------------------------------------------- torch.compile
def test_compile_flag_compiles_the_training_model(tmp_path, folder, monkeypatch):
    """--compile runs the model through torch.compile (forward and backward graphs captured by
    AOTAutograd; the aot_eager backend keeps the test fast on CPU) and trains like eager."""
    calls = []
    real = torch.compile
    counter = CompileCounterWithBackend("aot_eager")

    def compile_spy(model, **kw):
        calls.append(type(model).__name__)
        return real(model, backend=counter, fullgraph=True)

    eager = run(tmp_path / "eager", folder, "--max-steps", "2")
    monkeypatch.setattr(torch, "compile", compile_spy)
    torch._dynamo.reset()
    compiled = run(tmp_path / "compiled", folder, "--max-steps", "2", "--compile")
    assert calls == ["MaskedAutoencoderViT"]
    assert counter.frame_count == 1  # the compiled module is the one that trained: one graph, reused
    lr = ckpt_io.load(eager.checkpoint)["args"]["lr"]
    assert_trained_close(compiled.model.state_dict(), eager.model.state_dict(), lr, 2)
    assert not any(k.startswith("_orig_mod") for k in ckpt_io.load(compiled.checkpoint)["model"])


@pytest.mark.parametrize("argv, mode", [(["--compile"], None), (["--compile", "default"], None),
                                        (["--compile", "reduce-overhead"], "reduce-overhead")])
def test_compile_mode_reaches_torch_compile(tmp_path, folder, monkeypatch, argv, mode):
    """``--compile [MODE]``: the mode is torch.compile's (the model itself trains uncompiled here,
    the spy returns it as it is)."""
    calls = []

    def compile_spy(model, **kw):
        calls.append(kw)
        return model

    monkeypatch.setattr(torch, "compile", compile_spy)
    run(tmp_path, folder, "--max-steps", "1", *argv)
    assert calls == [dict(mode=mode)]


def test_unknown_compile_mode_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pretrain_args(tmp_path, "--compile", "fastest")
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
    args = pretrain_args(tmp_path)
    args.compile = "fastest"  # a Python caller bypassing the parser
    with pytest.raises(ValueError, match="unknown --compile mode 'fastest'"):
        train.pretrain(args)


# ---------------------------------------------------------------------------- DDP
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, folder):
    proc, (r0, r1) = run_two_processes(tmp_path, "train", "pretrain", [
        "pretrain", *TINY, "--data_path", folder, "--output_dir", tmp_path / "ddp", "--log_dir", tmp_path / "ddp",
        "--batch_size", "2", "--epochs", "2"])
    assert "x 2 process(es)" in proc.stdout and "= 4;" in proc.stdout  # global batch 2 x 2
    assert_states_equal(r0, r1, "rank0 vs rank1")
    lines = (tmp_path / "ddp" / "log.txt").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone logs
    single = run(tmp_path / "single", folder, "--batch_size", "4", "--epochs", "2")
    assert single.steps == 8
    saved = ckpt_io.load(str(tmp_path / "ddp" / "checkpoint-last.pth"))
    assert saved["step"] == 8
    for k in r0:
        assert torch.equal(saved["model"][k], r0[k])  # rank 0 saved what it trained
    assert_trained_close(r0, single.model.state_dict(), saved["args"]["lr"], single.steps)
    ddp_loss = [json.loads(x)["train_loss"] for x in lines]
    one_loss = [json.loads(x)["train_loss"] for x in (tmp_path / "single" / "log.txt").read_text().splitlines()]
    assert ddp_loss == pytest.approx(one_loss, rel=1e-4)  # loss averaged across ranks
