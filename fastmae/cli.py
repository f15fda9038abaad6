"""The ``fastmae`` command.

    fastmae                      pre-train a small MAE on the embedded photographs (a few minutes
                                 on a laptop CPU), then write a reconstruction picture
    fastmae demo [flags]         the same, with any pretrain flag overridden
    fastmae video-demo [flags]   pre-train a small VideoMAE on clips panning across the embedded
                                 photographs (a few minutes on a laptop CPU), then write pictures
    fastmae pretrain [flags]     the official main_pretrain.py recipe and flags
    fastmae finetune [flags]     fine-tune an encoder: the official main_finetune.py recipe and flags
                                 (--trainable-blocks K: partial fine-tuning)
    fastmae linprobe [flags]     linear probing: the official main_linprobe.py recipe and flags
    fastmae knn [flags]          k-NN classification of an encoder's frozen features
    fastmae downstream           pre-train on the embedded digits, then k-NN, probe and fine-tune it
                                 and a random encoder: the accuracy table
    fastmae visualize --checkpoint CKPT [--image PATH ...] [--out grid.png]
    fastmae prepare --data_path DIR --out OUT [--max-side S]
                                 write an image folder as WebDataset shards (stream them with --data_path)
    fastmae convert --to fastmae|official|hf|timm IN OUT
                                 convert weights between formats (IN's format is detected)
    fastmae bench [--quick] --out DIR   benchmark against the reference; report.md and plots in DIR
    fastmae bench loader [--data_path DIR] --out DIR   the input pipeline alone: loader.json
    fastmae env                  versions, the C++ extension, the kernels in use, every FASTMAE_* setting

Distributed: ``torchrun --nproc_per_node=N -m fastmae pretrain ...`` (gloo on CPU, nccl on CUDA).
"""
from __future__ import annotations

import argparse
import sys

from . import maskalign_train, train, video_train
from .convert import HF_LAYOUTS, TARGETS
from .vit import VIT_NAMES

# The no-argument run: small enough for a few minutes on 2 CPU cores, with a clearly falling loss.
DEMO_DEFAULTS = dict(
    model="mae_vit_tiny_patch8", input_size=64, batch_size=32, epochs=25, warmup_epochs=2,
    blr=8e-3, num_workers=1, precision="fp32", output_dir="./fastmae_demo", log_dir="./fastmae_demo",
    overwrite=True,  # a demo run replaces the previous demo's files (in its own folder, not ./output_dir)
)
# ``fastmae video-demo``: VideoMAE on the embedded panning clips, a few minutes on 2 CPU cores. The
# settings are the image demo's where they carry over: its widths and 8-px patches
# (pretrain_videomae_tiny_patch8: 64 tubelet positions per time slice at 64 px), mask ratio 0.75 (16 of
# them visible; at the official 0.9 only 7), lr 1e-3, pixel targets (a per-tubelet normalised target
# is learnt no better than its mean in a few minutes). 4 frames (2 time slices) rather than 8: twice
# the steps in the same minutes, and at 8 frames the model learns less per step.
VIDEO_DEMO_DEFAULTS = dict(
    model="pretrain_videomae_tiny_patch8", input_size=64, num_frames=4, decoder_depth=2, mask_ratio=0.75,
    batch_size=8, epochs=150, warmup_epochs=5, blr=3.2e-2, normlize_target=False, num_workers=1, precision="fp32",
    output_dir="./fastmae_video_demo", log_dir="./fastmae_video_demo", overwrite=True,
)


class _Parser(argparse.ArgumentParser):
    """The parser of every command; for ``pretrain`` and the demos (``model_mask_ratio``) an unset
    ``--mask_ratio`` takes the official default of the ``--model``: 0.75 for an MAE, 0.9 for a VideoMAE."""

    model_mask_ratio = False

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        if self.model_mask_ratio and getattr(ns, "mask_ratio", 0) is None:
            if video_train.is_video_model(ns.model):
                ns.mask_ratio = video_train.DEFAULT_MASK_RATIO
            elif getattr(ns, "objective", "mae") == "maskalign" and getattr(ns, "mask_type", None) != "uniform":
                ns.mask_ratio = maskalign_train.RECIPE["mask_ratio"]
            else:
                ns.mask_ratio = 0.75
        return ns, rest


