"""``fastmae downstream``: does pre-training help? The whole downstream workflow on the embedded digits.

Pre-trains a small MAE briefly on the training split of scikit-learn's bundled digits (1,437
images; no download), then evaluates its encoder, and a randomly initialised one of the same
shape, with every downstream command: k-NN, linear probing, partial fine-tuning of the last 1
and 2 blocks, and full fine-tuning, each on the 360 validation digits. The recipes are the
official ones with the changes ``DIGITS``, ``RUNS`` and ``FINETUNE`` state for 32-px digits and
10 epochs. Prints the accuracy table and writes it as ``accuracy.md`` and ``accuracy.png`` beside
the runs' folders.

Why the digits: they are real labelled images that ship inside a package fastmae already needs
(scikit-learn), they are small enough for minutes on a 2-core CPU, and they are hard enough that a
random encoder is clearly beaten (the embedded photographs have no labels). Each command is run
through its own parser, so the official defaults hold except where the lists below say otherwise.
"""
from __future__ import annotations

import os

MODEL = "mae_vit_tiny_patch4"  # 32-px digits in 4-px patches: 64 patches, as the demo's 64 px in 8 px
ENCODER = "vit_tiny_patch4"
INPUT_SIZE = 32
# Overrides of the official pre-training defaults, sized for a 2-core CPU.
PRETRAIN = ["--model", MODEL, "--input_size", str(INPUT_SIZE), "--batch_size", "64", "--warmup_epochs", "2",
            "--blr", "5e-3", "--no-picture"]
# Digits are small and few, and 10 epochs are short: every run crops at least half the image and
# never flips it (a mirrored digit is another glyph); fine-tuning takes a higher base lr without
# mixup/cutmix (they slow a short schedule down; RandAugment and random erasing stay); LARS moves
# each weight matrix by lr x 0.001 of its norm per step, so the probe's 110 steps need lr 50
# where the official 7,000 take 6.4.
DIGITS = ["--crop-scale", "0.5", "1", "--hflip", "0", "--warmup_epochs", "1"]
RUNS = [  # (row, command, flags)
    ("k-NN (k=20)", "knn", []),
    ("linear probe", "linprobe", ["--batch_size", "128", "--blr", "100"]),
    ("partial fine-tuning, 1 block", "finetune", ["--trainable-blocks", "1"]),
    ("partial fine-tuning, 2 blocks", "finetune", ["--trainable-blocks", "2"]),
    ("full fine-tuning", "finetune", []),
]
FINETUNE = ["--batch_size", "64", "--blr", "5e-3", "--mixup", "0", "--cutmix", "0"]
# --maskalign: a MaskAlign student of the same encoder, taught by the pre-trained MAE (the official
# README recipe; its base lr, 1.5e-4, as the official script's)
MASKALIGN = ["--objective", "maskalign", "--input_size", str(INPUT_SIZE), "--batch_size", "64", "--warmup_epochs", "1",
             "--blr", "1.5e-4", "--no-picture"]


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.lower()).strip("_").replace("__", "_")


