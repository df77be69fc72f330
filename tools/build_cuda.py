"""Developer tool: build the CUDA extension with nvcc directly, against a CPU build of torch.

An install with a CUDA build of torch compiles ``csrc/`` through ``setup.py``'s ``CUDAExtension``.
torch's ``BuildExtension`` refuses CUDA sources when torch itself is a CPU build, yet the kernels
only need ``torch/extension.h`` and ``cuda_runtime.h``: this tool compiles ``csrc/*.cu`` with nvcc
against torch's headers and links the result against torch and cudart, so that the sources keep
compiling on machines without a GPU (the tests call it, and ``tests/sass.py`` inspects its SASS).
``setup.py`` uses it only when asked (``FISHER_KERNELS_BUILD_CUDA=1`` with a CPU torch);
``benchmarks/gpu_check.sh`` uses it to build in place on a lent GPU machine.

    python tools/build_cuda.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

EXTENSION_NAME = "_cuda_kernels"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
PACKAGE = Path(__file__).resolve().parent.parent / "fisher_kernels"


def cuda_home() -> Path:
    """The CUDA toolkit: ``$CUDA_HOME``, else the one holding ``nvcc`` on PATH."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    if nvcc is None:
        raise RuntimeError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    resolved = Path(os.path.realpath(nvcc))
    if resolved.parent.name == "bin" and (resolved.parent.parent / "include" / "cuda_runtime.h").exists():
        return resolved.parent.parent
    for candidate in (Path("/usr/local/cuda"),):
        if (candidate / "include" / "cuda_runtime.h").exists():
            return candidate
    raise RuntimeError(f"cannot locate the CUDA toolkit of {nvcc}; set CUDA_HOME")


def _cuda_lib_dir(home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (home / sub / "libcudart.so").exists():
            return home / sub
    raise RuntimeError(f"libcudart.so not found under {home}")


def _archs(archs: str | None = None) -> list[str]:
    archs = (archs or os.environ.get("FISHER_KERNELS_CUDA_ARCHS", "80;90")).replace(",", ";").split(";")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a.strip()]


def build(output_dir: str | Path, verbose: bool = False, archs: str | None = None) -> Path:
    """Compile ``csrc/`` into ``output_dir/_cuda_kernels<suffix>``: the kernels with nvcc, the
    bindings with the host compiler, linked against torch and cudart. ``archs``: compute
    capabilities like ``"80;90"`` (default ``$FISHER_KERNELS_CUDA_ARCHS`` or ``"80;90"``)."""
    import torch
    from torch.utils import cpp_extension

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    home = cuda_home()
    nvcc = home / "bin" / "nvcc"
    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    kernels_obj, bindings_obj = output_dir / "statistics_kernels.o", output_dir / "bindings.o"
    cxx = os.environ.get("CXX", "g++")
    # the kernels: nvcc, CUDA headers only
    kernels_cmd = [
        str(nvcc), "-c", str(CSRC / "statistics_kernels.cu"), "-o", str(kernels_obj), "-O3", "-std=c++17",
        "-Xcompiler", "-fPIC", f"-I{CSRC}", *_archs(archs),
    ]
    # the bindings: host compiler, torch and CUDA runtime headers
    bindings_cmd = [
        cxx, "-c", str(CSRC / "bindings.cpp"), "-o", str(bindings_obj), "-O2", "-std=c++17", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, f"-I{home / 'include'}",
    ]
    target = output_dir / (EXTENSION_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    lib_dir = _cuda_lib_dir(home)
    link_cmd = [
        cxx, "-shared", str(kernels_obj), str(bindings_obj), "-o", str(target),
        f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
        f"-L{lib_dir}", "-lcudart", f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{lib_dir}",
    ]
    for cmd in (kernels_cmd, bindings_cmd, link_cmd):
        if verbose:
            print(" ".join(cmd), flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    return target


if __name__ == "__main__":
    out = build(sys.argv[1] if len(sys.argv) > 1 else PACKAGE, verbose=True)
    print(out)