class _Formatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already speaks of its default
    or there is none worth showing (None, empty, an on/off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, "", argparse.SUPPRESS)
                or isinstance(action.default, bool) or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("official main_pretrain.py flags")
    g.add_argument("--batch_size", type=int, default=64,
                   help="batch size per process (effective batch size is batch_size * accum_iter * processes)")
    g.add_argument("--epochs", type=int, default=400, help="epochs to train (the schedule's length)")
    g.add_argument("--accum_iter", type=int, default=1,
                   help="accumulate gradients over this many batches per optimizer step")
    g.add_argument("--model", default="mae_vit_large_patch16", metavar="NAME",
                   help=f"model to train: {', '.join(train.MODEL_NAMES)}; VideoMAE (run_mae_pretraining.py's "
                        f"recipe, on clips): {', '.join(video_train.VIDEO_MODEL_NAMES)}")
    g.add_argument("--input_size", type=int, default=224,
                   help="image size; the model is built for it (must be a multiple of the patch size)")
    g.add_argument("--mask_ratio", type=float, default=None,
                   help="fraction of patches removed (default: 0.75); 0.9, tube masking, for a VideoMAE model")
    g.add_argument("--norm_pix_loss", action="store_true",
                   help="use per-patch normalised pixels as the targets of the loss")
    g.add_argument("--mask_type", choices=("random", "uniform", "block", "attention"), default=None,
                   help="which patches are removed: random (the official MAE's; the default), uniform (UM-MAE: one "
                        "kept patch per 2x2 window, ratio 0.75), block (BEiT's rectangles), attention (MaskAlign: "
                        "sampled by the teacher's cls attention; its default there)")
    g.add_argument("--mask_ratio_schedule", default=None, metavar="START:END[:cosine]",
                   help="vary the mask ratio over training, linearly (or cosine) from START to END (random or "
                        "attention masking); overrides --mask_ratio step by step")
    g.add_argument("--weight_decay", type=float, default=0.05,
                   help="AdamW weight decay (not applied to biases, norms, cls/mask/position parameters)")
    g.add_argument("--lr", type=float, default=None, metavar="LR",
                   help="absolute learning rate (default: blr * effective batch size / 256)")
    g.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                   help="base learning rate: lr = blr * effective batch size / 256")
    g.add_argument("--min_lr", type=float, default=0.0, metavar="LR",
                   help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=40, metavar="N", help="epochs of linear warmup")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root (DIR/train/<class>/<image> or DIR/<class>/<image>), or WebDataset shards "
                        "written by fastmae prepare (their folder, or 'OUT/shard-{000000..000099}.tar'); "
                        "default: the embedded scikit-image photographs")
    _add_run_flags(g, "checkpoints, log.txt and the picture go here")

    v = p.add_argument_group("official VideoMAE run_mae_pretraining.py flags (with a pretrain_videomae_* --model; "
                             "--data_path: a folder of .mp4/.avi/.webm/.mkv files or a CSV list of them, decoded "
                             "with PyAV; default: clips panning across the embedded photographs)")
    v.add_argument("--num_frames", type=int, default=16, help="frames per clip")
    v.add_argument("--sampling_rate", type=int, default=4, help="a clip takes every this many frames of a video")
    v.add_argument("--tubelet_size", type=int, default=2, help="frames per tubelet")
    v.add_argument("--decoder_depth", type=int, default=4, help="decoder blocks")
    v.add_argument("--normlize_target", type=_bool, default=True, metavar="BOOL",
                   help="regress tubelets normalised by their mean and std (the official flag, spelt so; default "
                        "True)")
    v.add_argument("--no-normlize_target", "--no-normalize_target", dest="normlize_target", action="store_false",
                   help="regress the pixels themselves")
    v.add_argument("--num_sample", type=int, default=1,
                   help="clips sampled from each decoded video (repeated sampling: decoding is paid once); a batch "
                        "holds batch_size x num_sample clips and the lr rule counts them")
    v.add_argument("--decoder_mask_ratio", type=float, default=0.0,
                   help="VideoMAE V2's decoder masking: the decoder reconstructs only a running-cell share "
                        "1 - RATIO of the tubelets (0.5 halves its tokens); default 0: V1, every masked tubelet")

    maskalign_train.add_flags(p)

    f = p.add_argument_group("fastmae flags")
    _add_fastmae_training_flags(f)
    f.add_argument("--loader", choices=("fast", "pil"), default="fast",
                   help="fast: the workers decode, one fused op crops, resizes, flips and normalises the batch (in "
                        "the workers on a CPU run, on the GPU on a CUDA run); pil: the official per-image PIL "
                        "transform. Same crop boxes, flips and masks; the pixels differ by resampler rounding")
    f.add_argument("--no-picture", dest="picture", action="store_false",
                   help="do not write output_dir/reconstruction.png at the end")


