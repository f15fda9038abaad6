"""Ahead-of-time GPU compilation of every Triton kernel, without a GPU.

Runs ``bench/triton_aot.py`` (every launch configuration of every kernel, for sm_80 and sm_90,
with the 16-byte pointer alignment a real launch specialises) in a subprocess: this test process
runs the kernels under ``TRITON_INTERPRET=1``, where they cannot be compiled. Asserts that every
``@triton.jit`` kernel of ``fastmae.kernels`` is covered for both targets, that nothing spills
(cuobjdump's LOCAL is 0), and that each configuration's contiguous paths reach the vector width
it claims (16 bytes = 128-bit ``ld/st.global.v4.b32`` where ``VEC`` elements make 16 bytes).
Compiled kernels are cached by triton (``~/.triton/cache``), so reruns are quick.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "triton_aot.py")
MODULES = ("gather_mask", "unshuffle_scatter", "norm_mse_loss", "resized_crop")
CCS = (80, 90)


def _nvidia_backend_error():
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means no AOT here
        return f"triton's NVIDIA backend is not importable: {type(e).__name__}: {e}"
    return None


pytestmark = [
    # minutes on two cores when triton's cache is cold: the full run's, not the quick tier's
    pytest.mark.slow,
    pytest.mark.skipif(_nvidia_backend_error() is not None, reason=str(_nvidia_backend_error())),
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SCRIPT, "--summary", "--jobs", "2", "--json", str(out),
                           "--cc", *map(str, CCS)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert out.exists(), f"AOT compilation failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    return json.loads(out.read_text())


def _kernel_names(module):
    """Names of the @triton.jit kernels defined in fastmae.kernels.<module> (helpers excluded)."""
    mod = importlib.import_module(f"fastmae.kernels.{module}")
    return {name for name, obj in vars(mod).items() if name.endswith("_kernel") and hasattr(obj, "fn")}


def test_every_kernel_compiles_for_sm80_and_sm90(records):
    compiled = {(r["kernel"], r["cc"]) for r in records}
    for module in MODULES:
        names = _kernel_names(module)
        assert names, f"no kernels found in fastmae.kernels.{module}"
        for name in names:
            for cc in CCS:
                assert (name, cc) in compiled, f"{name} was not compiled for sm_{cc}"


def test_no_spills(records):
    spilling = [f"{r['config']} sm_{r['cc']}: LOCAL {r['local']} B" for r in records if r["local"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_contiguous_paths_are_vectorised(records):
    missing = [f"{r['config']} sm_{r['cc']}: widest load {r['max_load_bytes']} B / store {r['max_store_bytes']} B, "
               f"needs {r['expect_load_bytes']} / {r['expect_store_bytes']}"
               for r in records if r["max_load_bytes"] < r["expect_load_bytes"]
               or r["max_store_bytes"] < r["expect_store_bytes"]]
    assert not missing, "not vectorised as the layout allows:\n" + "\n".join(missing)
    # the main configurations (full 16-byte VEC) exist for every kernel that moves tensor rows
    full = {r["kernel"] for r in records if r["expect_load_bytes"] == 16 and r["max_load_bytes"] == 16}
    for name in ("_gather_mask_fwd_kernel", "_gather_mask_bwd_kernel", "_unshuffle_scatter_fwd_kernel",
                 "_unshuffle_scatter_bwd_kernel", "_norm_mse_loss_fwd_kernel", "_norm_mse_loss_bwd_kernel"):
        assert name in full, f"{name} has no configuration with 128-bit global loads"
