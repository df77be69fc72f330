"""Build script: the package is pure Python plus an optional CUDA extension.

The extension (``csrc/`` -> ``fisher_kernels/_cuda_kernels``) is built when torch sees a CUDA
device or ``FISHER_KERNELS_BUILD_CUDA=1`` is set; otherwise nothing is compiled and the Triton
and PyTorch backends serve. Building needs torch at build time, so install with
``pip install --no-build-isolation -e .`` when you want the extension.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda() -> bool:
    if os.environ.get("FISHER_KERNELS_BUILD_CUDA") == "1":
        return True
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class NvccBuildExt(build_ext):
    """Compiles the CUDA extension with nvcc (torch's helper refuses CUDA sources on CPU builds)."""

    def build_extension(self, ext):
        spec = importlib.util.spec_from_file_location("_build_cuda", ROOT / "fisher_kernels" / "_build_cuda.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        target = Path(self.get_ext_fullpath(ext.name))
        built = module.build(Path(self.build_temp) / "cuda", verbose=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(built), str(target))


ext_modules = [Extension("fisher_kernels._cuda_kernels", sources=[])] if _want_cuda() else []
setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt} if ext_modules else {})
