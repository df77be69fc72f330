import copy

import pytest
import torch

from brute_force import as_statistics, brute_force_statistics, max_principal_angle
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


def test_lora_ga_subspaces_from_float64_statistics_match_a_dense_svd():
    """LoRA-GA's arithmetic in float64 with the exact SVD, on the oracle's per-batch mean-loss
    gradients (batches of unequal token counts): A spans the top-r right singular vectors, B the
    left ones r..2r, within 1e-4 rad on every layer."""
    model = make_model("llama")
    samples = make_samples("llama", n=7)
    names = resolve_target_modules(model)
    oracle = brute_force_statistics(model, "llama", samples, names, weighting="batch", batch_size=3)
    stats = as_statistics(oracle, loss_weighting="batch", num_sequences=len(samples), num_batches=3)
    report = compute_initialization(model, None, statistics=stats, method="lora_ga", r=R, svd="exact", progress=False)
    for name in names:
        U, S, Vh = torch.linalg.svd(oracle[name]["grad"])
        assert S[R - 1] - S[R] > 1e-6 * S[0] and S[2 * R - 1] - S[2 * R] > 1e-6 * S[0], name  # determined subspaces
        init = report.layers[name]
        assert max_principal_angle(init.lora_A.T, Vh[:R].T) <= 1e-4, name
        assert max_principal_angle(init.lora_B, U[:, R:2 * R]) <= 1e-4, name


def test_lora_ga_through_a_padded_pass_is_within_1e_4_rad_of_a_dense_svd():
    """The whole pipeline: fp32 statistics from padded batches of unequal token counts, per-batch
    mean-loss gradients, ``svd="exact"``; measured ≤ 1.3e-6 rad."""
    model = make_model("llama")
    samples = make_samples("llama", n=7)
    names = resolve_target_modules(model)
    oracle = brute_force_statistics(model, "llama", samples, names, weighting="batch", batch_size=3)
    report = compute_initialization(model, pad_batches(samples, 3), method="lora_ga", r=R, svd="exact", progress=False)
    for name in names:
        U, S, Vh = torch.linalg.svd(oracle[name]["grad"])
        init = report.layers[name]
        assert max_principal_angle(init.lora_A.T, Vh[:R].T) <= 1e-4, name
        assert max_principal_angle(init.lora_B, U[:, R:2 * R]) <= 1e-4, name


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
        assert init.lora_A.shape == (R, W.shape[1]) and init.lora_diag.shape == (R,)
        assert init.lora_A.abs().max() <= 1 / W.shape[1] ** 0.5  # Kaiming-uniform(a=√5) bound
    diags = torch.cat([i.lora_diag for i in report.layers.values()])
    assert 0.5 < diags.std() < 2 and diags.unique().numel() == diags.numel()  # N(0, 1) draws


def _kasa_training_run(peft_model, batches, steps):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss = peft_model(**batches[step % len(batches)]).loss + peft_model._get_kasa_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: module.get_delta_weight("default").detach().clone()
            for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_diag")}


def test_kasa_trains_exactly_as_peft_kasa_with_the_same_start():
    """The adapter is PEFT's KaSA (trainable lora_diag, its regulariser reachable): five AdamW steps
    on task loss + ``_get_kasa_loss()`` give the same ΔW = s·B diag(d) A as PEFT's own KaSA model
    started from the same A, d and truncated base."""
    from peft import KasaConfig, LoraConfig, get_peft_model

    model = make_model("llama").train()
    batches = pad_batches(make_samples("llama", n=6), 2)
    ours = init_lora(copy.deepcopy(model), None, method="kasa", r=R, progress=False, svd_driver="svd",
                     lora_config=LoraConfig(r=R, lora_alpha=2 * R, kasa_config=KasaConfig(beta=1e-2, gamma=1e-2)))
    peft_kasa = get_peft_model(copy.deepcopy(model), LoraConfig(r=R, lora_alpha=2 * R, target_modules=resolve_target_modules(model),
                                                                kasa_config=KasaConfig(beta=1e-2, gamma=1e-2)))
    layers = 0
    with torch.no_grad():
        for name, module in ours.base_model.model.named_modules():
            if not hasattr(module, "lora_diag"):
                continue
            other = peft_kasa.base_model.model.get_submodule(name)
            assert torch.allclose(module.get_base_layer().weight, other.get_base_layer().weight, atol=1e-6), name
            other.lora_A["default"].weight.copy_(module.lora_A["default"].weight)
            other.lora_diag["default"].copy_(module.lora_diag["default"])
            assert module.lora_diag["default"].requires_grad
            layers += 1
    assert layers == len(resolve_target_modules(model))
    assert ours._get_kasa_loss().item() > 0
    got, expected = _kasa_training_run(ours, batches, 5), _kasa_training_run(peft_kasa, batches, 5)
    for name, delta in expected.items():  # the bases differ by rounding (~1e-7), which Adam's first steps amplify
        assert delta.abs().max() > 0
        assert (got[name] - delta).norm() <= 1e-4 * delta.norm(), name  # measured 7e-6; folding d into A gave 0.45


def test_kasa_adapter_reloads_in_plain_peft_on_the_original_model(tmp_path):
    """PEFT truncates the original base itself when it loads a KaSA adapter: the saved adapter
    plus the original model reproduce the initialised model."""
    from peft import PeftModel

    model = make_model("llama")
    batch = pad_batches(make_samples("llama", n=2), 2)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model = init_lora(copy.deepcopy(model), None, method="kasa", r=R, progress=False)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_diag"):  # a trained-looking adapter
                module.lora_B["default"].weight.normal_(0, 0.1)
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)


def test_kasa_refuses_conv1d_targets_and_kasa_config_elsewhere():
    from peft import KasaConfig, LoraConfig

    with pytest.raises(ValueError, match="Conv1D"):
        init_lora(make_model("gpt2"), None, method="kasa", r=2, progress=False)
    with pytest.raises(ValueError, match="kasa_config"):
        init_lora(make_model("llama"), None, method="pissa", r=2, progress=False,
                  lora_config=LoraConfig(r=2, kasa_config=KasaConfig()))


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
