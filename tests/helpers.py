"""Helpers shared by tests and benchmarks (importable: tests/ is on pytest's pythonpath)."""
import os

import pytest
import torch

from fastmae.ops import _backend

# Outputs of the official facebookresearch/mae code (shared/golden/README.md gives the format);
# FASTMAE_GOLDEN overrides where the file lies.
GOLDEN = os.environ.get("FASTMAE_GOLDEN") or os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "golden", "official_mae_small.pt")


def load_golden():
    """The golden file, or a failure that says where it was looked for (never a silent skip)."""
    if not os.path.exists(GOLDEN):
        pytest.fail(f"golden outputs not found at {os.path.abspath(GOLDEN)}; set FASTMAE_GOLDEN")
    return torch.load(GOLDEN, weights_only=True)


def available_backends():
    """Backends that can run on CPU tensors here: torch always, cpp when built, triton under the
    interpreter when triton is installed."""
    names = ["torch"]
    if _backend.has_extension():
        names.append("cpp")
    if _backend.has_triton() and _backend.triton_interpret():
        names.append("triton")
    return names


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
