"""The CUDA sources must compile with nvcc, link against torch and cudart, and import, on a
machine without a GPU too (their kernels run in test_ops.py where a GPU is present)."""

import importlib.util

import pytest
import torch

from fisher_kernels import _build_cuda


@pytest.fixture(scope="module")
def extension(tmp_path_factory):
    path = _build_cuda.build(tmp_path_factory.mktemp("cuda_build"))
    spec = importlib.util.spec_from_file_location(_build_cuda.EXTENSION_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_extension_compiles_links_and_imports(extension):
    for name in ("masked_gram", "masked_column_sumsq", "masked_projected_energy"):
        assert callable(getattr(extension, name))


def test_cuda_extension_rejects_cpu_tensors_with_a_clear_error(extension):
    with pytest.raises(RuntimeError, match="accumulator must be a CUDA tensor"):
        extension.masked_gram(torch.zeros(2, 2), torch.zeros(3, 2), torch.zeros(3, 2), None, True, 0)
    with pytest.raises(RuntimeError, match="accumulator must be a CUDA tensor"):
        extension.masked_column_sumsq(torch.zeros(2), torch.zeros(3, 2), None, 0)
