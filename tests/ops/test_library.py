"""The ops as ``torch.ops.fisher_kernels.*``: schema, fake tensors, functionalisation (opcheck),
results equal to the reference, and ``torch.compile`` tracing them without graph breaks."""

import pytest
import torch

import fisher_kernels  # noqa: F401  (registers the ops)
from fisher_kernels.ops import reference

LIB = torch.ops.fisher_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: interpreted on CPU tensors (conftest)
g = torch.Generator().manual_seed(0)
X = torch.randn(9, 6, generator=g).to(DEVICE)
MASK = (torch.rand(9, generator=g) > 0.3).to(DEVICE)
BASIS = torch.randn(6, 4, generator=g).to(DEVICE)
G = torch.randn(9, 5, generator=g).to(DEVICE)


def zeros(*shape):
    return torch.zeros(*shape, device=DEVICE)


CASES = {
    "masked_syrk": (lambda: (zeros(6, 6), X, MASK), reference.masked_syrk_),
    "masked_column_sumsq": (lambda: (zeros(6), X.bfloat16(), None), reference.masked_column_sumsq_),
    "masked_projected_energy": (lambda: (zeros(4), X, BASIS, MASK.float()), reference.masked_projected_energy_),
    "masked_outer": (lambda: (zeros(5, 6), G.half(), X.half(), MASK), reference.masked_outer_),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_registered_op_passes_opcheck_and_matches_the_reference(name, backend):
    make, ref = CASES[name]
    op = getattr(LIB, name).default
    torch.library.opcheck(op, make(), {"backend": backend})
    args = make()
    op(*args, backend=backend)
    expected = ref(*make())
    got = args[0]
    if name == "masked_syrk":
        got, expected = got.triu(), expected.triu()
    assert torch.allclose(got, expected, atol=1e-4), name


def test_torch_compile_traces_the_ops_without_graph_breaks():
    def update(acc, diag, x, mask):
        LIB.masked_syrk(acc, x, mask)
        LIB.masked_column_sumsq(diag, x, mask)
        return acc.sum() + diag.sum()

    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    acc, diag = zeros(6, 6), zeros(6)
    compiled(acc, diag, X, MASK)
    assert torch.allclose(acc.triu(), reference.masked_syrk_(zeros(6, 6), X, MASK).triu(), atol=1e-5)
    assert torch.allclose(diag, reference.masked_column_sumsq_(zeros(6), X, MASK), atol=1e-5)


def test_fake_implementations_check_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(RuntimeError, match=r"acc must be \(d, d\)"):
            LIB.masked_syrk(torch.empty(5, 5), torch.empty(9, 6), None)
