"""Builds the optional compiled extension ``mimkernels._C`` from csrc/ (everything else is in pyproject.toml).

CPU ops always; CUDA ops too when this torch is a CUDA build and a CUDA toolkit (nvcc) is found. Without
a visible GPU the CUDA code is compiled for sm_80 and sm_90, plus sm_90 PTX that newer GPUs compile when it loads
(TORCH_CUDA_ARCH_LIST overrides; on a GPU outside the list the ops run on another backend). The CUDA
headers that torch's headers need and the toolkit may lack (cusparse.h, ...) come from the pip ``nvidia``
wheels torch depends on, searched after the toolkit's own (those match its nvcc).

MIMKERNELS_BUILD_EXT: unset, a failed build of the extension (say, an nvcc of another CUDA major version than
torch's) prints why and installs the package without it, which works (Triton kernels on GPUs, torch on CPUs);
``1`` makes that failure stop the install (CI sets it); ``0`` does not build the extension.
"""
import glob
import importlib.util
import os

from setuptools import setup

# three states (unset: try, 1: must, 0: skip); another value, say "true", would have been read as unset
BUILD_EXT = os.environ.get("MIMKERNELS_BUILD_EXT", "").strip()
if BUILD_EXT not in ("", "0", "1"):
    raise SystemExit(f"MIMKERNELS_BUILD_EXT must be 1 (the extension must build), 0 (skip it) or unset (try it), "
                     f"got {BUILD_EXT!r}")


def _nvidia_wheel_includes():
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({path for root in roots for path in glob.glob(os.path.join(root, "*", "include"))})


def _point_at_cuda_toolkit():
    """torch infers CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc) would make
    it /usr/local, whose lib/ lacks libcudart. Prefer the standard toolkit root when CUDA_HOME is unset."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources or BUILD_EXT == "0":
        return [], {}
    _point_at_cuda_toolkit()
    import torch
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        if not torch.cuda.is_available():
            # A100 and H100 code (8.0 runs on every 8.x GPU), and PTX for what comes after Hopper: an install on a
            # login node without a GPU must still run on the cluster's B200s
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        # the toolkit's own headers first: they match its nvcc (CCCL refuses to compile with the runtime headers
        # of another CUDA release, e.g. torch 2.15's 13.2 wheels beside a 13.0 nvcc); the wheels fill its gaps
        include_dirs = [os.path.join(cpp_extension.CUDA_HOME, "include")] + _nvidia_wheel_includes()
        extension = cpp_extension.CUDAExtension(
            "mimkernels._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    else:
        extension = cpp_extension.CppExtension("mimkernels._C", cpp_sources, extra_compile_args={"cxx": ["-O3"]})
    return [extension], {"build_ext": _optional(cpp_extension.BuildExtension)}


def _optional(build_ext):
    class BuildOptionalExtension(build_ext):
        def build_extensions(self):  # torch's checks (compiler, CUDA version) and the compiles: one failure
            try:
                super().build_extensions()
            except Exception as error:
                if BUILD_EXT == "1":
                    raise
                print(f"WARNING: mimkernels is installed without its compiled extension: {error}\n"
                      "Everything works without it (Triton kernels on GPUs, torch on CPUs); the build log above says "
                      "why it failed. MIMKERNELS_BUILD_EXT=1 makes this an error, =0 skips the build.")
                self.extensions = []  # nothing built: nothing to copy into the source tree or the wheel

    return BuildOptionalExtension


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
