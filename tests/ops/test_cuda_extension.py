"""The CUDA sources must compile with nvcc, link against torch and cudart, and import, on a
machine without a GPU too (their kernels run in test_ops.py where a GPU is present)."""

import importlib.util

import pytest
import torch

import build_cuda as _build_cuda
from sass import sass_instruction_counts


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_build")


@pytest.fixture(scope="module")
def extension(build_dir):
    path = _build_cuda.build(build_dir, archs="80;90")
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


def test_bf16_fp16_gram_kernels_use_tensor_cores_on_sm80_and_sm90(extension, build_dir):
    """The default build targets sm_80 and sm_90; in both, the bf16 and fp16 Gram kernels are
    made of HMMA (tensor-core) instructions, and the fp32 kernels of none."""
    counts = sass_instruction_counts(build_dir / "statistics_kernels.o", "HMMA")
    for arch in ("sm_80", "sm_90"):
        tensor_core = {k: n for (a, k), n in counts.items() if a == arch and "tensor_core" in k}
        assert len(tensor_core) == 2, (arch, sorted(k for a, k in counts if a == arch))  # __half, __nv_bfloat16
        assert all(n >= 8 for n in tensor_core.values()), tensor_core  # 2 × 2 fragments × 2 K-steps per chunk
        plain = {k: n for (a, k), n in counts.items() if a == arch and "tensor_core" not in k}
        assert plain and not any(plain.values())
