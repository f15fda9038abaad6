"""Helpers shared by tests and benchmarks (importable: tests/ is on pytest's pythonpath)."""
import os

import pytest
import torch

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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
