"""``backend="auto"``: a backend that computes wrongly is never chosen, a slower one is not chosen.

On this CPU machine the candidates are stand-ins around the PyTorch reference (wrong, raising,
slow, fast), and the real ``cublas`` module (its CPU path); on a GPU the same code chooses among
the CUDA extension, Triton, cuBLAS and the reference.
"""

import time
from types import SimpleNamespace

import pytest
import torch

from fisher_kernels import backends
from fisher_kernels.ops import OP_NAMES, get_ops, reference
from fisher_kernels.ops.autotune import AutoOps, choose, probe_inputs, size_bucket


def slowed(fn, seconds):
    def run(*args):
        time.sleep(seconds)
        return fn(*args)
    return run


def wrong(fn):
    def run(acc, *args):
        fn(acc, *args)
        return acc.add_(1e-2 * acc.abs().max())
    return run


def raising(acc, *args):
    raise RuntimeError("no kernel image for this device")


def stand_ins(op):
    ref = getattr(reference, op)
    return {"torch": slowed(ref, 0.02), "fast": ref, "slow": slowed(ref, 0.08), "wrong": wrong(ref),
            "raising": raising}


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_chooses_the_fastest_correct_backend_and_warns_about_wrong_ones(op, dtype):
    with pytest.warns(RuntimeWarning) as caught:
        choice = choose(op, stand_ins(op), dtype, 64, "cpu")
    assert choice.backend == "fast"
    assert set(choice.rejected) == {"wrong", "raising"}
    assert "disagrees with the PyTorch reference" in choice.rejected["wrong"]
    assert "no kernel image" in choice.rejected["raising"]
    assert {str(w.message).split("'")[1] for w in caught} == {"wrong", "raising"}  # one warning each
    assert set(choice.seconds) == {"torch", "fast", "slow"}
    speedups = choice.speedups()
    assert speedups["fast"] > 1 > speedups["slow"]


def test_auto_keeps_the_reference_when_every_other_backend_is_slower_or_wrong():
    op = "masked_syrk_"
    candidates = {k: v for k, v in stand_ins(op).items() if k != "fast"}
    candidates["torch"] = getattr(reference, op)
    with pytest.warns(RuntimeWarning):
        assert choose(op, candidates, torch.float32, 64, "cpu").backend == "torch"


def test_auto_ops_probe_once_per_op_dtype_and_size_bucket():
    calls = []

    def counting(fn, name):
        def run(*args):
            calls.append(name)
            return fn(*args)
        return run

    namespaces = {name: SimpleNamespace(**{op: counting(stand_ins(op)[name], name) for op in OP_NAMES})
                  for name in ("torch", "fast", "slow")}
    auto = AutoOps("cpu", namespaces)
    x = torch.randn(50, 40)
    acc = auto.masked_syrk_(torch.zeros(40, 40), x, None)
    assert torch.allclose(acc, x.T @ x, atol=1e-4)
    probes = len(calls)
    auto.masked_syrk_(torch.zeros(40, 40), x, None)
    auto.masked_syrk_(torch.zeros(30, 30), x[:, :30], None)        # same size bucket: no new probe
    assert calls[probes:] == ["fast", "fast"]
    auto.masked_syrk_(torch.zeros(40, 40), x.bfloat16(), None)    # another dtype: probed again
    assert len(calls) > probes + 3
    report = auto.report()
    assert report["masked_syrk_ float32 ≤256"]["backend"] == "fast"
    assert report["masked_syrk_ bfloat16 ≤256"]["speedup_vs_torch"]["fast"] > 1


