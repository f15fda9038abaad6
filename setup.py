"""Builds fastmae with its C++ CPU extension ``fastmae._C`` (from csrc/, with ninja).

Environment:
- ``FASTMAE_NO_EXTENSION=1``: skip the extension (fastmae then runs CPU ops on torch math);
- ``MAX_JOBS``: parallel compile jobs (honoured by torch's BuildExtension).
Install with ``pip install --no-build-isolation .`` so the extension is built against the torch
that will load it.

The Triton kernels (``kernels/``) and the benchmark suites (``bench/``) live at the top of the
repository and are installed as ``fastmae.kernels`` and ``fastmae.bench``.
"""
import glob
import os
import sys

# Nothing here imports from the checkout. Its folder on sys.path would let the top-level
# ``kernels/`` shadow Hugging Face's ``kernels`` package, whose setuptools entry point
# (``kernels._internals``, loaded while writing egg-info) then fails to import.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from setuptools import setup  # noqa: E402

ext_modules, cmdclass = [], {}
if os.environ.get("FASTMAE_NO_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    cxx_flags = ["-O3", "-std=c++20"]  # torch >= 2.10 headers need C++20
    link_flags = []
    if "OpenMP" in torch.__config__.parallel_info():  # at::parallel_for inlines OpenMP pragmas
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    ext_modules.append(
        CppExtension(
            "fastmae._C",
            sorted(glob.glob("csrc/*.cpp")),
            depends=sorted(glob.glob("csrc/*.h")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=["fastmae", "fastmae.ops", "fastmae.kernels", "fastmae.bench"],
    package_dir={"fastmae": "fastmae", "fastmae.kernels": "kernels", "fastmae.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
