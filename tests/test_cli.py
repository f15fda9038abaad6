"""The ``fastmae`` command line: help, defaults, errors, the no-argument demo, and pictures."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastmae import checkpoint as ckpt_io
from fastmae import cli, data, train, visualize
from trainkit import TINY, make_image_folder

OFFICIAL_FLAGS = ("--model", "--input_size", "--mask_ratio", "--norm_pix_loss", "--batch_size", "--epochs",
                  "--accum_iter", "--lr", "--blr", "--min_lr", "--warmup_epochs", "--weight_decay",
                  "--data_path", "--output_dir", "--log_dir", "--resume", "--start_epoch", "--seed",
                  "--num_workers", "--device", "--pin_mem", "--no_pin_mem", "--world_size", "--dist_url",
                  "--dist_on_itp")
FASTMAE_FLAGS = ("--precision", "--compile", "--attn-backend", "--max-steps", "--clip-grad", "--save-every",
                 "--max-nonfinite", "--no-picture", "--overwrite")
ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), n=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
    """A checkpoint of a tiny norm_pix_loss model, written through the command line."""
    out = tmp_path_factory.mktemp("run")
    rc = cli.main(["pretrain", *TINY, "--data_path", folder, "--output_dir", str(out), "--log_dir", str(out),
                   "--epochs", "1", "--norm_pix_loss"])
    assert rc == 0
    return str(out / "checkpoint-last.pth")


# ---------------------------------------------------------------------------- entry points and help
def test_python_dash_m_and_console_script_print_complete_help(capsys):
    script = shutil.which("fastmae")
    assert script is not None, "the fastmae console script is not installed"
    top = subprocess.run([sys.executable, "-m", "fastmae", "--help"], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert top.returncode == 0, top.stderr
    for word in ("pretrain", "visualize", "demo", "torchrun"):
        assert word in top.stdout
    pre = subprocess.run([script, "pretrain", "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert pre.returncode == 0, pre.stderr
    for flag in OFFICIAL_FLAGS + FASTMAE_FLAGS:
        assert flag in pre.stdout, flag
    assert "(default: 0.75)" in pre.stdout and "mae_vit_tiny_patch8" in pre.stdout
    # one default per option, none that says nothing
    assert "(default: None)" not in pre.stdout and "(default: )" not in pre.stdout
    assert "default: cuda when available, else cpu) (default" not in " ".join(pre.stdout.split())
    for command, flags in [("visualize", ("--checkpoint", "--image", "--out", "--mask_ratio", "--seed")),
                           ("demo", ("--model", "--max-steps", "mae_vit_tiny_patch8"))]:
        with pytest.raises(SystemExit) as code:
            cli.main([command, "--help"])
        assert code.value.code == 0
        text = capsys.readouterr().out
        for flag in flags:
            assert flag in text, (command, flag)


def test_pretrain_defaults_are_the_official_ones():
    args = cli.build_parser().parse_args(["pretrain"])
    official = dict(model="mae_vit_large_patch16", input_size=224, mask_ratio=0.75, norm_pix_loss=False,
                    batch_size=64, epochs=400, accum_iter=1, lr=None, blr=1e-3, min_lr=0.0, warmup_epochs=40,
                    weight_decay=0.05, output_dir="./output_dir", log_dir="./output_dir", resume="",
                    start_epoch=0, seed=0, num_workers=10, pin_mem=True, world_size=1, dist_url="env://",
                    dist_on_itp=False)
    assert {k: getattr(args, k) for k in official} == official
    assert cli.build_parser().parse_args(["pretrain", "--no_pin_mem"]).pin_mem is False
    assert args.data_path is None and args.device is None and args.clip_grad is None and args.save_every == 0


def test_no_arguments_runs_the_embedded_demo(monkeypatch):
    seen = []
    monkeypatch.setattr(train, "pretrain", lambda args, **kw: seen.append(args))
    assert cli.main([]) == 0
    (args,) = seen
    assert args.command == "demo" and args.data_path is None and args.picture
    for k, v in cli.DEMO_DEFAULTS.items():
        assert getattr(args, k) == v
    assert cli.main(["demo", "--epochs", "3"]) == 0 and seen[-1].epochs == 3  # flags override


def test_demo_settings_train_on_the_embedded_photographs(tmp_path, capsys):
    """The no-argument run's real settings, cut to 3 steps: embedded data, tiny model, picture."""
    rc = cli.main(["demo", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), "--max-steps", "3",
                   "--num_workers", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "embedded scikit-image photographs" in out and "mae_vit_tiny_patch8 at 64px" in out
    assert f"reconstructions: {tmp_path / 'reconstruction.png'}" in out
    with Image.open(tmp_path / "reconstruction.png") as im:
        assert im.width > 4 * 64 and im.height > len(data.EMBEDDED_PREVIEW) * 64
    # again in the same folder: a demo replaces the previous demo's files
    assert cli.main(["demo", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), "--max-steps", "2",
                     "--num_workers", "0", "--no-picture"]) == 0
    assert ckpt_io.load(str(tmp_path / "checkpoint-last.pth"))["step"] == 2
    assert cli.DEMO_DEFAULTS["output_dir"] != cli.build_parser().parse_args(["pretrain"]).output_dir


