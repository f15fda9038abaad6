"""Helpers for the training and CLI tests: tiny image folders, tiny-run arguments, state comparison."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from fastmae import cli, data

# A tiny run: 0.1M-parameter model at 32 px (16 patches), CPU, fp32, no workers, no picture.
TINY = ["--model", "mae_vit_micro_patch8", "--input_size", "32", "--batch_size", "4", "--epochs", "2",
        "--warmup_epochs", "1", "--blr", "2e-2", "--num_workers", "0", "--device", "cpu",
        "--precision", "fp32", "--no-picture"]


def make_image_folder(root, n: int = 16, size=(40, 48), classes: int = 2, seed: int = 0) -> str:
    """Write ``n`` PNG crops of the embedded photographs as ``root/<class>/<i>.png``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [np.asarray(data.load_embedded_image(name)) for name in data.EMBEDDED_IMAGES[:6]]
    for i in range(n):
        arr = photos[i % len(photos)]
        y = int(rng.integers(0, arr.shape[0] - size[0]))
        x = int(rng.integers(0, arr.shape[1] - size[1]))
        folder = os.path.join(root, f"class{i % classes}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(arr[y:y + size[0], x:x + size[1]]).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def pretrain_args(out_dir, *extra):
    """The ``fastmae pretrain`` namespace for a tiny run writing to ``out_dir``."""
    argv = ["pretrain", *TINY, "--output_dir", str(out_dir), "--log_dir", str(out_dir), *map(str, extra)]
    return cli.build_parser().parse_args(argv)


def assert_states_equal(a: dict, b: dict, what: str = "state") -> None:
    """Bitwise equality of two (nested) state dicts."""
    assert a.keys() == b.keys(), f"{what}: keys differ"
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert_states_equal(x, y, f"{what}.{k}")
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{what}.{k} differs (max |diff| {(x.double() - y.double()).abs().max():.3g})"
        else:
            assert x == y, f"{what}.{k}: {x!r} != {y!r}"


def assert_trained_close(a: dict, b: dict, lr: float, steps: int, rtol=1e-5, atol=1e-6) -> None:
    """Two trained state dicts agree to fp32 rounding, except the attention key biases, whose true
    gradient is exactly zero (softmax ignores a shift shared by all keys): Adam turns their rounding
    noise into steps of up to ``lr`` each, so they are compared at that scale."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("attn.qkv.bias"):
            d = x.shape[0] // 3
            torch.testing.assert_close(x[d:2 * d], y[d:2 * d], rtol=0, atol=lr * steps, msg=k)
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=k)


_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from fastmae import cli, {module}
    real = {module}.{function}
    def dumping(args, **kw):
        res = real(args, **kw)
        torch.save(res.model.state_dict(), os.path.join(os.environ["DUMP"], f"rank{{os.environ['RANK']}}.pt"))
        return res
    {module}.{function} = dumping
    sys.exit(cli.main(sys.argv[1:]))
""")


def run_two_processes(tmp_path, module: str, function: str, argv):
    """``fastmae ARGV`` under ``torchrun --nproc_per_node=2`` (gloo), with ``fastmae.MODULE.FUNCTION``
    saving each rank's trained state_dict; returns (completed process, [rank 0's, rank 1's])."""
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT.format(module=module, function=function))
    env = dict(os.environ, DUMP=str(tmp_path), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *map(str, argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
