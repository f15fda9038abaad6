"""fastmae finetune / linprobe / knn / downstream: recipes, data, checkpoints, resume and bad input."""
import json
import os

import pytest
import torch

from fastmae import cli, data, downstream, engine, optim, train
from fastmae import checkpoint as ckpt_io
from trainkit import TINY, assert_states_equal, make_image_folder, run_two_processes

# A tiny downstream run: the micro encoder at 32 px on the digits, CPU, fp32, no workers.
SMALL = ["--input_size", "32", "--batch_size", "16", "--epochs", "1", "--warmup_epochs", "1",
         "--num_workers", "0", "--device", "cpu", "--precision", "fp32"]


def parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def digits():
    """A 96-image training split and a 40-image validation split of the digits (fast runs)."""
    train_set, val_set = data.EmbeddedDigits("train"), data.EmbeddedDigits("val")
    sub = lambda ds, n: _Subset(ds, n)  # noqa: E731
    return sub(train_set, 96), sub(val_set, 40)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, n):
        self.ds, self.n, self.classes = ds, n, ds.classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i]


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """A fastmae pre-training checkpoint of mae_vit_micro_patch8 at 32 px (two steps)."""
    out = tmp_path_factory.mktemp("pre")
    args = parse("pretrain", *TINY, "--output_dir", out, "--log_dir", "", "--max-steps", 2)
    train.pretrain(args, dataset=data.EmbeddedDigits("train"))
    return str(out / "checkpoint-last.pth")


# ---------------------------------------------------------------------------- data
def test_embedded_digits_split_and_images():
    tr, va = data.EmbeddedDigits("train"), data.EmbeddedDigits("val")
    assert (len(tr), len(va)) == (1437, 360)
    img, label = va[0]
    assert img.size == (32, 32) and img.mode == "RGB" and label == 0  # digit 0 is the first image
    assert sorted(set(tr.targets)) == list(range(10)) and tr.classes == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="split"):
        data.EmbeddedDigits("test")


def test_labelled_folders_refuse_other_classes_and_a_missing_split(tmp_path):
    make_image_folder(tmp_path / "d" / "train", n=4, classes=2)
    with pytest.raises(ValueError, match="no val/ folder"):
        data.labelled_folders(str(tmp_path / "d"))
    make_image_folder(tmp_path / "d" / "val", n=6, classes=3)
    with pytest.raises(ValueError, match="classes of .*val differ.*only in val: \\['class2'\\]"):
        data.labelled_folders(str(tmp_path / "d"))


def test_the_finetuning_transform_pickles_for_spawned_workers():
    """DataLoader workers started by spawn (macOS, Windows) receive the transform pickled, with the
    posterize ops it holds."""
    import pickle

    tf = pickle.loads(pickle.dumps(data.classify_train_transform(32)))
    img = data.EmbeddedDigits("val")[0][0]
    assert tf(img).shape == (3, 32, 32)


def test_labelled_samples_are_seeded_per_sample_and_leave_global_rngs_alone(digits):
    tf = data.classify_train_transform(32)
    ds = data.LabelledSamples(digits[0], tf, seed=1)
    before = torch.get_rng_state()
    a, b = ds[(3, 0)], ds[(3, 0)]
    assert torch.equal(a[0], b[0]) and int(a[1]) == digits[0][3][1]
    assert not torch.equal(ds[(3, 1)][0], a[0])  # another epoch, another augmentation
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------- optimiser pieces
def test_set_lr_applies_each_groups_lr_scale():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr_scale": 0.25}, {"params": [q]}], lr=1.0)
    engine.set_lr(opt, 0.4)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.4]


def test_lars_matches_the_official_update():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = optim.LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    u = gw + 0.1 * w0  # matrices: decayed, then scaled by the trust ratio |w| / |u|
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (0.001 * w0.norm() / u.norm()) * u)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # vectors: plain momentum step, no decay
    w.grad, b.grad = gw.clone(), gb.clone()
    w1 = w.detach().clone()
    opt.step()  # the momentum buffer carries the first update
    u1 = gw + 0.1 * w1
    mu = 0.9 * (0.001 * w0.norm() / u.norm()) * u + (0.001 * w1.norm() / u1.norm()) * u1
    torch.testing.assert_close(w.detach(), w1 - 0.5 * mu)


def test_knn_classify_votes_by_weighted_cosine_similarity():
    train_f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    train_y = torch.tensor([0, 0, 1, 2])
    test_f = torch.tensor([[2.0, 0.1], [0.1, 3.0]])
    scores = downstream.knn_classify(train_f, train_y, test_f, num_classes=3, k=2, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1]
    sim = torch.nn.functional.normalize(test_f[1:], dim=1) @ torch.nn.functional.normalize(train_f, dim=1).T
    top, idx = sim.topk(2)
    expect = torch.zeros(3).index_add_(0, train_y[idx[0]], (top[0] / 0.1).exp())
    torch.testing.assert_close(scores[1], expect)
    with pytest.raises(ValueError, match="k must be"):
        downstream.knn_classify(train_f, train_y, test_f, 3, k=0)