def test_options_before_a_command_say_where_they_go(capsys):
    with pytest.raises(SystemExit) as code:
        cli.main(["--epochs", "5"])
    assert code.value.code == 2
    assert "options come after a command: `fastmae demo --epochs 5`" in capsys.readouterr().err


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("flags,message", [
    (["--data_path", "/no/such/folder"], "--data_path '/no/such/folder' does not exist"),
    (["--model", "mae_vit_gigantic"], "unknown --model 'mae_vit_gigantic'"),
    (["--input_size", "36"], "--input_size 36 is not a multiple of the patch size 8"),
    (["--input_size", "8"], "--input_size 8 is not a multiple of the patch size 8 of mae_vit_micro_patch8 larger "
                            "than it (an MAE needs at least 2 patches)"),
    (["--resume", "/no/such/checkpoint.pth"], "checkpoint '/no/such/checkpoint.pth' does not exist"),
    (["--batch_size", "64"], "fewer than one optimizer step"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--mask_ratio", "1.0"], "mask_ratio must lie in [0, 1)"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--save-every", "-1"], "--save-every must be at least 0"),
    (["--clip-grad", "-1"], "--clip-grad must be > 0"),
    (["--min_lr", "-5"], "--min_lr must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--start_epoch", "-2"], "--start_epoch must be at least 0"),
    (["--dist_on_itp"], "--dist_on_itp (the official code's launch on Microsoft ITP clusters) is not supported"),
])
def test_bad_input_gives_a_clear_error(tmp_path, folder, capsys, flags, message):
    argv = ["pretrain", *TINY, "--output_dir", str(tmp_path), "--data_path", folder, *flags]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastmae pretrain: error: ") and message in err, err
    assert "Traceback" not in err


