"""Shared test setup.

Without a CUDA device, TRITON_INTERPRET=1 is set before anything imports fastmae.kernels, so the
Triton kernels run on CPU tensors (that is how they are tested without a GPU). With one, the
interpreter is not forced: the Triton kernels compile for the GPU and tests/test_cuda.py runs them
(the interpreter's CPU-tensor tests then skip; set TRITON_INTERPRET=1 to run those instead).
"""
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():  # counts devices, no context
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m pytest` puts the checkout on sys.path, where its kernels/ folder (installed as
# fastmae.kernels) would shadow the `kernels` package that transformers imports.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != ROOT]

from fastmae import config  # noqa: E402
from fastmae.ops import _backend  # noqa: E402

from helpers import available_backends  # noqa: E402


def _differing_sources(installed: str) -> list[str]:
    """The checkout's Python files (fastmae/, kernels/ through its link) whose installed copy in
    ``installed`` is missing or differs. (The C++ extension's sources are not compared.)"""
    differ = []
    source = os.path.join(ROOT, "fastmae")
    for folder, _, files in os.walk(source, followlinks=True):
        for name in files:
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, name), source)
            copy = os.path.join(installed, rel)
            if not os.path.isfile(copy) or _read(copy) != _read(os.path.join(folder, name)):
                differ.append(rel)
    return sorted(differ)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pytest_configure(config):
    """The tests (and the subprocesses they start, such as the fastmae console script) must run
    this checkout's code: a bare ``pytest`` imports the installed fastmae, which may be an older
    install than the checkout."""
    import fastmae

    installed = os.path.dirname(os.path.realpath(fastmae.__file__))
    if installed == os.path.realpath(os.path.join(ROOT, "fastmae")):
        return
    differ = _differing_sources(installed)
    if differ:
        pytest.exit(f"the fastmae these tests import ({installed}) is not this checkout's code: "
                    f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''} differ. Reinstall it "
                    f"(pip install --no-build-isolation .) or install the checkout editable (pip install "
                    f"--no-build-isolation -e .)", returncode=4)


def pytest_report_header(config):
    err = _backend.extension_error()
    import fastmae

    return [f"fastmae from {os.path.dirname(fastmae.__file__)}; backends on CPU: "
            f"{', '.join(available_backends())}" + ("" if err is None else f" (C++ extension unavailable: {err})")]


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request):
    """Run the test once per op backend, forced with fastmae.config.override (FASTMAE_BACKEND)."""
    name = request.param
    if name not in available_backends():
        if name == "cpp" and config.settings().require_extension:
            pytest.fail(f"FASTMAE_REQUIRE_EXTENSION=1 but the C++ extension is unavailable: "
                        f"{_backend.extension_error()}")
        pytest.skip(f"backend {name} unavailable here")
    with config.override(backend=name):
        yield name


@pytest.fixture
def nan_memory():
    """Every output is allocated on NaN: with deterministic algorithms on, ``torch.empty`` (and
    ``at::empty`` in the C++ kernels, the same operator) fills new memory with NaN
    (``torch.utils.deterministic.fill_uninitialized_memory``), so an element a kernel forgets to
    write stays NaN and fails the comparison."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(3).isnan().all() and torch.ops.aten.empty.memory_format([3]).isnan().all()
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.utils.deterministic.fill_uninitialized_memory = state[2]