# ---------------------------------------------------------------------------- commands
def test_finetune_trains_evaluates_logs_and_keeps_the_best(tmp_path, digits, mae_ckpt):
    out = tmp_path / "ft"
    args = parse("finetune", "--finetune", mae_ckpt, *SMALL, "--epochs", 2, "--output_dir", out, "--log_dir", "")
    result = downstream.finetune(args, datasets=digits)
    lines = [json.loads(line) for line in open(out / "log.txt")]
    assert [r["epoch"] for r in lines] == [0, 1]
    for key in ("train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5", "max_acc1"):
        assert all(key in r for r in lines), key
    assert lines[1]["max_acc1"] == max(r["test_acc1"] for r in lines)
    assert result.test["test_acc1"] == lines[-1]["test_acc1"]
    best = ckpt_io.load(str(out / "checkpoint-best.pth"))
    assert best["model_config"]["kind"] == "vit" and best["best"] == lines[1]["max_acc1"]
    assert best["model_config"]["global_pool"] is True  # the official default
    # --eval reports the same accuracy for the last checkpoint
    ev = downstream.finetune(parse("finetune", *SMALL, "--eval", "--resume", out / "checkpoint-last.pth",
                                   "--output_dir", ""), datasets=digits)
    assert ev.test["test_acc1"] == pytest.approx(lines[-1]["test_acc1"])
    with pytest.raises(ckpt_io.CheckpointError, match="not a classifier"):  # a pre-training checkpoint
        downstream.finetune(parse("finetune", *SMALL, "--eval", "--resume", mae_ckpt, "--output_dir", ""),
                            datasets=digits)


def test_finetune_uses_layer_decay_and_the_pretrained_encoder(tmp_path, digits, mae_ckpt):
    args = parse("finetune", "--finetune", mae_ckpt, *SMALL, "--output_dir", "", "--max-steps", 1)
    recipe = downstream.Classification(args, datasets=digits)
    model = recipe.build_model()
    mae = ckpt_io.load(mae_ckpt)["model"]
    assert torch.equal(model.blocks[1].mlp.fc2.weight, mae["blocks.1.mlp.fc2.weight"])
    assert model.head.weight.std() < 1e-4  # trunc_normal(std=2e-5), as the official fine-tuning
    args.lr = 1.0
    opt = recipe.optimizer(model)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales == pytest.approx([0.75 ** 3, 0.75 ** 2, 0.75, 1.0])  # 2 blocks: layers 0..3
    engine.set_lr(opt, 1.0)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(scales)


def test_partial_finetuning_trains_only_the_last_blocks(tmp_path, digits, mae_ckpt):
    out = tmp_path / "pft"
    args = parse("finetune", "--finetune", mae_ckpt, *SMALL, "--trainable-blocks", 1, "--output_dir", out,
                 "--log_dir", "", "--max-steps", 2)
    result = downstream.finetune(args, datasets=digits)
    mae = ckpt_io.load(mae_ckpt)["model"]
    sd = result.model.state_dict()
    for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight"):
        assert torch.equal(sd[k], mae[k]), f"{k} should be frozen"
    assert not torch.equal(sd["blocks.1.attn.qkv.weight"], mae["blocks.1.attn.qkv.weight"])
    assert not result.model.blocks[0].training and result.model.blocks[1].training


def test_linear_probe_leaves_the_encoder_untouched(tmp_path, digits, mae_ckpt):
    out = tmp_path / "lp"
    args = parse("linprobe", "--finetune", mae_ckpt, *SMALL, "--output_dir", out, "--log_dir", "", "--max-steps", 3)
    model = downstream.linprobe(args, datasets=digits).model
    mae = ckpt_io.load(mae_ckpt)["model"]
    sd = model.state_dict()
    for k, v in mae.items():
        if k in sd and not k.startswith("head"):
            assert torch.equal(sd[k], v), f"{k} changed in a linear probe"
    bn = model.head[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert bn.num_batches_tracked == 3 and "head.1.weight" in sd
    assert model.global_pool is False  # main_linprobe.py's default: the cls token
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"head.1.weight", "head.1.bias"}
    assert all(not m.training for m in model.blocks) and not model.norm.training


