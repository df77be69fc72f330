"""Memory budget, statistics cache, conversion to a plain LoRA adapter."""

import copy

import pytest
import torch
from peft import PeftModel

from fisher_kernels import (KFACStatistics, collect_statistics, compute_initialization, full_statistics_requests,
                            init_lora, save_as_plain_lora)
from fisher_kernels.layers import weight_matrix
from tiny_models import make_model, make_samples, pad_batches


def batches(kind="llama", n=6, bs=3):
    return pad_batches(make_samples(kind, n=n), bs)


@pytest.mark.parametrize("method,options", [("lora_da", {}), ("filet", {"route": "full"}), ("filet", {})])
def test_memory_budget_splits_layers_into_groups_with_identical_results(method, options):
    model = make_model("llama")
    data = batches()
    single = compute_initialization(model, data, method=method, r=3, progress=False, **options)
    budget = max((single.stats_bytes + single.prepared_bytes) // 4, 1)  # what a layer holds: statistics, bases
    grouped = compute_initialization(model, data, method=method, r=3, progress=False, max_stats_memory=budget, **options)
    assert len(grouped.stats_bytes_per_group) >= 3
    assert max(grouped.stats_bytes_per_group) <= budget
    for name, init in single.layers.items():
        other = grouped.layers[name]
        product, other_product = init.lora_B @ init.lora_A, other.lora_B @ other.lora_A
        assert torch.allclose(product, other_product, rtol=1e-4, atol=1e-6 * product.abs().max().item()), name
        W = weight_matrix(model.get_submodule(name))
        assert torch.allclose(init.new_base_weight(W), other.new_base_weight(W), atol=1e-6), name


def test_memory_budget_needs_a_reiterable_loader_and_a_feasible_budget():
    model = make_model("llama")
    with pytest.raises(ValueError, match="re-iterable"):
        compute_initialization(model, iter(batches()), method="lora_da", r=2, max_stats_memory=20_000, progress=False)
    with pytest.raises(ValueError, match="alone needs"):
        compute_initialization(model, batches(), method="lora_da", r=2, max_stats_memory=100, progress=False)


def test_statistics_cache_round_trip_serves_other_methods_and_ranks(tmp_path):
    model = make_model("llama")
    data = batches()
    stats = collect_statistics(model, data, full_statistics_requests(model), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = KFACStatistics.load(path, model=model)
    assert loaded.num_batches == stats.num_batches and loaded.fingerprint == stats.fingerprint
    for name, layer in stats.layers.items():
        for key, t in layer.tensors().items():
            assert torch.equal(getattr(loaded[name], key), t), (name, key)
    q, k = loaded["model.layers.0.self_attn.q_proj"], loaded["model.layers.0.self_attn.k_proj"]
    assert k.input_factor is q.input_factor  # sharing survives the round trip
    for method, r in (("filet", 4), ("filet", 2)):  # no new pass, another rank
        fresh = compute_initialization(model, data, method=method, r=r, progress=False)
        cached = compute_initialization(model, None, method=method, r=r, statistics=loaded, progress=False)
        for name, init in fresh.layers.items():
            other = cached.layers[name]
            a, b = init.lora_B @ init.lora_A, other.lora_B @ other.lora_A
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item() + 1e-9), (method, name)


@pytest.mark.parametrize("method,weighting", [("lora_da", "sequence"), ("lora_ga", "batch")])
def test_cached_statistics_serve_methods_that_weight_the_loss_per_sequence_or_batch(tmp_path, method, weighting):
    model = make_model("llama")
    data = batches()
    stats = collect_statistics(model, data, full_statistics_requests(model), progress=False, loss_weighting=weighting)
    stats.save(tmp_path / "stats.safetensors")
    loaded = KFACStatistics.load(tmp_path / "stats.safetensors", model=model)
    assert loaded.loss_weighting == weighting and loaded.loss_units == stats.loss_units
    fresh = compute_initialization(model, data, method=method, r=2, progress=False)
    cached = compute_initialization(model, None, method=method, r=2, statistics=loaded, progress=False)
    for name, init in fresh.layers.items():  # equal statistics; the solvers' BLAS paths may round differently
        a, b = init.lora_B @ init.lora_A, cached.layers[name].lora_B @ cached.layers[name].lora_A
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item()), name