def _bool(text: str) -> bool:
    """``--normlize_target True``/``False`` (the official ``type=bool`` reads any non-empty text as True)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _add_run_flags(g, output_help: str) -> None:
    """The official scripts' flags for where a run writes, what it runs on, how it resumes."""
    g.add_argument("--output_dir", default="./output_dir", help=output_help)
    g.add_argument("--log_dir", default="./output_dir", help="TensorBoard scalars (when tensorboard is installed)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seeds the initialisation, the data order, crops and masks")
    g.add_argument("--resume", default="", metavar="CKPT",
                   help="checkpoint to resume from; 'auto' takes the latest in --output_dir (or starts "
                        "afresh when there is none)")
    g.add_argument("--start_epoch", type=int, default=0, metavar="N", help="first epoch (a resume overrides it)")
    g.add_argument("--num_workers", type=int, default=10, help="DataLoader worker processes")
    g.add_argument("--pin_mem", action="store_true", default=True,
                   help="pin the DataLoader's batches in memory for faster copies to the GPU (on by default; "
                        "CUDA only)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin them")
    g.add_argument("--world_size", type=int, default=1, metavar="N",
                   help="number of processes; as in the official code the launcher's WORLD_SIZE decides "
                        "(torchrun --nproc_per_node=N), so this value is not used")
    g.add_argument("--dist_url", default="env://", metavar="URL",
                   help="init_method of the process group (torchrun sets the env:// variables)")
    g.add_argument("--dist_on_itp", action="store_true",
                   help="the official code's Microsoft ITP cluster launch: not supported, use torchrun")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # torch.distributed.launch


def _add_fastmae_training_flags(f) -> None:
    """fastmae's flags shared by the training commands."""
    f.add_argument("--precision", choices=tuple(train.PRECISIONS), default=None,
                   help="fp32, bf16 autocast, or fp16 autocast with a gradient scaler "
                        "(default: fp16 on CUDA, as the official code, fp32 on CPU)")
    f.add_argument("--compile", nargs="?", const="default", default=None, choices=train.COMPILE_MODES,
                   metavar="MODE", help="torch.compile the model; MODE is torch.compile's mode: default, "
                                        "reduce-overhead (CUDA graphs: fewer host launches), "
                                        "max-autotune or max-autotune-no-cudagraphs")
    f.add_argument("--attn-backend", "--attn_backend", dest="attn_backend", default="auto",
                   choices=("auto", "sdpa", "xformers", "math"), help="attention implementation")
    f.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps in total (the schedule still follows --epochs); "
                        "a checkpoint of the exact position is written")
    f.add_argument("--clip-grad", "--clip_grad", dest="clip_grad", type=float, default=None, metavar="NORM",
                   help="clip the gradient norm (default: no clipping, as the official recipe)")
    f.add_argument("--save-every", "--save_every", dest="save_every", type=int, default=0, metavar="N",
                   help="also write checkpoint-last.pth every N optimizer steps (0: only at epoch ends); "
                        "a resume continues from that exact batch")
    f.add_argument("--max-nonfinite", "--max_nonfinite", dest="max_nonfinite", type=int, default=10,
                   metavar="N", help="stop after N consecutive steps with a non-finite loss, or non-finite "
                                     "gradients without fp16's scaler (each is skipped)")
    f.add_argument("--max-bad-frac", "--max_bad_frac", dest="max_bad_frac", type=float, default=0.01,
                   metavar="FRAC", help="unreadable files (images, videos) are skipped (one warning each, a count per epoch in "
                                        "log.txt); more than this fraction of an epoch stops the run")
    f.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --output_dir holds an earlier run's checkpoints, replacing "
                        "them (without it such a run is refused; --resume auto continues it)")