def test_finetune_resume_is_exact(tmp_path, digits):
    """An interrupted fine-tuning run (mixup, RandAugment, drop path, random erasing, an EMA of the
    weights) resumed mid-epoch ends with the same weights and EMA as an uninterrupted one."""
    common = ["--model", "vit_micro_patch8", *SMALL, "--epochs", 2, "--log_dir", "", "--model_ema",
              "--model_ema_decay", 0.9]
    full = downstream.finetune(parse("finetune", *common, "--output_dir", tmp_path / "a"), datasets=digits)

    class Stop(Exception):
        pass

    def stop(step):
        if step == 7:
            raise Stop

    b = tmp_path / "b"
    with pytest.raises(Stop):
        downstream.finetune(parse("finetune", *common, "--output_dir", b, "--save-every", 1), datasets=digits,
                            on_step=stop)
    resumed = downstream.finetune(parse("finetune", *common, "--output_dir", b, "--resume", "auto"), datasets=digits)
    assert_states_equal(full.model.state_dict(), resumed.model.state_dict(), "model")
    ema_a, ema_b = (ckpt_io.load(str(d / "checkpoint-last.pth"))["recipe"]["ema"] for d in (tmp_path / "a", b))
    assert_states_equal(ema_a, ema_b, "ema")
    assert not all(torch.equal(ema_a[k], v) for k, v in full.model.state_dict().items())  # it averages
    line = json.loads(open(b / "log.txt").read().splitlines()[-1])
    assert {"test_acc1_ema", "test_acc5_ema", "test_loss_ema"} <= set(line)


def test_an_ema_added_on_resume_starts_from_the_resumed_weights(tmp_path, digits):
    common = ["--model", "vit_micro_patch8", *SMALL, "--epochs", 2, "--log_dir", "", "--output_dir", tmp_path]
    downstream.finetune(parse("finetune", *common, "--max-steps", 3), datasets=digits)
    res = downstream.finetune(parse("finetune", *common, "--resume", "auto", "--model_ema", "--max-steps", 4),
                              datasets=digits)
    ema = ckpt_io.load(str(tmp_path / "checkpoint-last.pth"))["recipe"]["ema"]
    # one step of decay 0.9999 from the resumed weights: still within a step of the model
    for k, v in res.model.state_dict().items():
        if v.is_floating_point():
            assert (ema[k] - v).abs().max() < 1e-2, k


