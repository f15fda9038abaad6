"""fastmae pretrain --objective maskalign: a student trained from a frozen fastmae MAE teacher on the
shared engine (README recipe defaults, log.txt, checkpoints of kind maskalign), its encoder through the
downstream commands unchanged, and the bad-input errors."""
import json

import pytest
import torch
from trainkit import TINY

from fastmae import checkpoint as ckpt_io
from fastmae import cli, data, downstream, maskalign_train, train


def parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A fastmae MAE pre-training checkpoint (mae_vit_micro_patch8 at 32 px, two steps): the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    train.pretrain(parse("pretrain", *TINY, "--output_dir", out, "--log_dir", "", "--max-steps", 2),
                   dataset=data.EmbeddedDigits("train"))
    return str(out / "checkpoint-last.pth")


@pytest.mark.parametrize("mask_type", ["attention", "random", "uniform"])
def test_maskalign_pretrains_from_a_fastmae_teacher(tmp_path, teacher_ckpt, mask_type):
    out = tmp_path / "ma"
    args = parse("pretrain", *TINY, "--objective", "maskalign", "--teacher", teacher_ckpt, "--mask_type", mask_type,
                 "--loss_weights", "top2", "--output_dir", out, "--log_dir", out)
    # the README recipe's ratio, not MAE's 0.75; uniform masking keeps a quarter
    assert args.mask_ratio == (0.75 if mask_type == "uniform" else 0.7)
    result = maskalign_train.pretrain(args, dataset=data.EmbeddedDigits("train"))
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert [x["epoch"] for x in lines] == [0, 1] and all(torch.isfinite(torch.tensor(x["train_loss"])) for x in lines)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    cfg = ckpt["model_config"]
    assert cfg["kind"] == "maskalign" and cfg["target_norm"] == "whiten" and ckpt["args"]["mask_type"] == mask_type
    assert cfg["mask_type"] == ("attention" if mask_type == "attention" else "random")  # uniform comes as noise
    assert cfg["fusion_type"] == "linear" and cfg["loss_type"] == "smoothl1"
    model = ckpt_io.build_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True)  # the official student keys, no teacher
    assert any(k.startswith("distill_heads.") for k in ckpt["model"]) and "distill_weights" in ckpt["model"]
    assert result.steps > 0


def test_maskalign_encoder_goes_downstream(tmp_path, teacher_ckpt):
    """The student's encoder fine-tunes and runs k-NN through the downstream commands unchanged (its
    adapters and level mixture are dropped like an MAE's decoder)."""
    out = tmp_path / "ma"
    maskalign_train.pretrain(parse("pretrain", *TINY, "--objective", "maskalign", "--teacher", teacher_ckpt,
                                   "--loss_weights", "top2", "--max-steps", 2, "--output_dir", out, "--log_dir", ""),
                             dataset=data.EmbeddedDigits("train"))
    student = str(out / "checkpoint-last.pth")
    small = ["--input_size", 32, "--batch_size", 16, "--num_workers", 0, "--device", "cpu"]
    digits = data.EmbeddedDigits("train"), data.EmbeddedDigits("val")
    stats = downstream.knn(parse("knn", "--finetune", student, *small, "--output_dir", tmp_path / "knn"),
                           datasets=digits)
    assert 0 <= stats["test_acc1"] <= 100
    args = parse("finetune", "--finetune", student, *small, "--epochs", 1, "--warmup_epochs", 1, "--precision", "fp32",
                 "--max-steps", 2, "--output_dir", tmp_path / "ft", "--log_dir", "")
    downstream.finetune(args, datasets=digits)
    assert (tmp_path / "ft" / "checkpoint-last.pth").exists()


@pytest.mark.parametrize("extra, message", [
    ([], "--objective maskalign needs --teacher PATH"),
    (["--teacher", "{missing}"], "teacher path .* does not exist"),
    (["--teacher", "{not_a_model}"], "is not a teacher model"),
    (["--teacher", "{teacher}", "--loss_weights", "top9"], "top9"),
    (["--teacher", "{teacher}"], "loss_weights='top5' weighs the last 5 levels but the teacher has 2 layers"),
    (["--teacher", "{teacher}", "--loss_weights", "top2", "--input_size", "64"], 
     "the teacher was built for 32x32 images but the student sees 64x64"),
    (["--teacher", "{teacher}", "--loss_weights", "top2", "--mask_ratio", "1.0"], "mask_ratio"),
    (["--teacher", "{teacher}", "--loss_weights", "top2", "--norm_pix_loss"], "--norm_pix_loss is MAE's pixel target"),
])
def test_maskalign_bad_input(tmp_path, teacher_ckpt, extra, message):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model")
    paths = dict(missing=tmp_path / "nope.pth", not_a_model=bad, teacher=teacher_ckpt)
    extra = [e.format(**paths) for e in extra]
    with pytest.raises(ValueError, match=message):
        maskalign_train.pretrain(parse("pretrain", *TINY, "--objective", "maskalign", *extra, "--output_dir",
                                       tmp_path / "out", "--log_dir", ""), dataset=data.EmbeddedDigits("train"))