def _add_downstream_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of main_finetune.py (``finetune``) or main_linprobe.py (``linprobe``), with their
    defaults, and fastmae's."""
    ft = command == "finetune"
    g = p.add_argument_group(f"official main_{command}.py flags")
    g.add_argument("--batch_size", type=int, default=64 if ft else 512,
                   help="batch size per process (effective batch size is batch_size * accum_iter * processes)")
    g.add_argument("--epochs", type=int, default=50 if ft else 90, help="epochs to train")
    g.add_argument("--accum_iter", type=int, default=1,
                   help="accumulate gradients over this many batches per optimizer step")
    _add_encoder_flags(g, global_pool=ft)
    if ft:
        g.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="stochastic depth rate")
    g.add_argument("--weight_decay", type=float, default=0.05 if ft else 0.0, help="weight decay")
    g.add_argument("--lr", type=float, default=None, metavar="LR",
                   help="absolute learning rate (default: blr * effective batch size / 256)")
    g.add_argument("--blr", type=float, default=1e-3 if ft else 0.1, metavar="LR",
                   help="base learning rate: lr = blr * effective batch size / 256")
    if ft:
        g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay")
    g.add_argument("--min_lr", type=float, default=1e-6 if ft else 0.0, metavar="LR",
                   help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=float, default=5 if ft else 10, metavar="N", help="epochs of linear warmup")
    if ft:
        a = p.add_argument_group("official augmentation flags (timm's create_transform and Mixup)")
        a.add_argument("--color_jitter", type=float, default=None, metavar="PCT",
                       help="colour jitter factor (used only without --aa)")
        a.add_argument("--aa", default="rand-m9-mstd0.5-inc1", metavar="NAME",
                       help="RandAugment policy ('' for none)")
        a.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
        a.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erasing probability")
        a.add_argument("--remode", default="pixel", help="random erasing mode")
        a.add_argument("--recount", type=int, default=1, help="random erasing count")
        a.add_argument("--resplit", action="store_true", default=False,
                       help="accepted for the official signature; fastmae does not split the first augmentation")
        a.add_argument("--mixup", type=float, default=0.8,
                       help="mixup alpha, mixup enabled if > 0 (default: 0.8, the official recipe in FINETUNE.md; "
                            "main_finetune.py's own default is 0)")
        a.add_argument("--cutmix", type=float, default=1.0,
                       help="cutmix alpha, cutmix enabled if > 0 (default: 1.0, the official recipe in FINETUNE.md; "
                            "main_finetune.py's own default is 0)")
        a.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                       help="cutmix min/max ratio, overrides alpha and enables cutmix if set")
        a.add_argument("--mixup_prob", type=float, default=1.0,
                       help="probability of performing mixup or cutmix when either/both is enabled")
        a.add_argument("--mixup_switch_prob", type=float, default=0.5,
                       help="probability of switching to cutmix when both mixup and cutmix enabled")
        a.add_argument("--mixup_mode", default="batch", choices=("batch", "pair", "elem"),
                       help='how to apply mixup/cutmix params: per "batch", "pair", or "elem"')
    g.add_argument("--data_path", default=None,
                   help="DIR/train/<class>/<image> and DIR/val/<class>/<image> (ImageFolder); default: the "
                        "embedded scikit-learn digits")
    g.add_argument("--nb_classes", type=int, default=None, help="number of classes (default: the data's)")
    g.add_argument("--eval", action="store_true", help="evaluate only (the model of --resume, or --finetune)")
    g.add_argument("--dist_eval", action="store_true", default=True,
                   help="accepted for the official signature: evaluation is always split over the processes")
    _add_run_flags(g, "checkpoints (checkpoint-best.pth: the best top-1) and log.txt go here")

    f = p.add_argument_group("fastmae flags")
    _add_fastmae_training_flags(f)
    f.add_argument("--crop-scale", "--crop_scale", dest="crop_scale", type=float, nargs=2, default=(0.08, 1.0),
                   metavar=("LOW", "HIGH"), help="area range of the random resized crop (default: 0.08 1, the official)")
    f.add_argument("--hflip", type=float, default=0.5, metavar="P",
                   help="probability of a horizontal flip (default: 0.5, the official; 0 for digits or text)")
    if ft:
        f.add_argument("--trainable-blocks", "--trainable_blocks", dest="trainable_blocks", type=int, default=None,
                       metavar="K", help="partial fine-tuning: train only the last K blocks, the final norm and the "
                                         "head; the rest is frozen and runs without keeping activations "
                                         "(default: all blocks)")
        f.add_argument("--grad-checkpointing", "--grad_checkpointing", dest="grad_checkpointing", action="store_true",
                       help="recompute each trained block's activations in backward (less memory)")
        f.add_argument("--model_ema", "--model-ema", dest="model_ema", action="store_true",
                       help="keep an exponential moving average of the weights (timm's ModelEmaV3), evaluated "
                            "each epoch beside the model (test_acc1_ema ...) and saved in the checkpoints")
        f.add_argument("--model_ema_decay", "--model-ema-decay", dest="model_ema_decay", type=float, default=0.9999,
                       help="its decay per step")