def test_file_system_errors_are_reported_without_a_traceback(tmp_path, folder, trained, capsys):
    (tmp_path / "a_file").write_text("x")
    blocked = str(tmp_path / "a_file" / "out")
    assert cli.main(["pretrain", *TINY, "--output_dir", blocked, "--data_path", folder]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastmae pretrain: error: ") and "a_file" in err and "Traceback" not in err
    assert cli.main(["visualize", "--checkpoint", trained, "--out", blocked + "/x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastmae visualize: error: ") and "a_file" in err and "Traceback" not in err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert cli.main(["pretrain", *TINY, "--output_dir", str(tmp_path), "--data_path", str(tmp_path / "data")]) == 1
    assert "no training images found" in capsys.readouterr().err


def test_visualize_errors(tmp_path, trained, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert cli.main(["visualize", "--checkpoint", str(junk)]) == 1
    assert "corrupt or truncated" in capsys.readouterr().err
    assert cli.main(["visualize", "--checkpoint", trained, "--image", str(tmp_path / "missing.jpg")]) == 1
    err = capsys.readouterr().err
    assert "--image" in err and "does not exist" in err
    (tmp_path / "text.png").write_text("hello")
    assert cli.main(["visualize", "--checkpoint", trained, "--image", str(tmp_path / "text.png")]) == 1
    assert "not a readable image" in capsys.readouterr().err
    assert cli.main(["visualize", "--checkpoint", trained, "--device", "gpu"]) == 1
    err = capsys.readouterr().err
    assert "--device must be cpu or cuda" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- pictures
def test_visualize_command_writes_the_picture(tmp_path, trained, folder):
    images = sorted(os.path.join(folder, "class0", f) for f in os.listdir(os.path.join(folder, "class0")))[:3]
    out = tmp_path / "grid.png"
    proc = subprocess.run([shutil.which("fastmae"), "visualize", "--checkpoint", trained, "--image", *images,
                           "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    with Image.open(out) as a:
        assert a.mode == "RGB"
        three = a.size
    # no --image: the embedded photographs; default --out: beside the checkpoint
    assert cli.main(["visualize", "--checkpoint", trained]) == 0
    with Image.open(os.path.join(os.path.dirname(trained), "reconstruction.png")) as b:
        four = b.size
    assert three[0] == four[0] and four[1] > three[1]  # one more row for four images than for three


def _perfect(model):
    """Make ``model`` predict exactly the loss target of every patch (what a perfect MAE would)."""
    real = model.forward

    def forward(imgs, mask_ratio=0.75, noise=None):
        loss, pred, mask = real(imgs, mask_ratio=mask_ratio, noise=noise)
        target = model.patchify(imgs)
        if model.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return loss, target, mask

    model.forward = forward
    return model


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruction_of_a_perfect_prediction_is_the_image(norm_pix_loss):
    """Un-normalising with each patch's own statistics (norm_pix_loss) and unpatchifying must give the
    image back; the masked input shows grey exactly on the removed patches."""
    torch.manual_seed(0)
    model = _perfect(train.make_model("mae_vit_micro_patch8", 32, norm_pix_loss=norm_pix_loss))
    imgs = torch.stack([data.eval_transform(32)(im) for _, im in visualize.embedded_images()[:2]])
    out = visualize.reconstruct(model, imgs, mask_ratio=0.75, seed=1)
    torch.testing.assert_close(out["reconstruction"], out["original"], rtol=0, atol=2e-5)
    torch.testing.assert_close(out["pasted"], out["original"], rtol=0, atol=2e-5)
    assert out["loss"].abs().max() < 1e-8
    grey = (out["masked"] == visualize.GRAY).all(dim=1)  # [N, H, W]
    per_patch = grey.unflatten(1, (4, 8)).unflatten(3, (4, 8)).all(-1).all(2)  # [N, 4, 4]
    assert per_patch.sum(dim=(1, 2)).tolist() == [12, 12]  # 75% of 16 patches removed


def test_reconstruction_of_a_wrong_prediction_is_not_the_image():
    torch.manual_seed(0)
    model = train.make_model("mae_vit_micro_patch8", 32, norm_pix_loss=True)
    imgs = torch.stack([data.eval_transform(32)(im) for _, im in visualize.embedded_images()[:2]])
    out = visualize.reconstruct(model, imgs, mask_ratio=0.75, seed=1)
    assert (out["reconstruction"] - out["original"]).abs().max() > 0.1 and (out["loss"] > 0.01).all()


def test_caption_says_how_norm_pix_predictions_are_shown(tmp_path):
    plain = train.make_model("mae_vit_micro_patch8", 32)
    normed = train.make_model("mae_vit_micro_patch8", 32, norm_pix_loss=True)
    assert "norm_pix_loss" not in visualize.caption_for(plain, 0.75, 0)
    text = visualize.caption_for(normed, 0.75, 0)
    assert "un-normalised with the mean and variance of the original image's patch" in text
    assert "4 of 16 patches visible" in text
    path = visualize.save_grid(normed, visualize.embedded_images(), str(tmp_path / "p.png"))
    with Image.open(path) as im:
        taller = im.height
    with Image.open(visualize.save_grid(plain, visualize.embedded_images(), str(tmp_path / "q.png"))) as im:
        assert taller > im.height  # the extra caption lines are drawn


def test_picture_tiles_hold_the_images(tmp_path):
    """The first tile of each row is the (upscaled) original image."""
    model = train.make_model("mae_vit_micro_patch8", 32)
    images = visualize.embedded_images()[:2]
    path = visualize.save_grid(model, images, str(tmp_path / "g.png"))
    out = visualize.reconstruct(model, torch.stack([data.eval_transform(32)(im) for _, im in images]), 0.75)
    pic = torch.from_numpy(__import__("numpy").array(Image.open(path))).permute(2, 0, 1).float() / 255
    tile = (out["original"][0] * 255 + 0.5).floor() / 255  # uint8 rounding, as saved
    scale = 192 // 32
    # search the picture for the first original tile (nearest-neighbour upscaled)
    big = tile.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    H = big.shape[1]
    rows = [y for y in range(pic.shape[1] - H) if torch.allclose(pic[:, y, 8:8 + H], big[:, 0], atol=1e-5)]
    found = any(torch.allclose(pic[:, y:y + H, 8:8 + H], big, atol=1e-5) for y in rows)
    assert found
