"""The compiled CUDA extension (``csrc/``), with the CUDA stream passed in from Python.

Each call passes the current stream *of the accumulator's device*; the C++ side makes that
device current for the launch (and restores the caller's), so tensors on ``cuda:1`` work.

The extension is built by ``setup.py`` (``CUDAExtension`` with a CUDA build of torch; ``tools/build_cuda.py`` when
``FISHER_KERNELS_BUILD_CUDA=1`` with a CPU torch). Its kernels take raw pointers, sizes, strides
and the stream; this module checks arguments and supplies those.
"""

from __future__ import annotations

from importlib import import_module
from types import SimpleNamespace

import torch

EXTENSION = "fisher_kernels._cuda_kernels"


def load() -> SimpleNamespace:
    """Import the extension; raises when it is not built or no CUDA device is present."""
    try:
        _cuda_kernels = import_module(EXTENSION)
    except ModuleNotFoundError:
        raise ImportError(f"the CUDA extension {EXTENSION} is not built (built by setup.py when torch sees a GPU, "
                          "or with FISHER_KERNELS_BUILD_CUDA=1)") from None

    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA extension is built but no CUDA device is available")
    return SimpleNamespace(
        masked_syrk_=lambda acc, x, mask: _gram(_cuda_kernels, acc, x, x, mask, True),
        masked_outer_=lambda acc, g, x, mask: _gram(_cuda_kernels, acc, g, x, mask, False),
        masked_column_sumsq_=lambda acc, x, mask: _column_sumsq(_cuda_kernels, acc, x, mask),
        masked_projected_energy_=lambda acc, x, basis, mask: _projected_energy(_cuda_kernels, acc, x, basis, mask),
    )


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _mask_arg(mask, like):
    return None if mask is None else mask.to(device=like.device, dtype=torch.float32).contiguous()


def _gram(ext, acc, a, b, mask, symmetric):
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if a.shape[0] == 0:
        return acc
    ext.masked_gram(acc, a, b, _mask_arg(mask, a), symmetric, _stream(acc.device))
    return acc


def _column_sumsq(ext, acc, x, mask):
    if x.shape[0] == 0:
        return acc
    ext.masked_column_sumsq(acc, x, _mask_arg(mask, x), _stream(acc.device))
    return acc


def _projected_energy(ext, acc, x, basis, mask):
    if x.shape[0] == 0:
        return acc
    ext.masked_projected_energy(acc, x, basis.to(torch.float32).contiguous(), _mask_arg(mask, x), _stream(acc.device))
    return acc
