"""Every available statistics backend against the PyTorch reference (float64 ground truth).

On a machine without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` on CPU
tensors (set in conftest); the CUDA extension runs only where a GPU is present.
"""

import pytest
import torch

from fisher_kernels import backends
from fisher_kernels.ops import get_ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AVAILABLE = [name for name, info in backends().items() if info["available"] and name != "auto"]
# the CUDA extension runs only on a GPU; on CPU machines test_cuda_build.py compiles and links it
# "auto": on a GPU the per-op choice by probes (must be right on every shape); on CPU the reference
BACKENDS = ["torch", "triton", "cublas", "auto"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}  # inputs are exact in every dtype


def need(backend):
    if backend == "auto":
        return get_ops("auto", DEVICE)
    if backend == "cublas" and DEVICE == "cpu":  # its CPU path (widened GEMM); on a GPU, torch.mm(out_dtype=fp32)
        from fisher_kernels.ops import cublas
        return cublas
    if backend not in AVAILABLE:
        pytest.fail(f"backend {backend!r} unavailable: {backends()[backend]['reason']}")
    return get_ops(backend)


def data(T, d, dtype, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(dtype)
    mask = {"none": None, "random": torch.rand(T, generator=g) < 0.6, "all_masked": torch.zeros(T, dtype=torch.bool),
            "float": (torch.rand(T, generator=g) < 0.5).float()}[mask_kind]
    return x.to(DEVICE), None if mask is None else mask.to(DEVICE)


def ground_truth_gram(a, b, mask):
    a64, b64 = a.double().cpu(), b.double().cpu()
    if mask is not None:
        a64 = a64 * mask.double().cpu()[:, None]
    return a64.T @ b64


def close(actual, expected, dtype):
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    return (actual.double().cpu() - expected).abs().max().item() <= TOL[dtype] * scale * 10


SHAPES = [(0, 5), (1, 1), (77, 37), (300, 130), (65, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASKS = ["none", "random", "all_masked", "float"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_masked_syrk_matches_reference(backend, T, d, dtype, mask_kind):
    ops = need(backend)
    x, mask = data(T, d, dtype, mask_kind)
    start = torch.randn(d, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    start = start + start.T  # accumulate onto a non-zero symmetric matrix
    acc = ops.masked_syrk_(start.clone(), x, mask)
    expected = start.double().cpu() + ground_truth_gram(x, x, mask)
    assert acc.dtype == torch.float32
    upper = torch.triu(torch.ones(d, d, dtype=torch.bool))
    assert close(acc.cpu()[upper], expected[upper], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
def test_masked_outer_matches_reference(backend, T, d, dtype, mask_kind):
    ops = need(backend)
    x, mask = data(T, d, dtype, mask_kind)
    g, _ = data(T, d + 3, dtype, "none", seed=1)
    acc = ops.masked_outer_(torch.ones(d + 3, d, device=DEVICE), g, x, mask)
    assert close(acc, 1 + ground_truth_gram(g, x, mask), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,d", SHAPES + [(2500, 70)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_masked_column_sumsq_matches_reference(backend, T, d, dtype, mask_kind):
    ops = need(backend)
    x, mask = data(T, d, dtype, mask_kind)
    acc = ops.masked_column_sumsq_(torch.full((d,), 2.0, device=DEVICE), x, mask)
    assert close(acc, 2 + ground_truth_gram(x, x, mask).diagonal(), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,d", SHAPES)
@pytest.mark.parametrize("m", [1, 17, 70])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_masked"])
def test_masked_projected_energy_matches_reference(backend, T, d, m, dtype, mask_kind):
    ops = need(backend)
    x, mask = data(T, d, dtype, mask_kind)
    basis = torch.randn(d, m, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    acc = ops.masked_projected_energy_(torch.zeros(m, device=DEVICE), x, basis, mask)
    xb = x.double().cpu() @ basis.double().cpu()
    w = torch.ones(T, dtype=torch.float64) if mask is None else mask.double().cpu()
    assert close(acc, (w[:, None] * xb.square()).sum(0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_read_strided_rows_without_copies(backend):
    ops = need(backend)
    big, mask = data(90, 40, torch.float32, "random")
    x = big[:, 3:33]  # non-contiguous view, as the hooks may pass
    acc = ops.masked_syrk_(torch.zeros(30, 30, device=DEVICE), x, mask)
    expected = reference.masked_syrk_(torch.zeros(30, 30), x.cpu(), mask.cpu())
    assert torch.allclose(torch.triu(acc.cpu()), torch.triu(expected), atol=1e-4)


def test_auto_backend_uses_the_reference_for_cpu_tensors():
    assert get_ops("auto", "cpu").name == "torch"


def test_backends_report_says_why_unavailable():
    report = backends()
    assert report["torch"]["available"]
    for name, info in report.items():
        assert isinstance(info["reason"], str) and info["reason"]
    with pytest.raises(ValueError, match="backend"):
        get_ops("magic")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("basis_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", ["same", torch.float32])
@pytest.mark.parametrize("mask_kind", ["none", "random"])
def test_projected_energy_on_a_compact_basis_matches_the_widened_basis(backend, basis_dtype, x_dtype, mask_kind):
    """FILet's stored basis is in the model's dtype: rows of that dtype, or fp32 rows (W x, Wᵀ g),
    projected onto it must give the energies of the exactly widened basis."""
    ops = need(backend)
    T, d, m = 300, 130, 70
    x, mask = data(T, d, basis_dtype if x_dtype == "same" else x_dtype, mask_kind)
    basis = torch.randn(d, m, generator=torch.Generator().manual_seed(3)).to(DEVICE, basis_dtype)
    acc = ops.masked_projected_energy_(torch.zeros(m, device=DEVICE), x, basis, mask)
    xb = x.double().cpu() @ basis.double().cpu()
    w = torch.ones(T, dtype=torch.float64) if mask is None else mask.double().cpu()
    assert close(acc, (w[:, None] * xb.square()).sum(0), torch.float32)


@pytest.mark.parametrize("dtype,bits,floor", [(torch.bfloat16, 16, 0.0), (torch.float16, 21, 2.0 ** -24)])
def test_split_carries_twice_the_significant_bits(dtype, bits, floor):
    from fisher_kernels.ops.cublas import split

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    high, low = split(x, dtype)
    assert high.dtype == low.dtype == dtype
    assert ((high.float() + low.float() - x).abs() <= x.abs() * 2.0 ** -bits + floor).all()  # floor: fp16 subnormals
    assert not torch.equal(high.float(), x)  # the remainder matters
