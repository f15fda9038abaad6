"""Shared test setup.

TRITON_INTERPRET=1 is set before anything imports fastmae.kernels, so the Triton kernels run on
CPU tensors (that is how they are tested without a GPU). Nothing here queries a device at import.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fastmae.ops import _backend  # noqa: E402

from helpers import available_backends  # noqa: E402


def pytest_report_header(config):
    err = _backend.extension_error()
    return [f"fastmae backends on CPU: {', '.join(available_backends())}"
            + ("" if err is None else f" (C++ extension unavailable: {err})")]


@pytest.fixture(params=["torch", "cpp", "triton"])
def backend(request, monkeypatch):
    """Run the test once per op backend, forcing it with FASTMAE_BACKEND."""
    name = request.param
    if name not in available_backends():
        if name == "cpp" and os.environ.get("FASTMAE_REQUIRE_EXTENSION") == "1":
            pytest.fail(f"FASTMAE_REQUIRE_EXTENSION=1 but the C++ extension is unavailable: "
                        f"{_backend.extension_error()}")
        pytest.skip(f"backend {name} unavailable here")
    monkeypatch.setenv("FASTMAE_BACKEND", name)
    return name
