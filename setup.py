"""Builds fastmae with its C++ CPU extension ``fastmae._C`` (from csrc/, with ninja).

Environment:
- ``FASTMAE_NO_EXTENSION=1``: skip the extension (fastmae then runs CPU ops on torch math);
- ``MAX_JOBS``: parallel compile jobs (honoured by torch's BuildExtension).
Install with ``pip install --no-build-isolation .`` so the extension is built against the torch
that will load it.
"""
import glob
import os

from setuptools import setup

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
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    packages=["fastmae", "fastmae.ops", "fastmae.kernels"],
    package_dir={"fastmae": "fastmae", "fastmae.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