def run(args, parser) -> dict:
    """Runs everything ``args`` (the ``fastmae downstream`` namespace) asks, each command's flags
    read by ``parser`` (``fastmae.cli.build_parser()``); returns the table ``{row: {"pre-trained":
    acc1, "random init": acc1}}`` and writes accuracy.md / accuracy.png."""
    from . import data, downstream, train

    if args.epochs < 1 or (args.pretrain_epochs < 1 and not args.finetune):
        raise ValueError(f"--epochs and --pretrain-epochs must be at least 1, got {args.epochs} and "
                         f"{args.pretrain_epochs}")
    out = args.output_dir
    common = ["--num_workers", str(args.num_workers), "--seed", str(args.seed)]
    if args.device:
        common += ["--device", args.device]
    digits = (data.EmbeddedDigits("train"), data.EmbeddedDigits("val"))

    ckpt = args.finetune
    if not ckpt:
        pre_dir = os.path.join(out, "pretrain")
        pre = parser.parse_args(["pretrain", *PRETRAIN, *common, "--epochs", str(args.pretrain_epochs),
                                 "--output_dir", pre_dir, "--log_dir", pre_dir, "--overwrite"]
                                + (["--precision", args.precision] if args.precision else []))
        print(f"== pre-training {MODEL} on the digits for {args.pretrain_epochs} epochs")
        train.pretrain(pre, dataset=digits[0])
        ckpt = os.path.join(pre_dir, "checkpoint-last.pth")

    sources = [("pre-trained", ["--finetune", ckpt])]
    if getattr(args, "maskalign", False):
        from . import maskalign_train

        ma_dir = os.path.join(out, "maskalign")
        ma = parser.parse_args(["pretrain", *MASKALIGN, "--model", MODEL, *common, "--teacher", ckpt, "--epochs",
                                str(args.pretrain_epochs), "--output_dir", ma_dir, "--log_dir", ma_dir, "--overwrite"]
                               + (["--precision", args.precision] if args.precision else []))
        print(f"== MaskAlign: a {MODEL} student taught by the pre-trained MAE, {args.pretrain_epochs} epochs")
        maskalign_train.pretrain(ma, dataset=digits[0])
        sources.append(("MaskAlign student", ["--finetune", os.path.join(ma_dir, "checkpoint-last.pth")]))
    sources.append(("random init", ["--model", ENCODER, "--input_size", str(INPUT_SIZE)]))
    table: dict[str, dict[str, float]] = {}
    for init, source in sources:
        for row, command, flags in RUNS:
            run_dir = os.path.join(out, f"{_slug(init)}_{_slug(row)}")
            argv = [command, *source, *common, "--output_dir", run_dir, *flags]
            if command != "knn":
                argv += [*DIGITS, *(FINETUNE if command == "finetune" else []), "--epochs", str(args.epochs),
                         "--log_dir", run_dir, "--overwrite"]
            if args.precision:
                argv += ["--precision", args.precision]
            print(f"== {init}: {row} (fastmae {' '.join(argv)})")
            a = parser.parse_args(argv)
            if command == "knn":
                acc = downstream.knn(a, datasets=digits)["test_acc1"]
            else:
                acc = getattr(downstream, command)(a, datasets=digits).test["max_acc1"]  # the best epoch
            table.setdefault(row, {})[init] = acc
    md = write_table(table, out, args)
    print(md)
    return table


def write_table(table: dict, out: str, args) -> str:
    """accuracy.md and accuracy.png in ``out``; returns the Markdown."""
    inits = [i for i in ("pre-trained", "MaskAlign student", "random init") if any(i in r for r in table.values())]
    student = ", a MaskAlign student it taught for as many epochs" if "MaskAlign student" in inits else ""
    lines = [f"Top-1 accuracy (%) on the 360 validation digits: {MODEL}'s encoder pre-trained for "
             f"{args.pretrain_epochs} epochs{student} vs a random initialisation; linear probing and fine-tuning "
             f"{args.epochs} epochs, best epoch.", "",
             "| evaluation | " + " | ".join(inits) + " |", "|---|" + "---:|" * len(inits)]
    for row, accs in table.items():
        lines.append(f"| {row} | " + " | ".join(f"{accs.get(i, float('nan')):.1f}" for i in inits) + " |")
    md = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "accuracy.md"), "w") as f:
        f.write(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return md
    rows = list(table)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.76 / len(inits)
    for j, init in enumerate(inits):
        vals = [table[r].get(init, 0.0) for r in rows]
        bars = ax.barh([i + (j - (len(inits) - 1) / 2) * width for i in range(len(rows))], vals, height=width,
                       label=init)
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlim(0, 125)  # room for the legend right of the bars
    ax.set_xlabel("top-1 accuracy (%), validation digits")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{ENCODER}: MAE pre-training ({args.pretrain_epochs} epochs) vs random initialisation", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)
    plt.close(fig)
    return md