def test_statistics_of_another_loss_weighting_are_refused():
    model = make_model("llama")
    stats = collect_statistics(model, batches(), full_statistics_requests(model), progress=False)  # "token"
    with pytest.raises(ValueError, match="loss_weighting='token'.*'lora_da'.*'sequence'"):
        compute_initialization(model, None, method="lora_da", r=2, statistics=stats, progress=False)


def test_statistics_of_another_model_are_refused(tmp_path):
    model = make_model("llama")
    stats = collect_statistics(model, batches(), full_statistics_requests(model), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    other = make_model("llama", seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="different model"):
        KFACStatistics.load(path, model=other)
    with pytest.raises(ValueError, match="different model"):
        compute_initialization(other, None, method="filet", r=2, statistics=stats, progress=False)
    with pytest.raises(ValueError, match="does not have"):
        KFACStatistics.load(path, model=make_model("gpt2"))
    projected = collect_statistics(model, batches(), {"model.layers.0.mlp.up_proj": full_statistics_requests(model)[
        "model.layers.0.mlp.up_proj"]}, progress=False)
    with pytest.raises(ValueError, match="no entry for layers"):
        compute_initialization(model, None, method="filet", r=2, statistics=projected, progress=False)


def train_a_little(peft_model, batch, steps: int = 3) -> None:
    """A few SGD steps, so that the adapter differs from its initial value."""
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()



@pytest.mark.parametrize("method", ["filet", "lora_da", "pissa", "lora_ga"])
def test_trained_adapter_converts_to_a_plain_lora_for_the_original_model(tmp_path, method):
    original = make_model("llama")
    data = batches(n=4, bs=4)
    options = {"residual_base": True} if method == "lora_da" else {}
    peft_model = init_lora(copy.deepcopy(original), data, method=method, r=3, lora_alpha=6, progress=False, **options)
    train_a_little(peft_model, data[0])
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    save_as_plain_lora(peft_model, tmp_path / "plain")
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "plain")
    with torch.no_grad():
        got = plain(**inputs).logits
    assert plain.peft_config["default"].r == 6
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_conversion_needs_the_initial_adapter(tmp_path):
    peft_model = init_lora(make_model("llama"), None, method="gaussian", r=2, progress=False)
    with pytest.raises(ValueError, match="no initial adapter"):
        save_as_plain_lora(peft_model, tmp_path / "plain")


def test_an_adapter_reloaded_from_disk_converts_with_the_initial_adapter_saved_beside_it(tmp_path):
    """The PEFT habit: save, reload in another process, convert. save_residual_model keeps the initial
    factors beside the adapter; save_as_plain_lora takes that directory."""
    from transformers import LlamaForCausalLM

    from fisher_kernels import save_residual_model

    original = make_model("llama")
    data = batches(n=4, bs=4)
    peft_model = init_lora(copy.deepcopy(original), data, method="filet", r=3, lora_alpha=6, progress=False)
    train_a_little(peft_model, data[0])
    save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "base")
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with pytest.raises(ValueError, match="a model reloaded from disk has none in memory; pass initial_adapter="):
        save_as_plain_lora(reloaded, tmp_path / "plain")
    save_as_plain_lora(reloaded, tmp_path / "plain", initial_adapter=tmp_path / "adapter")
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "plain")
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, peft_model(**inputs).logits, atol=1e-4)


@pytest.mark.parametrize("method", ["filet", "lora_ga"])
def test_peft_s_own_conversion_of_a_residual_adapter_reproduces_the_trained_model(tmp_path, method):
    """PEFT's convention for residual initialisations (PiSSA, LoRA-GA): save the adapter right after
    initialisation, then save_pretrained(..., path_initial_model_for_weight_conversion=that) writes a
    plain LoRA adapter for the original weights."""
    original = make_model("llama")
    data = batches(n=4, bs=4)
    peft_model = init_lora(copy.deepcopy(original), data, method=method, r=3, lora_alpha=6, progress=False)
    peft_model.save_pretrained(tmp_path / "initial")
    train_a_little(peft_model, data[0])
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    plain = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "converted")
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, expected, atol=1e-4)
