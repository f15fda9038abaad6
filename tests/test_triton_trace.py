"""Under torch.compile, a fused op on CUDA tensors is decomposed into its checks and Triton
launches (fastmae.ops._backend), so that inductor places the kernels in its compiled graph.

Checked without a GPU: AOTAutograd traces the six ops (three forwards, three backwards) on fake
CUDA tensors, in a subprocess without TRITON_INTERPRET (the interpreter bypasses wrap_triton), and
the traced graph must hold every kernel as a ``triton_kernel_wrapper_functional`` node and no
``fastmae::`` op. (On CPU tensors the op stays one opaque node: tests/test_compile.py.) Running
the compiled kernels needs a GPU: tests/test_cuda.py."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json, sys
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from fastmae import ops
gm_mod, us_mod, nm_mod = (sys.modules[f"fastmae.ops.{m}"] for m in ("gather_mask", "unshuffle_scatter", "norm_mse_loss"))
graphs = []

def capture(gm, inputs):
    graphs.append(gm)
    return gm

def f(imgs, ids_keep, x, tok, ids_restore, pos, pred, mask):
    a = ops.gather_mask(imgs, ids_keep, 8)
    b = ops.unshuffle_scatter(x, tok, ids_restore, pos)
    c = ops.norm_mse_loss(pred, imgs, mask, 8)
    da = gm_mod._gather_mask_backward_op(a, ids_keep, 8, 32, 32)
    dx, dtok, dpos = us_mod._unshuffle_scatter_backward_op(b, ids_restore, x.shape[1] - 1, True)
    dpred = nm_mod._norm_mse_loss_backward_op(c, pred, imgs, mask, None, 8, True, 1e-6, 1, False, None)
    return a, b, c, da, dx, dtok, dpos, dpred

with FakeTensorMode(allow_non_fake_inputs=True):
    dev, N, L, K, D = "cuda", 2, 16, 4, 32
    imgs = torch.randn(N, 3, 32, 32, device=dev, dtype=torch.bfloat16)
    ids_shuffle = torch.rand(N, L, device=dev).argsort(1)
    x = torch.randn(N, 1 + K, D, device=dev, dtype=torch.bfloat16)
    args = (imgs, ids_shuffle[:, :K], x, torch.randn(D, device=dev, dtype=torch.bfloat16), ids_shuffle.argsort(1),
            torch.randn(1 + L, D, device=dev, dtype=torch.bfloat16), torch.randn(N, L, 192, device=dev),
            torch.ones(N, L, device=dev))
    aot_function(f, fw_compiler=capture)(*args)
(gm,) = graphs
kernels = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in gm.graph.nodes
           if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
other = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "fastmae" in str(n.target)})
asserts = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and "_assert_async" in str(n.target)]
print(json.dumps({"kernels": kernels, "fastmae_ops": other, "asserts": asserts}))
'''


def test_cuda_ops_decompose_into_triton_kernels_under_compile(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMAE_BACKEND")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tmp_path)  # the installed fastmae, not the checkout's sources
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fastmae_ops"] == [], got
    assert got["kernels"] == [
        "_gather_mask_fwd_kernel", "_unshuffle_scatter_fwd_kernel", "_norm_mse_loss_fwd_kernel",
        "_norm_mse_loss_sum_kernel", "_gather_mask_bwd_kernel", "_unshuffle_scatter_bwd_kernel",
        "_unshuffle_scatter_dmask_kernel", "_norm_mse_loss_sum_kernel", "_norm_mse_loss_bwd_kernel",
    ], got
    # the value checks travel with the kernels, as device-side asserts
    assert "ids_keep repeats an index within a sample" in got["asserts"]
    assert "ids_restore repeats an index within a sample" in got["asserts"]
