"""Builds the optional compiled extension ``mimkernels._C`` from csrc/ when csrc/ holds sources.

Set MIMKERNELS_BUILD_EXT=0 to skip it. Everything else lives in pyproject.toml.
"""
import glob
import os

from setuptools import setup

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
ext_modules, cmdclass = [], {}
if sources and os.environ.get("MIMKERNELS_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    has_cuda = any(s.endswith(".cu") for s in sources)
    extension = CUDAExtension if has_cuda else CppExtension
    ext_modules = [extension("mimkernels._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