def _add_encoder_flags(g, global_pool: bool) -> None:
    """Which encoder: --model, --finetune, --input_size and the pooling."""
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"the classifier ({', '.join(VIT_NAMES)}); default: what the --finetune checkpoint "
                        f"describes, else vit_large_patch16 (randomly initialised)")
    g.add_argument("--finetune", default="", metavar="CKPT",
                   help="the encoder to start from: a fastmae or official pre-training or fine-tuning checkpoint, "
                        "or a state_dict file")
    g.add_argument("--input_size", type=int, default=None,
                   help="image size (default: the --finetune checkpoint's, else 224); the position table is "
                        "resized to it")
    g.add_argument("--global_pool", action="store_true", default=global_pool,
                   help="classify the mean of the patch tokens (through fc_norm)"
                        + (" (the default)" if global_pool else ""))
    g.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="classify the cls token (through norm)" + ("" if global_pool else " (the default)"))


def _add_knn_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("k-NN flags")
    _add_encoder_flags(g, global_pool=False)
    g.add_argument("--nb_knn", "--k", dest="nb_knn", type=int, default=20, metavar="K", help="neighbours that vote")
    g.add_argument("--temperature", type=float, default=0.07, help="votes are weighted exp(similarity / T)")
    g.add_argument("--data_path", default=None,
                   help="DIR/train/<class>/<image> and DIR/val/<class>/<image>; default: the embedded digits")
    g.add_argument("--nb_classes", type=int, default=None, help="number of classes (default: the data's)")
    g.add_argument("--batch_size", type=int, default=128, help="images per forward pass")
    g.add_argument("--num_workers", type=int, default=10, help="DataLoader worker processes")
    g.add_argument("--output_dir", default="./output_dir", help="log.txt (test_acc1, test_acc5) goes here")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    g.add_argument("--seed", type=int, default=0, help="seeds a random initialisation (without --finetune)")
    g.add_argument("--precision", choices=tuple(train.PRECISIONS), default=None,
                   help="fp32, or bf16/fp16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--attn-backend", "--attn_backend", dest="attn_backend", default="auto",
                   choices=("auto", "sdpa", "xformers", "math"), help="attention implementation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmae", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="Run `fastmae COMMAND --help` for the flags of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    pre = sub.add_parser(
        "pretrain", formatter_class=_Formatter, help="MAE pre-training with the official recipe",
        description="MAE pre-training with the official recipe (main_pretrain.py flags and defaults). "
                    "Without --data_path it trains on photographs bundled with scikit-image. Writes "
                    "checkpoint-last.pth (every epoch), checkpoint-<epoch>.pth (every 20 epochs and the "
                    "last), log.txt (JSON lines) and reconstruction.png to --output_dir. Distributed: "
                    "torchrun --nproc_per_node=N -m fastmae pretrain ...")
    _add_pretrain_flags(pre)
    pre.model_mask_ratio = True

    demo = sub.add_parser(
        "demo", formatter_class=_Formatter, help="what `fastmae` with no arguments runs",
        description="Pre-train a small MAE on the embedded photographs (what `fastmae` alone runs): "
                    + ", ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in DEMO_DEFAULTS.items())
                    + ". Any pretrain flag can be given to override these; each run replaces the previous "
                      "demo's files in its folder.")
    _add_pretrain_flags(demo)
    demo.set_defaults(**DEMO_DEFAULTS)
    demo.model_mask_ratio = True

    vdemo = sub.add_parser(
        "video-demo", formatter_class=_Formatter, help="pre-train a small VideoMAE on the embedded clips",
        description="Pre-train a small VideoMAE on clips of a camera panning and zooming across the embedded "
                    "photographs: " + ", ".join(f"--{k}" if v is True else f"--{k} {v}"
                                                for k, v in VIDEO_DEMO_DEFAULTS.items())
                    + ". Any pretrain flag can be given to override these; writes reconstruction.png and "
                      "reconstruction.gif.")
    _add_pretrain_flags(vdemo)
    vdemo.set_defaults(**VIDEO_DEMO_DEFAULTS)
    vdemo.model_mask_ratio = True

    for command, what in (("finetune", "fine-tune an encoder (main_finetune.py's recipe)"),
                          ("linprobe", "linear probing of a frozen encoder (main_linprobe.py's recipe)")):
        cmd = sub.add_parser(command, formatter_class=_Formatter, help=what,
                             description=f"{what[0].upper()}{what[1:]}, with the official flags and defaults. Without "
                                         "--data_path it runs on the embedded scikit-learn digits. Writes "
                                         "checkpoint-last.pth, checkpoint-best.pth (best top-1) and log.txt "
                                         "(train_loss, test_loss, test_acc1, test_acc5 per epoch) to --output_dir. "
                                         f"Distributed: torchrun --nproc_per_node=N -m fastmae {command} ...")
        _add_downstream_flags(cmd, command)
    knn = sub.add_parser("knn", formatter_class=_Formatter, help="k-NN classification of frozen features",
                         description="k-NN classification of an encoder's frozen features (cosine similarity, "
                                     "temperature-weighted votes, as DINO): top-1 and top-5 on the validation set, "
                                     "written to --output_dir/log.txt.")
    _add_knn_flags(knn)

    ds = sub.add_parser("downstream", formatter_class=_Formatter,
                        help="pre-train on the embedded digits, then k-NN, probe and fine-tune: the accuracy table",
                        description="Does pre-training help? Pre-trains a small MAE on the embedded scikit-learn "
                                    "digits, then runs k-NN, linear probing, partial fine-tuning (1 and 2 blocks) "
                                    "and full fine-tuning from it and from a random initialisation, and writes the "
                                    "accuracy table (accuracy.md, accuracy.png) to --output_dir.")
    ds.add_argument("--output_dir", default="./fastmae_downstream", help="every run's folder and the table go here")
    ds.add_argument("--pretrain-epochs", "--pretrain_epochs", dest="pretrain_epochs", type=int, default=40,
                    help="epochs of MAE pre-training")
    ds.add_argument("--epochs", type=int, default=10, help="epochs of each linear probe and fine-tuning")
    ds.add_argument("--finetune", default="", metavar="CKPT",
                    help="evaluate this pre-training checkpoint (of mae_vit_tiny_patch4 at 32 px) instead of "
                         "pre-training one")
    ds.add_argument("--num_workers", type=int, default=1, help="DataLoader worker processes")
    ds.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    ds.add_argument("--precision", choices=tuple(train.PRECISIONS), default=None,
                    help="default: fp16 on CUDA, fp32 on CPU")
    ds.add_argument("--seed", type=int, default=0, help="seeds every run")
    ds.add_argument("--maskalign", action="store_true",
                    help="also train a MaskAlign student taught by the pre-trained MAE (--pretrain-epochs epochs) "
                         "and evaluate its encoder beside the MAE's and the random one")

    vis = sub.add_parser(
        "visualize", formatter_class=_Formatter, help="reconstruction picture from a checkpoint",
        description="For each image: original | masked | reconstruction | reconstruction with the "
                    "visible patches pasted back, as in the official demo.")
    vis.add_argument("--checkpoint", required=True, help="a checkpoint written by fastmae pretrain")
    vis.add_argument("--image", nargs="+", default=None, metavar="PATH",
                     help="image files (default: four of the embedded photographs)")
    vis.add_argument("--out", default=None,
                     help="PNG to write (default: reconstruction.png beside the checkpoint)")
    vis.add_argument("--mask_ratio", "--mask-ratio", dest="mask_ratio", type=float, default=None,
                     help="default: the ratio the checkpoint was trained with")
    vis.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    vis.add_argument("--mask_type", "--mask-type", dest="mask_type", choices=("random", "uniform", "block"),
                     default=None, help="how the masks are drawn (default: as the checkpoint was trained)")
    vis.add_argument("--device", default="cpu")

    prep = sub.add_parser(
        "prepare", formatter_class=_Formatter, help="write an image folder as WebDataset shards for streaming",
        description="Write an ImageFolder (DIR/train/<class>/<image> or DIR/<class>/<image>) as WebDataset tar shards "
                    "OUT/shard-NNNNNN.tar and OUT/index.json, in a fixed shuffled order; unreadable images are left "
                    "out and listed. Train on them with fastmae pretrain --data_path OUT (or the brace pattern "
                    "index.json gives), streamed and split across processes and workers.")
    prep.add_argument("--data_path", required=True, help="the image folder")
    prep.add_argument("--out", required=True, help="the folder for the shards and index.json")
    prep.add_argument("--max-side", "--max_side", dest="max_side", type=int, default=None, metavar="S",
                      help="re-encode images whose longer side exceeds S as JPEG at that side (cuts decode time)")
    prep.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=1000,
                      help="samples per shard")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    prep.add_argument("--workers", type=int, default=0, help="processes decoding (and re-encoding) the images")
    prep.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                      help="keep the folder's sorted order (shards then hold one class after another)")
    prep.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")

    conv = sub.add_parser(
        "convert", formatter_class=_Formatter,
        help="convert weights to the fastmae, official, Hugging Face or timm format",
        description="Convert a checkpoint to another format. IN may be a fastmae or official checkpoint, a Hugging Face "
                    "ViTMAE or timm ViT model folder (config.json and model.safetensors or pytorch_model.bin), a "
                    ".safetensors file or a state_dict file; its format is detected. Nothing in IN is executed: .pth/"
                    ".bin files are read weights-only. fastmae and official write one file (.pth, or .safetensors); "
                    "hf writes a model folder for ViTMAEForPreTraining.from_pretrained (ViTMAEModel for an encoder "
                    "without decoder); timm a folder for timm.create_model('local-dir:OUT', pretrained=True) or, given "
                    "a .safetensors or .pth name, the bare weights.")
    conv.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    conv.add_argument("input", metavar="IN", help="the checkpoint file or model folder to convert")
    conv.add_argument("output", metavar="OUT", help="the file or folder to write")
    conv.add_argument("--hf-layout", "--hf_layout", dest="hf_layout", choices=HF_LAYOUTS, default="4",
                      help="Hugging Face key layout: 4 (transformers 4.x keys, which transformers 5 also loads) or 5")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    sub.add_parser("env", help="what fastmae runs on: versions, extension, kernels, settings",
                   description="Versions, whether the C++ extension loaded (and if not, why and how to fix "
                               "it), the CPU instruction set of its kernels, the fused ops' implementation "
                               "per device, and every FASTMAE_* setting. Paste it into a bug report.")

    from .bench import cli as bench_cli  # the benchmark command ships with its suites, in fastmae.bench

    bench = sub.add_parser("bench", formatter_class=_Formatter, help=bench_cli.HELP,
                           description=bench_cli.DESCRIPTION)
    bench_cli.add_arguments(bench)
    return parser