def test_knn_writes_its_accuracy(tmp_path, digits, mae_ckpt):
    out = tmp_path / "knn"
    stats = downstream.knn(parse("knn", "--finetune", mae_ckpt, "--num_workers", 0, "--device", "cpu",
                                 "--output_dir", out), datasets=digits)
    line = json.loads(open(out / "log.txt").read())
    assert line["test_acc1"] == stats["test_acc1"] and 0 <= line["test_acc5"] <= 100
    assert line["test_acc5"] >= line["test_acc1"] and line["k"] == 20


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["finetune", "--model", "vit_micro_patch8", "--trainable-blocks", "3"], "--trainable-blocks.*\\[0, 2\\]"),
    (["finetune", "--model", "vit_micro_patch8", "--nb_classes", "7"], "--nb_classes 7 disagrees.*10 classes"),
    (["finetune", "--model", "vit_nope"], "unknown --model 'vit_nope'"),
    (["finetune", "--model", "vit_micro_patch8", "--input_size", "36"], "--input_size 36.*not divisible"),
    (["finetune", "--model", "vit_micro_patch8", "--batch_size", "5"], "--batch_size 5 must be even"),
    (["linprobe", "--model", "vit_micro_patch8", "--eval"], "--eval needs a model"),
    (["finetune", "--model", "vit_micro_patch8", "--mixup_mode", "elem", "--batch_size", "5"], "must be even"),
    (["finetune", "--model", "vit_micro_patch8", "--aa", "bogus"], "--aa 'bogus' is not a RandAugment policy"),
    (["finetune", "--model", "vit_micro_patch8", "--cutmix_minmax", "0.3"], "--cutmix_minmax takes two ratios"),
    (["finetune", "--model", "vit_micro_patch8", "--smoothing", "2", "--mixup", "0", "--cutmix", "0"],
     "--smoothing must be in"),
    (["finetune", "--model", "vit_micro_patch8", "--crop-scale", "0", "1"], "--crop-scale needs"),
    (["downstream", "--epochs", "0"], "--epochs and --pretrain-epochs must be at least 1"),
])
def test_bad_flags_are_clear_errors(tmp_path, capsys, argv, message):
    extra = [] if argv[0] == "downstream" else ["--epochs", "1", "--log_dir", ""]
    code = cli.main([*argv, *extra, "--num_workers", "0", "--device", "cpu", "--output_dir", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys, mae_ckpt):
    code = cli.main(["finetune", "--finetune", mae_ckpt, "--model", "vit_tiny_patch8", "--output_dir",
                     str(tmp_path / "o"), "--num_workers", "0", "--device", "cpu"])
    assert code == 1
    assert "another architecture" in capsys.readouterr().err


def test_downstream_command_writes_the_table(tmp_path, monkeypatch, mae_ckpt):
    """`fastmae downstream` end to end on a tiny budget: every row for both initialisations."""
    from fastmae import downstream_demo

    monkeypatch.setattr(downstream_demo, "ENCODER", "vit_micro_patch8")
    monkeypatch.setattr(downstream_demo, "FINETUNE", ["--batch_size", "32"])
    full = data.EmbeddedDigits
    monkeypatch.setattr(data, "EmbeddedDigits", lambda split: _Subset(full(split), 160 if split == "train" else 20))
    out = tmp_path / "ds"
    assert cli.main(["downstream", "--finetune", mae_ckpt, "--epochs", "1", "--num_workers", "0",
                     "--device", "cpu", "--output_dir", str(out)]) == 0
    md = (out / "accuracy.md").read_text()
    for row, _, _ in downstream_demo.RUNS:
        assert f"| {row} |" in md
    assert os.path.getsize(out / "accuracy.png") > 1000


def test_downstream_command_with_a_maskalign_student(tmp_path, monkeypatch, mae_ckpt):
    """`fastmae downstream --maskalign`: a MaskAlign student taught by the MAE, a third column."""
    from fastmae import downstream_demo

    monkeypatch.setattr(downstream_demo, "ENCODER", "vit_micro_patch8")
    monkeypatch.setattr(downstream_demo, "MODEL", "mae_vit_micro_patch8")
    monkeypatch.setattr(downstream_demo, "RUNS", downstream_demo.RUNS[:1])  # k-NN
    monkeypatch.setattr(downstream_demo, "MASKALIGN", [*downstream_demo.MASKALIGN, "--loss_weights", "top2",
                                                        "--max-steps", "2"])
    full = data.EmbeddedDigits
    monkeypatch.setattr(data, "EmbeddedDigits", lambda split: _Subset(full(split), 160 if split == "train" else 20))
    out = tmp_path / "ds"
    assert cli.main(["downstream", "--finetune", mae_ckpt, "--maskalign", "--pretrain-epochs", "1", "--num_workers",
                     "0", "--device", "cpu", "--output_dir", str(out)]) == 0
    md = (out / "accuracy.md").read_text()
    assert "| evaluation | pre-trained | MaskAlign student | random init |" in md
    assert (out / "maskalign" / "checkpoint-last.pth").exists()


# ---------------------------------------------------------------------------- DDP
def test_two_process_finetuning_trains_alike_and_evaluates_every_image_once(tmp_path):
    """Under torchrun each process evaluates every second validation image; the reduced accuracy
    is that of one process evaluating all of them (7 images: the shards are uneven)."""
    root = tmp_path / "data"
    make_image_folder(root / "train", n=16, classes=2)
    make_image_folder(root / "val", n=7, classes=2, seed=1)
    out = tmp_path / "ddp"
    flags = ["--model", "vit_micro_patch8", "--input_size", "32", "--data_path", str(root), "--num_workers", "0",
             "--device", "cpu", "--precision", "fp32"]
    proc, (r0, r1) = run_two_processes(tmp_path, "downstream", "finetune", [
        "finetune", *flags, "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0", "--output_dir", out,
        "--log_dir", ""])
    assert "x 2 process(es)" in proc.stdout
    assert_states_equal(r0, r1, "rank0 vs rank1")
    logged = json.loads((out / "log.txt").read_text())
    single = downstream.finetune(parse("finetune", *flags, "--batch_size", 4, "--eval", "--resume",
                                       out / "checkpoint-last.pth", "--output_dir", ""))
    assert logged["test_acc1"] == pytest.approx(single.test["test_acc1"])
    assert logged["test_loss"] == pytest.approx(single.test["test_loss"], rel=1e-5)


def test_two_process_resume_is_exact_with_drop_path(tmp_path):
    """Drop path draws from every process's generator: a torchrun run resumed after its first
    step ends where the uninterrupted one does."""
    root = tmp_path / "data"
    make_image_folder(root / "train", n=16, classes=2)
    make_image_folder(root / "val", n=4, classes=2, seed=1)
    flags = ["finetune", "--model", "vit_micro_patch8", "--input_size", "32", "--data_path", str(root),
             "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--batch_size", "4", "--epochs", "2",
             "--warmup_epochs", "0", "--drop_path", "0.3", "--log_dir", ""]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, (full, _) = run_two_processes(tmp_path / "a", "downstream", "finetune", [*flags, "--output_dir", tmp_path / "a"])
    run_two_processes(tmp_path / "b", "downstream", "finetune", [*flags, "--output_dir", tmp_path / "b",
                                                                  "--max-steps", "1"])
    _, (resumed, _) = run_two_processes(tmp_path / "b", "downstream", "finetune",
                                        [*flags, "--output_dir", tmp_path / "b", "--resume", "auto"])
    assert_states_equal(full, resumed, "uninterrupted vs resumed")
