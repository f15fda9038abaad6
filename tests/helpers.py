"""Helpers shared by tests and benchmarks (importable: tests/ is on pytest's pythonpath).

- golden files of the official code (``load_golden``);
- which op backends run here (``available_backends``, ``require_cpp``), GPU-only marks;
- the tolerance rule of STYLE.md (``assert_close_to_truth``) and exact comparisons, both naming
  the worst element on failure;
- inputs of the fused-op tests (seeded generators, random masking, the op tests' tolerances).
"""
import os
import zlib

import pytest
import torch

from fastmae import config
from fastmae.ops import _backend

# Outputs of the official code (MAE, its fine-tuning ViT, VideoMAE, MaskAlign), kept in the
# repository; tests/data/README.md gives each file's layout.
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load_golden(name: str = "official_mae_small.pt"):
    """A golden file from tests/data, or a failure that says where it was looked for (never a skip)."""
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.fail(f"golden outputs not found at {path}")
    return torch.load(path, weights_only=True)


def available_backends():
    """Backends that can run on CPU tensors here: torch always, cpp when built, triton under the
    interpreter when triton is installed."""
    names = ["torch"]
    if _backend.has_extension():
        names.append("cpp")
    if _backend.has_triton() and _backend.triton_interpret():
        names.append("triton")
    return names


def require_cpp():
    """Skip a C++-only test where the extension is unavailable; fail instead when the settings
    require it (FASTMAE_REQUIRE_EXTENSION=1, as CI sets), so a broken build cannot pass as skips."""
    if not _backend.has_extension():
        if config.settings().require_extension:
            pytest.fail(f"FASTMAE_REQUIRE_EXTENSION=1 but the C++ extension is unavailable: "
                        f"{_backend.extension_error()}")
        pytest.skip(f"the C++ extension is unavailable: {_backend.extension_error()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ============================================================================ comparisons
def worst_element(got: torch.Tensor, want: torch.Tensor) -> str:
    """'worst element (i, j, ...): got g, want w' for the largest |got - want| (a NaN in ``got``
    counts as infinitely wrong)."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.numel() == 0:
        return "no elements"
    d = (got.double() - want.double()).abs().nan_to_num(nan=float("inf"))
    i = int(d.flatten().argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), got.shape)) if got.dim() else ()
    return f"worst element {idx}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}"


def assert_exact(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Bitwise the same values, dtype and shape (copies, gathers, scatters)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{name}: {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}")
    assert torch.equal(got.cpu(), want.cpu()), f"{name} differs; {worst_element(got, want)}"


def assert_close_to_truth(got: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, *, factor: float = 2.0,
                          atol: float = 0.0, norm: str = "max", rms_floor: float = 0.0,
                          baseline_tol: float | None = None, name: str = "") -> None:
    """The tolerance rule of STYLE.md (flash-attention's): ``got``'s error against ``truth`` (fp64
    or fp32 math) may be at most ``factor`` times the error of ``baseline`` (plain PyTorch at
    ``got``'s precision, on the same inputs) plus ``atol`` times the truth's magnitude:

        ||got - truth|| <= factor * ||baseline - truth|| + atol * scale

    ``norm="max"``: ``||.||`` is the largest absolute element and ``scale = max|truth|``;
    ``norm="l2"``: the Euclidean norm and ``scale = max(||truth||_2, rms_floor * sqrt(numel))`` (the
    floor makes a truth that is (near) zero compare absolutely, not relatively). ``atol`` is thus
    relative in both; with ``norm="l2"`` the rule reads ``rel_err(got) <= factor * rel_err(baseline)
    + atol``. ``baseline_tol``: the baseline itself must lie within ``baseline_tol * scale`` of the
    truth, or the rule would excuse a kernel sharing a bug with the baseline.

    ``got`` and ``baseline`` must have one dtype (the same precision) and the truth's shape; a NaN
    in ``got`` fails. A failure reports the worst element (index, got, want)."""
    if norm not in ("max", "l2"):
        raise ValueError(f"norm must be 'max' or 'l2', got {norm!r}")
    label = f"{name}: " if name else ""
    assert got.shape == truth.shape == baseline.shape, (
        f"{label}shapes: got {tuple(got.shape)}, truth {tuple(truth.shape)}, baseline {tuple(baseline.shape)}")
    assert got.dtype == baseline.dtype, f"{label}got is {got.dtype}, the baseline {baseline.dtype}: not one precision"
    got, truth, baseline = (t.detach().cpu().double() for t in (got, truth, baseline))
    if got.numel() == 0:
        return
    assert not got.isnan().any(), f"{label}holds NaN (an element left unwritten?); {worst_element(got, truth)}"

    def size(t):
        return t.abs().max().item() if norm == "max" else t.norm().item()

    err, base = size(got - truth), size(baseline - truth)
    scale = size(truth)
    if norm == "l2":
        scale = max(scale, rms_floor * truth.numel() ** 0.5)
    if baseline_tol is not None:
        assert base <= baseline_tol * scale, (
            f"{label}plain PyTorch is {base:.3g} off the truth ({norm} norm), more than {baseline_tol:g} x "
            f"{scale:.3g}: the baseline disagrees with the truth; {worst_element(baseline, truth)}")
    bound = factor * base + atol * scale
    assert err <= bound, (
        f"{label}error {err:.3g} > bound {bound:.3g} = {factor:g} x torch's error {base:.3g} + {atol:g} x "
        f"{scale:.3g} ({norm} norm); {worst_element(got, truth)}")


# ============================================================================ fused-op tests
OP_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# atol of the op tests, relative to the largest truth magnitude: summation-order noise at each precision.
OP_ATOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# The baseline itself must sit this close to the fp64 math (relative to its magnitude), or the
# 2x rule would excuse a backend that shares a bug with the torch composition.
OP_BASELINE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def assert_op_close(name: str, out: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor,
                    dtype: torch.dtype) -> None:
    """A fused op's output or gradient at ``dtype`` against its fp64 truth (max norm), with the op
    tests' atol and baseline check for that dtype."""
    assert_close_to_truth(out, truth, baseline, atol=OP_ATOL[dtype], baseline_tol=OP_BASELINE_RTOL[dtype],
                          name=f"{name} ({dtype})")


def case_id(case) -> str:
    return "x".join(map(str, case))


def seeded(request) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def randn(gen, *shape, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(requires_grad)


def random_masking(gen, N: int, L: int, K: int):
    """ids_shuffle, ids_keep, ids_restore and mask [N, L] (1 = removed) as MAE draws them."""
    ids_shuffle = torch.rand(N, L, generator=gen).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(N, L)
    mask[:, :K] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_shuffle, ids_shuffle[:, :K].contiguous(), ids_restore, mask


def skip_big_on_triton(backend: str, too_big: bool) -> None:
    if backend == "triton" and too_big:
        pytest.skip("large shape: too slow under the Triton interpreter (small shapes cover the kernel)")


def skip_triton_tracing(backend: str) -> None:
    if backend == "triton":
        pytest.skip("opcheck and torch.compile run the kernel on fake tensors, which the Triton "
                    "interpreter cannot; the Triton path is covered by the eager tests")


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(flag in flags for flag in ("avx512_bf16", "avx512vl", "avx512bw"))
