"""VideoMAE pre-training (``fastmae pretrain --model pretrain_videomae_*``, ``fastmae video-demo``):
the recipe on the shared engine, its data, checkpoints, exact resume, pictures and errors."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from fastmae import checkpoint as ckpt_io
from fastmae import cli, data, video, video_train, visualize
from trainkit import assert_states_equal

VIDEO = "pretrain_videomae_small_patch16_224"
# A micro VideoMAE: 8 px patches at 32 px, 4 frames in tubelets of 2 -> 2x4x4 = 32 tubelets.
MICRO = dict(patch_size=8, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=16,
             decoder_num_heads=2)
TINY = ["--model", VIDEO, "--input_size", "32", "--num_frames", "4", "--decoder_depth", "1", "--mask_ratio", "0.75",
        "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--blr", "5e-2", "--num_workers", "0",
        "--device", "cpu", "--precision", "fp32", "--no-picture"]


def video_args(out, *extra):
    argv = ["pretrain", *TINY, "--output_dir", str(out), "--log_dir", str(out), *map(str, extra)]
    return cli.build_parser().parse_args(argv)


def clips(n_images=4, repeats=4):
    """16 panning clips of 4 frames at 32 px (4 steps of 4 per epoch)."""
    return video_train.PanningClips(4, 32, names=data.EMBEDDED_IMAGES[:n_images], repeats=repeats)


def run(out, *extra, base=None, **kw):
    return video_train.pretrain(video_args(out, *extra), base=base or clips(), model_overrides=MICRO, **kw)


# ---------------------------------------------------------------------------- data
def test_panning_clips_are_seeded_smooth_and_normalised():
    ds = video_train.ClipSamples(clips(), (2, 4, 4), 0.75, seed=0, reports_skipped=False)
    clip, mask = ds[(3, 0)]
    again, mask2 = ds[(3, 0)]
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
    assert torch.equal(clip, again) and torch.equal(mask, mask2)  # the sample's own seed
    other, _ = ds[(3, 1)]
    assert not torch.equal(clip, other)  # another epoch, another path
    assert -2.2 < clip.min() and clip.max() < 2.7  # ImageNet-normalised
    # tube masking: the same 12 of 16 positions in both time slices
    assert mask.shape == (32,) and mask.sum() == 24 and torch.equal(mask[:16], mask[16:])
    # a pan: consecutive frames differ, but less than frames of different clips
    step = (clip[:, 1:] - clip[:, :-1]).abs().mean()
    assert 0 < step < (clip - ds[(5, 0)][0]).abs().mean()


def _npy_videos(tmp_path, lengths):
    """.npy "videos" (uint8 [F, 24, 40, 3], frame f filled with f) and a CSV list of them."""
    rows = []
    for i, n in enumerate(lengths):
        arr = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 24, 40, 3)).copy()
        np.save(tmp_path / f"v{i}.npy", arr)
        rows.append(f"v{i}.npy,{i % 2}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "list.csv")


def test_video_files_sampling_crop_and_skipped_short_clips(tmp_path):
    csv_path = _npy_videos(tmp_path, [40, 5, 40])
    files = video_train.VideoFiles(csv_path, num_frames=4, sampling_rate=3, input_size=16, reader=np.load)
    assert [label for _, label in files.samples] == [0, 1, 0]
    frames = files.clip(0, torch.Generator().manual_seed(1))
    assert frames.shape == (4, 16, 16, 3) and frames.dtype == torch.uint8
    firsts = frames[:, 0, 0, 0].tolist()
    assert [b - a for a, b in zip(firsts, firsts[1:])] == [3, 3, 3]  # every 3rd frame from a random start
    with pytest.raises(ValueError, match="has 5 frames, fewer than --num_frames 4 x --sampling_rate 3 = 12"):
        files.clip(1, torch.Generator())
    ds = video_train.ClipSamples(files, (2, 2, 2), 0.5, seed=0, reports_skipped=True)
    with pytest.warns(RuntimeWarning, match="v1.npy"):
        clip, mask, skipped = ds[(1, 0)]  # the short clip is skipped (and counted) for the next one
    assert skipped == 1 and clip.shape == (3, 4, 16, 16)


def test_data_path_without_a_video_decoder_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "a.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails, installed or not
    with pytest.raises(ValueError, match="pip install av"):
        video_train.pretrain(video_args(tmp_path / "out", "--data_path", tmp_path), model_overrides=MICRO)


def test_data_path_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        video_train.list_videos(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no video files"):
        video_train.list_videos(str(tmp_path))
    (tmp_path / "bad.csv").write_text("a.mp4,1\nb.mp4,x\n")
    with pytest.raises(ValueError, match="line 2: the label 'x' is not an integer"):
        video_train.list_videos(str(tmp_path / "bad.csv"))


def test_a_run_on_video_files_counts_skipped_ones(tmp_path, monkeypatch):
    csv_path = _npy_videos(tmp_path, [12, 3, 12, 12, 12, 12, 12, 12])
    monkeypatch.setattr(video_train, "_default_reader", lambda: np.load)
    with pytest.warns(RuntimeWarning, match="v1.npy"):
        res = video_train.pretrain(video_args(tmp_path / "out", "--data_path", csv_path, "--epochs", "1",
                                              "--sampling_rate", "2", "--max-bad-frac", "0.5"), model_overrides=MICRO)
    log = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert res.steps == 2 and log["skipped_files"] == 1


def _write_mp4(path, frames: int, size=(40, 48)):
    """A video file written with PyAV (MPEG-4 part 2): a bright bar sweeping across a gradient."""
    import av

    h, w = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.tile(np.linspace(0, 200, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
            img[:, (2 * i) % w:(2 * i) % w + 6] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_real_video_files_through_pyav(tmp_path):
    """Real files decoded by PyAV: a folder of .mp4 videos with a too-short one and a corrupt one;
    a run with repeated sampling (--num_sample 2: each decoded video gives two clips) trains and
    counts the bad files it passes over (item 0 passes both, item 1 the short one: 3)."""
    pytest.importorskip("av")
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(6):
        _write_mp4(folder / f"v{i}.mp4", 24)
    _write_mp4(folder / "short.mp4", 3)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    frames = video_train.read_video_pyav(str(folder / "v0.mp4"))
    assert frames.shape == (24, 40, 48, 3) and frames.dtype == np.uint8
    assert frames[0, :, :6].mean() > frames[0, :, 20:26].mean()  # the bar starts at the left edge
    with pytest.warns(RuntimeWarning, match="could not be read|fewer than"):
        res = video_train.pretrain(video_args(tmp_path / "out", "--data_path", folder, "--epochs", "1",
                                              "--sampling_rate", "2", "--num_sample", "2", "--batch_size", "2",
                                              "--max-bad-frac", "0.5"), model_overrides=MICRO)
    log = json.loads((tmp_path / "out" / "log.txt").read_text())
    assert res.steps == 4 and log["skipped_files"] == 3 and np.isfinite(log["train_loss"])
    assert res.images_per_sec > 0


# ---------------------------------------------------------------------------- training
def test_tiny_run_learns_logs_and_checkpoints_a_rebuildable_model(tmp_path, capsys):
    res = run(tmp_path, "--epochs", "3")
    assert res.steps == 12 and res.losses[-1] < res.losses[0]
    lines = [json.loads(ln) for ln in (tmp_path / "log.txt").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [0, 1, 2] and all(math_ok(ln["train_loss"]) for ln in lines)
    assert "tube mask ratio 0.75 (24 masked)" in capsys.readouterr().out
    ckpt = ckpt_io.load(res.checkpoint)
    cfg = ckpt["model_config"]
    assert cfg["kind"] == "videomae" and cfg["num_frames"] == 4 and cfg["decoder_depth"] == 1
    assert cfg["normalize_target"] is True
    model = ckpt_io.build_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    assert ckpt_io.model_config(model) == {k: v for k, v in cfg.items() if k != "normalize_target"}
    # weight decay: none on biases, norms and the mask token (official skip list)
    opt = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in opt] == [0.0, 0.05] and opt[0]["betas"] == (0.9, 0.95)


def math_ok(x):
    return isinstance(x, float) and np.isfinite(x)


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path):
    full = run(tmp_path / "full", "--epochs", "2")
    part = tmp_path / "part"
    first = run(part, "--epochs", "2", "--max-steps", "5")
    stop = ckpt_io.load(first.checkpoint)
    assert (stop["epoch"], stop["epoch_iter"], stop["step"]) == (1, 1, 5)
    rest = run(part, "--epochs", "2", "--resume", "auto")
    assert rest.steps == full.steps == 8
    a, b = ckpt_io.load(str(tmp_path / "full" / ckpt_io.LAST)), ckpt_io.load(str(part / ckpt_io.LAST))
    assert_states_equal(a["model"], b["model"], "model")
    assert_states_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    # another target normalisation is another model: refused on resume
    with pytest.raises(ckpt_io.CheckpointError, match="normalize_target"):
        run(part, "--epochs", "3", "--resume", "auto", "--no-normlize_target")


def test_pictures_at_the_end_and_from_the_checkpoint(tmp_path):
    from PIL import Image

    args = video_args(tmp_path, "--epochs", "1")
    args.picture = True
    res = video_train.pretrain(args, base=clips(repeats=1), model_overrides=MICRO)
    png, gif = res.outputs["reconstructions"], res.outputs["animation"]
    with Image.open(png) as im:
        assert im.width > 4 * 32 and im.height > 2 * 4 * 32
    with Image.open(gif) as im:
        assert im.n_frames == 4
    assert cli.main(["visualize", "--checkpoint", res.checkpoint, "--out", str(tmp_path / "vis.png")]) == 0
    assert os.path.isfile(tmp_path / "vis.png") and os.path.isfile(tmp_path / "vis.gif")
    with pytest.raises(ckpt_io.CheckpointError, match="fastmae.video_train.visualize"):
        visualize.visualize(res.checkpoint)


def test_reconstruction_with_a_perfect_prediction_gives_back_the_clip():
    """The picture's un-normalisation inverts the loss's target normalisation."""
    torch.manual_seed(0)
    model = video_train.make_video_model(VIDEO, 32, 4, 2, 1, **MICRO)
    videos, masks = video_train.preview_clips(model, 0.75)
    labels = video.videomae_labels(videos, masks, 8, 2, normalize_target=True)
    model.forward = lambda x, m, num_masked=None: labels  # noqa: E731 - a model that predicts the targets
    out = video_train.reconstruct_clips(model, videos, masks, normalize_target=True)
    assert out["loss"].abs().max() < 1e-10
    torch.testing.assert_close(out["pasted"], out["original"], atol=1e-5, rtol=0)


def test_picture_measures_the_prediction_against_the_clip_mean_colour():
    """Pixel targets: the picture's loss of a model predicting each clip's visible mean colour is
    its mean_colour_loss, computed here another way; a perfect prediction scores 0 below it."""
    torch.manual_seed(0)
    model = video_train.make_video_model(VIDEO, 32, 4, 2, 1, **MICRO)
    videos, masks = video_train.preview_clips(model, 0.75)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    pixels = videos * torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1, 1) + mean  # [B, C, T, H, W] in [0, 1]
    visible = ~masks.view(2, 2, 4, 4).repeat_interleave(2, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)
    colour = torch.stack([pixels[b][:, visible[b]].mean(-1) for b in range(2)])  # [B, C]
    want = torch.stack([((pixels[b][:, ~visible[b]] - colour[b][:, None]) ** 2).mean() for b in range(2)])
    labels = video.videomae_labels(videos, masks, 8, 2, normalize_target=False)  # [B, M, K * C], C last
    flat = colour[:, None, None, :].expand(-1, labels.shape[1], labels.shape[2] // 3, -1).reshape(labels.shape)
    for prediction, loss in ((flat, want), (labels, torch.zeros(2))):
        model.forward = lambda x, m, num_masked=None, p=prediction: p  # noqa: E731
        out = video_train.reconstruct_clips(model, videos, masks, normalize_target=False)
        torch.testing.assert_close(out["mean_colour_loss"], want.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["loss"], loss.float(), rtol=1e-5, atol=1e-7)
    assert (want > 0.01).all()
    assert "mean_colour_loss" not in video_train.reconstruct_clips(model, videos, masks, normalize_target=True)


# ---------------------------------------------------------------------------- command line and errors
def test_cli_routes_video_models_with_the_official_defaults():
    p = cli.build_parser()
    a = p.parse_args(["pretrain", "--model", VIDEO])
    assert (a.mask_ratio, a.decoder_depth, a.num_frames, a.sampling_rate, a.tubelet_size, a.normlize_target) == \
        (0.9, 4, 16, 4, 2, True)
    assert p.parse_args(["pretrain"]).mask_ratio == 0.75  # image MAE: unchanged
    assert p.parse_args(["pretrain", "--model", VIDEO, "--normlize_target", "False"]).normlize_target is False
    assert p.parse_args(["pretrain", "--model", VIDEO, "--no-normlize_target"]).normlize_target is False
    d = p.parse_args(["video-demo"])  # the demo's own small configuration (cli.VIDEO_DEMO_DEFAULTS)
    assert d.model == "pretrain_videomae_tiny_patch8" and d.mask_ratio == 0.75
    assert (d.input_size, d.num_frames, d.decoder_depth) == (64, 4, 2)
    assert p.parse_args(["video-demo", "--model", VIDEO]).mask_ratio == 0.75  # the demo's, not the model's
    assert d.normlize_target is False and p.parse_args(["video-demo", "--normlize_target", "True"]).normlize_target
    assert p.parse_args(["video-demo", "--mask_ratio", "0.5"]).mask_ratio == 0.5


@pytest.mark.parametrize("flags, message", [
    (("--num_frames", "5"), "--num_frames 5 is not divisible by --tubelet_size 2"),
    (("--input_size", "36"), "--input_size 36 is not a multiple of the patch size 8"),
    (("--mask_ratio", "0.01"), "masks no tubelet"),
    (("--norm_pix_loss",), "--no-normlize_target"),
])
def test_bad_settings_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, *flags)


def test_cli_reports_errors(tmp_path, capsys):
    rc = cli.main(["pretrain", *TINY, "--num_frames", "7", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path)])
    assert rc == 1 and "--num_frames 7 is not divisible by --tubelet_size 2" in capsys.readouterr().err


def test_compile_flag_compiles_the_video_model_in_one_graph(tmp_path, monkeypatch):
    """--compile: the VideoMAE called with the batch's masks and num_masked traces as one graph
    (fullgraph, aot_eager keeps it fast on CPU) and trains like eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    calls, real = [], torch.compile
    counter = CompileCounterWithBackend("aot_eager")

    def compile_spy(model, **kw):
        calls.append(type(model).__name__)
        return real(model, backend=counter, fullgraph=True)

    eager = run(tmp_path / "eager", "--max-steps", "2")
    monkeypatch.setattr(torch, "compile", compile_spy)
    torch._dynamo.reset()
    compiled = run(tmp_path / "compiled", "--max-steps", "2", "--compile")
    assert calls == ["PretrainVisionTransformer"] and counter.frame_count == 1
    a, b = ckpt_io.load(eager.checkpoint)["model"], ckpt_io.load(compiled.checkpoint)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_video_demo_settings_train_on_the_embedded_clips(tmp_path, capsys):
    """`fastmae video-demo`'s real settings, cut to 3 steps: the panning clips, the demo's own small
    model, and both pictures, with the caption inside the PNG's width."""
    from PIL import Image

    rc = cli.main(["video-demo", "--output_dir", str(tmp_path), "--log_dir", str(tmp_path), "--max-steps", "3",
                   "--num_workers", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model pretrain_videomae_tiny_patch8 at 4x64x64" in out and "tubelets 2x8x8: 2x8x8 = 128" in out
    assert "tube mask ratio 0.75 (96 masked)" in out and "a camera panning and zooming" in out
    assert f"reconstructions: {tmp_path / 'reconstruction.png'}" in out
    with Image.open(tmp_path / "reconstruction.png") as im:
        assert im.width >= 200 + 4 * 116 and im.height > 2 * 4 * 64
    with Image.open(tmp_path / "reconstruction.gif") as gif:
        assert gif.n_frames == 4
    assert ckpt_io.load(str(tmp_path / "checkpoint-last.pth"))["model_config"]["patch_size"] == 8


def test_commands_route_to_the_video_recipe(monkeypatch, capsys):
    from fastmae import train

    seen = []
    monkeypatch.setattr(video_train, "pretrain", lambda args: seen.append(("video", args.model)))
    monkeypatch.setattr(train, "pretrain", lambda args: seen.append(("image", args.model)))
    assert cli.main(["video-demo"]) == 0
    assert cli.main(["pretrain", "--model", VIDEO]) == 0
    assert cli.main(["pretrain", "--model", "mae_vit_tiny_patch8"]) == 0
    assert seen == [("video", "pretrain_videomae_tiny_patch8"), ("video", VIDEO), ("image", "mae_vit_tiny_patch8")]
    assert cli.main(["video-demo", "--model", "mae_vit_tiny_patch8"]) == 1
    assert "video-demo trains a VideoMAE" in capsys.readouterr().err
