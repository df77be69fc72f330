"""Build script: the package is pure Python plus an optional CUDA extension.

The extension (``csrc/`` -> ``fisher_kernels._cuda_kernels``) is built with torch's
``CUDAExtension``/``BuildExtension`` when torch is a CUDA build and a CUDA toolkit is found;
otherwise nothing is compiled and the Triton and PyTorch backends serve. Building needs torch at
build time, so install with ``pip install --no-build-isolation -e .`` when you want the extension.
``FISHER_KERNELS_BUILD_CUDA=1`` with a CPU build of torch compiles it anyway with nvcc directly
(``tools/build_cuda.py``, the developer tool that keeps the sources compiling without a GPU).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NAME = "fisher_kernels._cuda_kernels"
ARCHS = os.environ.get("FISHER_KERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")


def _torch():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, None
    return torch, cpp_extension


class NvccBuildExt(build_ext):
    """A CPU build of torch: the developer tool compiles the extension with nvcc."""

    def build_extension(self, ext):
        spec = importlib.util.spec_from_file_location("build_cuda", ROOT / "tools" / "build_cuda.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        target = Path(self.get_ext_fullpath(ext.name))
        built = module.build(Path(self.build_temp) / "cuda", verbose=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(built), str(target))


def extension():
    """``(ext_modules, cmdclass)`` for this machine."""
    torch, cpp_extension = _torch()
    if torch is None:
        return [], {}
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        sources = ["csrc/statistics_kernels.cu", "csrc/bindings.cpp"]
        nvcc = ["-O3", "-std=c++17"] + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS if a.strip()]
        ext = cpp_extension.CUDAExtension(NAME, sources, include_dirs=[str(ROOT / "csrc")],
                                          extra_compile_args={"cxx": ["-O2", "-std=c++17"], "nvcc": nvcc})
        return [ext], {"build_ext": cpp_extension.BuildExtension}
    if os.environ.get("FISHER_KERNELS_BUILD_CUDA") == "1":
        return [Extension(NAME, sources=[])], {"build_ext": NvccBuildExt}
    return [], {}


ext_modules, cmdclass = extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
