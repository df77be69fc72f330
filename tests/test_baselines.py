import copy

import pytest
import torch

from brute_force import brute_force_statistics
from fisher_kernels import compute_initialization, init_lora, resolve_target_modules
from fisher_kernels.layers import weight_matrix
from tiny_models import make_model, make_samples, pad_batches

R = 3


def projector(M):
    Q, _ = torch.linalg.qr(M.double())
    return Q @ Q.T


def test_lora_ga_matches_a_direct_svd_of_the_averaged_gradient():
    model = make_model("llama")
    samples = make_samples("llama", n=6)
    names = resolve_target_modules(model)
    scale = 2.0
    report = compute_initialization(model, pad_batches(samples, 3), method="lora_ga", r=R, scale=scale, progress=False)
    oracle = brute_force_statistics(model, "llama", samples, names, weighting="batch", batch_size=3)
    for name in names:
        grad = oracle[name]["grad"]
        U, S, Vh = torch.linalg.svd(grad)
        init = report.layers[name]
        d_out = grad.shape[0]
        c = d_out ** 0.25 / 16 ** 0.5
        # B spans left singular vectors r..2r, A the top-r right ones, each scaled by c
        assert torch.allclose(init.lora_B.double().T @ init.lora_B.double(), c**2 * torch.eye(R, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(projector(init.lora_B), projector(U[:, R:2 * R]), atol=2e-3), name
        assert torch.allclose(projector(init.lora_A.T), projector(Vh[:R].T), atol=2e-3), name
        W = weight_matrix(model.get_submodule(name)).detach()
        assert torch.allclose(init.new_base_weight(W), W - scale * init.lora_B @ init.lora_A, atol=1e-6)


def test_kasa_follows_its_definition():
    model = make_model("llama")
    report = compute_initialization(model, None, method="kasa", r=R, progress=False)
    for name, init in report.layers.items():
        W = weight_matrix(model.get_submodule(name)).detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = S.shape[0] - R
        base = init.new_base_weight(W).double()
        assert torch.allclose(base, (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-5)
        assert torch.linalg.matrix_rank(base, atol=1e-4) == k
        assert torch.count_nonzero(init.lora_B) == 0
        bound = 1 / W.shape[1] ** 0.5
        assert init.lora_A.shape == (R, W.shape[1])
        row_max = init.lora_A.abs().max(dim=1).values
        assert (row_max > 0).all()
    # the scales d differ between rows: rows are not all bounded by the plain Kaiming bound
    all_rows = torch.cat([i.lora_A.abs().max(dim=1).values for i in report.layers.values()])
    assert (all_rows > bound).any() and (all_rows < bound).any()


def test_kasa_changes_outputs_at_step_0_by_design_and_lora_ga_does_not():
    model = make_model("llama")
    batch = pad_batches(make_samples("llama", n=2), 2)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
        kasa = init_lora(copy.deepcopy(model), None, method="kasa", r=R, progress=False)
        ga = init_lora(copy.deepcopy(model), [batch], method="lora_ga", r=R, progress=False)
        assert not torch.allclose(kasa(**inputs).logits, before, atol=1e-4)
        assert torch.allclose(ga(**inputs).logits, before, atol=1e-5)


def test_lora_ga_needs_two_r_directions():
    model = make_model("llama")
    with pytest.raises(ValueError, match="2r"):
        compute_initialization(model, pad_batches(make_samples("llama"), 2), method="lora_ga", r=7, progress=False)  # k_proj is 12 × 24
