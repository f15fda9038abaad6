"""What a fused op's full CPU call spends above its C++ kernels, and its forward and backward apart.

At ViT-B shapes (bench/test_bench_ops.py's inputs), with a 64 MB copy before every timed call
(cold caches, as in the suite) and the tuned allocator of bench/NOTES.md:

- ``layers``: forward + backward through the public function and autograd, against the bare
  ``torch.ops.fastmae_C`` kernels with the gradients set by hand, alternating every 4 calls;
- ``split``: an op's forward kernel and backward kernel timed apart, beside the copy (any op;
  ``layers`` takes gather_mask or unshuffle_scatter, ``cold`` unshuffle_scatter);
- ``cold``: what the Python in front of the kernels costs when its caches are cold: the eager
  route test (``_backend.eager_cpp``), the public forward and the C++ route op's forward, each
  timed once after the eager reference's forward + backward and a 64 MB copy, in turn;
- ``entry``: what a ``backward()`` call costs by itself, on a graph of 1 or 5 trivial nodes, cold
  (after the op's eager reference and a 64 MB copy) and hot: every "full" call of the suite
  makes one, where a training step makes one for all its ops.

Run::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python bench/cpu_op_layers.py layers unshuffle_scatter bf16
    ... python bench/cpu_op_layers.py split unshuffle_scatter|gather_mask|norm_mse_loss bf16 [--no-pos]
    ... python bench/cpu_op_layers.py cold unshuffle_scatter bf16
    ... python bench/cpu_op_layers.py entry gather_mask|unshuffle_scatter|norm_mse_loss bf16

It prints the extension it loaded: a figure from an installed copy other than the checkout's
measures other code.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_bench_ops as tb  # noqa: E402

import fastmae._C  # noqa: E402
from fastmae.ops import _backend  # noqa: E402

SETS = 12  # input sets in turn, > 2x the LLC together
C = torch.ops.fastmae_C


def _flush(bufs, i):
    src, dst = bufs[i % len(bufs)]
    dst.copy_(src)


def _bare(op, leaves, consts, grad):
    """The two C++ kernels of ``op``, no autograd; gradients assigned as autograd would."""
    if op == "unshuffle_scatter":
        x, tok, pos = leaves
        (ids,) = consts
        out = C.unshuffle_scatter_fwd(x.detach(), tok.detach().reshape(-1), ids, pos.detach().reshape(-1, x.shape[-1]))
        dx, dmask, dpos = C.unshuffle_scatter_bwd(grad, ids, x.shape[1] - 1, True)
        x.grad, tok.grad, pos.grad = dx, dmask.view(tok.shape), dpos.view(pos.shape)
    elif op == "gather_mask":
        (imgs,) = leaves
        (ids,) = consts
        out = C.gather_mask_fwd(imgs.detach(), ids, tb.P_SIZE)
        imgs.grad = C.gather_mask_bwd(grad, ids, tb.P_SIZE, imgs.shape[-2], imgs.shape[-1])
    else:
        raise SystemExit("layers: gather_mask or unshuffle_scatter")
    return out


def layers(op, dtype, calls):
    sets = [tb._setup(op, dtype, True, seed=s) for s in range(SETS)]
    fast_fn, _ = tb._functions(op)
    bufs = [(torch.randn(16 * 2**20), torch.empty(16 * 2**20)) for _ in range(2)]

    def public(leaves, consts, grad):
        fast_fn(*leaves, *consts).backward(grad)

    times = {"public": [], "bare": []}
    for i in range(calls):
        kind = "public" if (i // 4) % 2 == 0 else "bare"
        leaves, consts, grad = sets[i % SETS][:3]
        for t in leaves:
            t.grad = None
        _flush(bufs, i)
        t0 = time.perf_counter()
        public(leaves, consts, grad) if kind == "public" else _bare(op, leaves, consts, grad)
        if i >= calls // 10:
            times[kind].append(time.perf_counter() - t0)
    for kind, ts in times.items():
        print(f"{op} {dtype} full, {kind}: median {1e3 * statistics.median(ts):.3f} ms")


def _kernels(op, dtype, need_pos):
    """(forward, backward, minimal bytes of each) of ``op``'s two C++ kernels; each kernel takes
    one input set of ``tb._setup``."""
    es = torch.tensor([], dtype=dtype).element_size()
    if op == "unshuffle_scatter":
        def fwd(s):
            (x, tok, pos), (ids,), _ = s[:3]
            return C.unshuffle_scatter_fwd(x.detach(), tok.detach().reshape(-1), ids, pos.detach().reshape(-1, x.shape[-1]))

        def bwd(s):
            (x, _, _), (ids,), grad = s[:3]
            return C.unshuffle_scatter_bwd(grad, ids, x.shape[1] - 1, need_pos)

        nbytes = (tb.N * (tb.K + 1) + tb.N * (tb.L + 1)) * tb.D_DEC * es  # x and out (grad and dx)
        return fwd, bwd, nbytes, nbytes
    if op == "gather_mask":
        def fwd(s):
            (imgs,), (ids,), _ = s[:3]
            return C.gather_mask_fwd(imgs.detach(), ids, tb.P_SIZE)

        def bwd(s):
            _, (ids,), grad = s[:3]
            return C.gather_mask_bwd(grad, ids, tb.P_SIZE, tb.IMG, tb.IMG)

        kept, img = tb.N * tb.K * tb.PATCH * es, tb.N * tb.C * tb.IMG * tb.IMG * es
        return fwd, bwd, 2 * kept, kept + img
    one = torch.ones(())

    def fwd(s):
        (pred,), (imgs, mask), _ = s[:3]
        return C.norm_mse_loss_fwd(pred.detach(), imgs, mask, None, tb.P_SIZE, True, 1e-6)

    def bwd(s):
        (pred,), (imgs, mask), _ = s[:3]
        return C.norm_mse_loss_bwd(one, pred.detach(), imgs, mask, None, tb.P_SIZE, True, 1e-6)

    nbytes = tb.N * tb.L * tb.PATCH * es  # pred (= imgs, = dpred)
    return fwd, bwd, 2 * nbytes, 3 * nbytes


def split(op, dtype, calls, need_pos=True):
    sets = [tb._setup(op, dtype, True, seed=s) for s in range(SETS)]
    fwd_fn, bwd_fn, fwd_bytes, bwd_bytes = _kernels(op, dtype, need_pos)
    bufs = [(torch.randn(16 * 2**20), torch.empty(16 * 2**20)) for _ in range(2)]
    fwd, bwd, copy = [], [], []
    for i in range(calls):
        _flush(bufs, i)
        t0 = time.perf_counter()
        out = fwd_fn(sets[i % SETS])
        t1 = time.perf_counter()
        _flush(bufs, i + 1)
        t2 = time.perf_counter()
        res = bwd_fn(sets[(i + 5) % SETS])
        t3 = time.perf_counter()
        _flush(bufs, i)
        t4 = time.perf_counter()
        if i >= calls // 10:
            fwd.append(t1 - t0)
            bwd.append(t3 - t2)
            copy.append(t4 - t3)
        del out, res
    f, b, c = (statistics.median(v) for v in (fwd, bwd, copy))
    print(f"{op} {dtype}: forward {1e3 * f:.3f} ms ({fwd_bytes / f / 1e9:.1f} GB/s), backward {1e3 * b:.3f} ms "
          f"({bwd_bytes / b / 1e9:.1f} GB/s), 64 MB copy {2 * 64 * 2**20 / c / 1e9:.1f} GB/s")


def cold(op, dtype, calls):
    if op != "unshuffle_scatter":
        raise SystemExit("cold: unshuffle_scatter only")
    sets = [tb._setup(op, dtype, True, seed=s) for s in range(4)]
    fast_fn, ref_fn = tb._functions(op)
    bufs = [(torch.randn(16 * 2**20), torch.empty(16 * 2**20)) for _ in range(2)]
    (x, tok, pos), (ids,), _ = sets[0][:3]
    pieces = {
        "nothing": lambda: None,
        "eager_cpp": lambda: _backend.eager_cpp(x, tok, ids, pos),
        "public forward": lambda: fast_fn(x, tok, pos, ids),
        "route op forward": lambda: C.unshuffle_scatter(x, tok, ids, pos),
    }
    times = {k: [] for k in pieces}
    for i in range(calls):
        name = list(pieces)[i % len(pieces)]
        leaves, consts, grad = sets[1 + i % 3][:3]
        for t in leaves:
            t.grad = None
        ref_fn(*leaves, *consts).backward(grad)  # other code runs between two calls, as in a step
        _flush(bufs, i)
        t0 = time.perf_counter()
        out = pieces[name]()
        times[name].append(time.perf_counter() - t0)
        del out
    for name, ts in times.items():
        print(f"{op} {dtype} cold, {name}: median {1e6 * statistics.median(ts[len(ts) // 10:]):.1f} us")


def entry(op, dtype, calls):
    """What one ``backward()`` call costs by itself: a graph of 1 or 5 trivial nodes (``x * 2`` on 8
    values), timed cold (after the eager reference's forward + backward and a 64 MB copy, as a
    fused op's backward in the suite) and hot (right after the same call)."""
    sets = [tb._setup(op, dtype, True, seed=s) for s in range(4)]
    _, ref_fn = tb._functions(op)
    bufs = [(torch.randn(16 * 2**20), torch.empty(16 * 2**20)) for _ in range(2)]
    x, g = torch.randn(8, requires_grad=True), torch.ones(8)
    times = {(n, state): [] for n in (1, 5) for state in ("cold", "hot")}
    for i in range(calls):
        nodes = (1, 5)[(i // 4) % 2]
        leaves, consts, grad = sets[i % 4][:3]
        for t in leaves:
            t.grad = None
        ref_fn(*leaves, *consts).backward(grad)
        _flush(bufs, i)
        for state in ("cold", "hot"):
            x.grad = None
            y = x * 2
            for _ in range(nodes - 1):
                y = y * 2
            t0 = time.perf_counter()
            y.backward(g)
            if i >= calls // 10:
                times[(nodes, state)].append(time.perf_counter() - t0)
    for (nodes, state), ts in times.items():
        print(f"backward() of {nodes} trivial node(s), {state}: median {1e6 * statistics.median(ts):.1f} us")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("layers", "split", "cold", "entry"))
    parser.add_argument("op", choices=("gather_mask", "unshuffle_scatter", "norm_mse_loss"))
    parser.add_argument("dtype", choices=("fp32", "bf16"))
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--no-pos", dest="need_pos", action="store_false",
                        help="split: the backward without the position gradient (the model's case: its table is frozen)")
    args = parser.parse_args()
    if not _backend.has_extension():
        raise SystemExit(f"the C++ extension is unavailable: {_backend.extension_error()}")
    os.environ["FASTMAE_BACKEND"] = "cpp"
    print(f"extension: {fastmae._C.__file__}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.what == "layers":
        layers(args.op, dtype, args.calls)
    elif args.what == "split":
        split(args.op, dtype, args.calls, args.need_pos)
    elif args.what == "entry":
        entry(args.op, dtype, args.calls)
    else:
        cold(args.op, dtype, args.calls)


if __name__ == "__main__":
    main()