VIDEO_FLAGS = ("num_frames", "sampling_rate", "tubelet_size", "decoder_depth", "normlize_target", "num_sample",
               "decoder_mask_ratio")
MASKALIGN_FLAGS = ("teacher", "target_norm", "loss_type", "loss_weights", "fusion_type", "head_type", "drop_path")


def _check_flag_families(args, parser) -> None:
    """A VideoMAE flag with an image model, or a MaskAlign flag without --objective maskalign, would
    be silently ignored: refuse it, naming the flag."""
    sub = parser._subparsers._group_actions[0].choices[args.command]
    changed = lambda names: [n for n in names if getattr(args, n, None) != sub.get_default(n)]  # noqa: E731
    video_model = video_train.is_video_model(args.model)
    if not video_model and changed(VIDEO_FLAGS):
        raise ValueError(f"--{changed(VIDEO_FLAGS)[0]} is a VideoMAE flag; --model {args.model} is an image model "
                         f"(pretrain_videomae_* models train on clips)")
    if getattr(args, "objective", "mae") != "maskalign" and changed(MASKALIGN_FLAGS):
        raise ValueError(f"--{changed(MASKALIGN_FLAGS)[0]} is a MaskAlign flag: add --objective maskalign")


def _run_pretrain(args, parser=None) -> int:
    try:
        if parser is not None:
            _check_flag_families(args, parser)
        if getattr(args, "objective", "mae") == "maskalign":
            if video_train.is_video_model(args.model) or args.command == "video-demo":
                raise ValueError("--objective maskalign trains an image student; --model must be an MAE model name")
            maskalign_train.pretrain(args)
        elif video_train.is_video_model(args.model):
            video_train.pretrain(args)
        elif args.command == "video-demo":
            raise ValueError(f"video-demo trains a VideoMAE: --model must be one of "
                             f"{', '.join(video_train.VIDEO_MODEL_NAMES)}")
        else:
            train.pretrain(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _run_downstream(args) -> int:
    from . import downstream

    try:
        getattr(downstream, args.command)(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _run_convert(args) -> int:
    import os

    from .convert import export

    if os.path.exists(args.output) and os.path.realpath(args.output) == os.path.realpath(args.input):
        raise ValueError("OUT is IN: write the converted weights elsewhere")
    if os.path.exists(args.output) and not args.overwrite and not (os.path.isdir(args.output) and
                                                                   not os.listdir(args.output)):
        raise ValueError(f"{args.output!r} exists; pass --overwrite to replace it")
    for line in export(args.input, args.output, args.to, args.hf_layout):
        print(line)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        argv = ["demo"]
    if argv[:2] == ["bench", "loader"]:  # the input pipeline alone, on any folder
        from .bench import loader as loader_bench

        return loader_bench.main(argv[2:])
    parser = build_parser()
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.error(f"options come after a command: `fastmae demo {' '.join(argv)}` (the embedded "
                     f"default) or `fastmae pretrain {' '.join(argv)}`")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError

    try:
        if args.command == "env":
            from .envinfo import main as env_main

            return env_main()
        if args.command == "bench":
            from .bench import cli as bench_cli

            return bench_cli.run(args)
        if args.command == "convert":
            return _run_convert(args)
        if args.command == "prepare":
            from .shards import prepare

            prepare(args.data_path, args.out, max_side=args.max_side, shard_size=args.shard_size, quality=args.quality,
                    shuffle=args.shuffle, workers=args.workers, overwrite=args.overwrite)
            return 0
        if args.command in ("pretrain", "demo", "video-demo"):
            return _run_pretrain(args, parser)
        if args.command in ("finetune", "linprobe", "knn"):
            return _run_downstream(args)
        if args.command == "downstream":
            from . import downstream_demo

            downstream_demo.run(args, build_parser())
            return 0
        from .visualize import visualize

        if video_train.is_video_checkpoint(args.checkpoint):
            if args.image:
                raise ValueError(f"{args.checkpoint!r} holds a VideoMAE: its picture shows the embedded clips, "
                                 f"not --image")
            if args.mask_type:
                raise ValueError(f"{args.checkpoint!r} holds a VideoMAE: its masks are tube masks, not --mask_type")
            path = video_train.visualize(args.checkpoint, args.out, args.mask_ratio, args.seed, args.device)
            print(f"wrote {path} and {path.removesuffix('.png')}.gif")
            return 0
        path = visualize(args.checkpoint, args.image, args.out, args.mask_ratio, args.seed, args.device,
                         args.mask_type)
        print(f"wrote {path}")
        return 0
    except (ValueError, IndexError, OSError, CheckpointError, train.NonFiniteLossError) as e:
        print(f"fastmae {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = getattr(args, "output_dir", None)
        print(f"\ninterrupted; `--resume auto --output_dir {out}` continues from the last checkpoint"
              if out else "\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