def test_a_compact_basis_is_probed_apart_from_an_fp32_one():
    """FILet's bf16 basis takes other code paths (cuBLAS projects in bf16): its own choice."""
    namespaces = {"torch": SimpleNamespace(**{op: getattr(reference, op) for op in OP_NAMES}),
                  "fast": SimpleNamespace(**{op: stand_ins(op)["fast"] for op in OP_NAMES})}
    auto = AutoOps("cpu", namespaces)
    x, basis = torch.randn(50, 40), torch.linalg.qr(torch.randn(40, 8))[0]
    fp32 = auto.masked_projected_energy_(torch.zeros(8), x, basis, None)
    compact = auto.masked_projected_energy_(torch.zeros(8), x, basis.bfloat16(), None)
    assert torch.allclose(fp32, compact, rtol=2e-2)
    assert set(auto.report()) == {"masked_projected_energy_ float32 ≤256",
                                  "masked_projected_energy_ float32 ≤256 basis bfloat16"}
    assert probe_inputs("masked_projected_energy_", torch.float32, 64, "cpu", basis_dtype=torch.bfloat16)[2].dtype \
        == torch.bfloat16


def test_size_buckets_and_probe_shapes():
    assert [size_bucket(n) for n in (1, 256, 257, 1024, 4096, 4097, 14336)] == [256, 256, 1024, 1024, 4096, 8192, 8192]
    acc, y, x, mask = probe_inputs("masked_outer_", torch.bfloat16, 64, "cpu")
    assert acc.shape == (y.shape[1], 64) and acc.dtype == torch.float32 and x.dtype == torch.bfloat16
    assert mask.dtype == torch.bool and 0 < mask.sum() < mask.numel()


@pytest.mark.parametrize("op", OP_NAMES)
def test_real_cublas_backend_passes_the_probe(op):
    from fisher_kernels.ops import cublas

    candidates = {"torch": getattr(reference, op), "cublas": getattr(cublas, op)}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        choice = choose(op, candidates, dtype, 200, "cpu")
        assert choice.rejected == {} and set(choice.seconds) == {"torch", "cublas"}
        if op == "masked_projected_energy_":  # and on a compact basis (bf16 GEMMs, fp32 rows split)
            choice = choose(op, candidates, dtype, 200, "cpu", basis_dtype=torch.bfloat16)
            assert choice.rejected == {} and set(choice.seconds) == {"torch", "cublas"}


def test_backend_pin_and_cpu_default(monkeypatch):
    assert get_ops("auto", "cpu").name == "torch"
    monkeypatch.setenv("FISHER_KERNELS_BACKEND", "torch")
    assert get_ops("auto", "cuda").name == "torch"
    assert "pinned to 'torch'" in backends()["auto"]["reason"]
    monkeypatch.setenv("FISHER_KERNELS_BACKEND", "magic")
    with pytest.raises(ValueError, match="backend"):
        get_ops("auto", "cuda")


def test_calls_with_many_rows_are_probed_on_many_rows():
    """The fastest backend on a thousand rows need not be the fastest on tens of thousands."""
    seen = []

    def recording(fn):
        def run(acc, x, mask):
            seen.append(x.shape[0])
            return fn(acc, x, mask)
        return run

    namespaces = {"torch": SimpleNamespace(**{op: getattr(reference, op) for op in OP_NAMES}),
                  "other": SimpleNamespace(**{op: getattr(reference, op) for op in OP_NAMES})}
    namespaces["other"].masked_syrk_ = recording(reference.masked_syrk_)
    auto = AutoOps("cpu", namespaces)
    auto.masked_syrk_(torch.zeros(8, 8), torch.randn(100, 8), None)
    auto.masked_syrk_(torch.zeros(8, 8), torch.randn(3000, 8), None)
    probes = [rows for rows in seen if rows not in (100, 3000)]
    assert {1024, 8192} <= set(probes)
    assert set(auto.report()) == {"masked_syrk_ float32 ≤256", "masked_syrk_ float32 ≤256 >2048 rows"}
    assert probe_inputs("masked_syrk_", torch.float32, 8192, "cpu", rows=8192)[1].shape == (4096, 8192)  # 2²⁵ cap
