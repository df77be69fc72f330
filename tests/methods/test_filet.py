import pytest
import torch

from brute_force import brute_force_statistics
from fisher_kernels import compute_initialization, resolve_target_modules
from fisher_kernels.layers import weight_matrix
from tiny_models import make_model, make_samples, pad_batches

R = 4


def expected_selection(W, A, G, r, energy):
    """Top-r candidates by Fisher energy, from a float64 SVD and brute-force factors."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    e = torch.einsum("oi,op,pi->i", U, G, U) * torch.einsum("id,de,ie->i", Vh, A, Vh)
    if energy == "component":
        e = e * S.square()
    order = torch.argsort(e, descending=True)
    return order[:r], e, S


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("energy", ["direction", "component"])
@pytest.mark.parametrize("route", ["projected", "full"])
def test_filet_picks_the_top_r_candidates_by_fisher_energy(kind, energy, route):
    model = make_model(kind)
    samples = make_samples(kind, n=5)
    names = resolve_target_modules(model)
    report = compute_initialization(model, pad_batches(samples, 2), method="filet", r=R, energy=energy,
                                    route=route, progress=False)
    oracle = brute_force_statistics(model, kind, samples, names)
    for name in names:
        W = weight_matrix(model.get_submodule(name)).detach()
        top, e, _ = expected_selection(W, oracle[name]["A"], oracle[name]["G"], R, energy)
        chosen = report.layers[name].selected
        ranked = torch.sort(e, descending=True).values
        if (ranked[R - 1] - ranked[R]) > 1e-4 * ranked[0]:  # no near-tie at the cut
            assert sorted(chosen.tolist()) == sorted(top.tolist()), name
        assert torch.allclose(report.layers[name].scores.double(), e, rtol=2e-3, atol=1e-6 * e.max().item()), name


def test_filet_selection_differs_from_pissa_somewhere():
    """The point of the method: Fisher energy does not just reproduce singular-value order."""
    model = make_model("llama")
    report = compute_initialization(model, pad_batches(make_samples("llama"), 2), method="filet", r=R, progress=False)
    assert any(sorted(l.selected.tolist()) != list(range(R)) for l in report.layers.values())


def test_filet_routes_agree():
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=6), 3)
    full = compute_initialization(model, batches, method="filet", r=R, route="full", progress=False)
    projected = compute_initialization(model, batches, method="filet", r=R, route="projected", progress=False)
    for name, f in full.layers.items():
        p = projected.layers[name]
        assert torch.allclose(f.scores, p.scores, rtol=1e-3, atol=1e-7 * f.scores.max().item()), name
        assert torch.equal(f.selected, p.selected), name
        assert torch.allclose(f.lora_A, p.lora_A) and torch.allclose(f.lora_B, p.lora_B)
    assert projected.stats_bytes < full.stats_bytes / 4


def test_filet_factors_follow_the_pissa_convention():
    model = make_model("llama")
    scale = 0.5
    report = compute_initialization(model, pad_batches(make_samples("llama"), 2), method="filet", r=R,
                                    scale=scale, progress=False)
    for name, init in report.layers.items():
        W = weight_matrix(model.get_submodule(name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        idx = init.selected
        component = U[:, idx] @ torch.diag(S[idx]) @ Vh[idx]
        assert torch.allclose(scale * init.lora_B.double() @ init.lora_A.double(), component, atol=1e-5)
        assert torch.allclose(init.new_base_weight(W).double(), W - component, atol=1e-5)
        # A and B carry equal magnitude: row norms of A equal column norms of B
        assert torch.allclose(init.lora_A.norm(dim=1), init.lora_B.norm(dim=0), rtol=1e-4)


def test_uniform_magnitude_starts_every_chosen_direction_at_the_mean_singular_value():
    model = make_model("llama")
    batches, scale = pad_batches(make_samples("llama"), 2), 0.5
    singular = compute_initialization(model, batches, method="filet", r=R, scale=scale, progress=False)
    uniform = compute_initialization(model, batches, method="filet", r=R, scale=scale, magnitude="uniform",
                                     progress=False)
    for name, init in uniform.layers.items():
        assert torch.equal(init.selected, singular.layers[name].selected)  # the choice does not change
        W = weight_matrix(model.get_submodule(name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        idx = init.selected
        component = S[idx].mean() * U[:, idx] @ Vh[idx]
        assert torch.allclose(scale * init.lora_B.double() @ init.lora_A.double(), component, atol=1e-5)
        assert torch.allclose(init.new_base_weight(W).double(), W - component, atol=1e-5)  # unchanged at step 0
    with pytest.raises(ValueError, match="magnitude"):
        compute_initialization(model, batches, method="filet", r=R, magnitude="large", progress=False)


def test_candidates_option_restricts_to_top_singular_triplets():
    model = make_model("llama")
    report = compute_initialization(model, pad_batches(make_samples("llama"), 2), method="filet", r=R,
                                    candidates=6, progress=False)
    for init in report.layers.values():
        assert init.scores.shape == (6,)
        assert init.selected.max() < 6


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (24, 24)])
@pytest.mark.parametrize("driver,tol", [("svd", 1e-5), ("gram64", 1e-5), ("gram", 1e-3)])
def test_batched_svd_drivers_reconstruct_the_weight(shape, driver, tol):
    from fisher_kernels.methods import batched_svd
    g = torch.Generator().manual_seed(0)
    weights = {f"w{i}": torch.randn(*shape, generator=g) for i in range(3)}
    reference = torch.linalg.svdvals(torch.stack(list(weights.values())).double())
    for i, (U, S, Vh) in enumerate(batched_svd(weights, driver=driver).values()):
        W = weights[f"w{i}"]
        assert torch.allclose((U * S) @ Vh, W, atol=tol * 10)
        assert torch.allclose(S.double(), reference[i], atol=tol * reference[i].max().item())
        # fp32 Gram: a direction's error grows like eps·(σ_max/σ)², so only leading ones are checked
        k = S.shape[0] if driver != "gram" else int((S >= 0.1 * S[0]).sum())
        U, Vh = U[:, :k], Vh[:k]
        assert torch.allclose(U.T @ U, torch.eye(k), atol=tol * 10) and torch.allclose(Vh @ Vh.T, torch.eye(k), atol=tol * 10)


def test_filet_selection_does_not_depend_on_the_svd_driver():
    model = make_model("gpt2")
    batches = pad_batches(make_samples("gpt2", n=6), 3)
    selections = {
        driver: compute_initialization(model, batches, method="filet", r=R, svd_driver=driver, progress=False)
        for driver in ("svd", "gram64", "gram")
    }
    for name, init in selections["svd"].layers.items():
        for driver in ("gram64", "gram"):
            assert sorted(selections[driver].layers[name].selected.tolist()) == sorted(init.selected.tolist()), (driver, name)


def test_a_gpu_models_exact_basis_waits_on_the_host_and_changes_nothing(monkeypatch):
    """For a bf16 model on a GPU FILet keeps the full-precision singular vectors in host memory
    instead of decomposing every weight again after the pass: same selection and factors, half
    the decompositions. (Forced here on the CPU.)"""
    from fisher_kernels.methods import common, filet

    model = make_model("llama").to(torch.bfloat16)
    batches = pad_batches(make_samples("llama", n=4), 2)
    calls = []
    real = common.singular_basis

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(filet, "singular_basis", counting)
    recomputed = compute_initialization(model, batches, method="filet", r=3, progress=False)
    n = len(recomputed.layers)
    assert len(calls) == 2 * n
    calls.clear()
    monkeypatch.setattr(filet.FILet, "_keeps_exact_on_host", staticmethod(lambda W: True))
    kept = compute_initialization(model, batches, method="filet", r=3, progress=False)
    assert len(calls) == n and set(calls) == {torch.float64}
    for name, init in recomputed.layers.items():
        assert torch.equal(init.selected, kept.layers[name].selected), name
        assert torch.equal(init.lora_A, kept.layers[name].lora_A) and torch.equal(init.lora_B, kept.layers[name].lora_B)
    calls.clear()
    monkeypatch.setattr(filet, "available_memory", lambda device: (0, "a test"))  # no host room: recomputed
    short = compute_initialization(model, batches, method="filet", r=3, progress=False)
    assert len(calls) == 2 * n
    for name, init in recomputed.layers.items():
        assert torch.equal(init.lora_A, short.layers[name].lora_A), name
