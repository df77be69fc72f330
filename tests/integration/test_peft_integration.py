import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from fisher_kernels import init_lora, save_residual_model
from fisher_kernels.layers import weight_matrix
from tiny_models import make_model, make_samples, pad_batches

METHODS = ["filet", "lora_da", "pissa", "milora", "gaussian", "lora_ga"]


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", METHODS)
def test_outputs_unchanged_at_step_0(kind, method):
    model = make_model(kind)
    batches = pad_batches(make_samples(kind, n=4), 2)
    before = logits(model, batches[0])
    options = {"residual_base": True} if method == "lora_da" else {}  # LoRA-DA's reference keeps W
    peft_model = init_lora(copy.deepcopy(model), batches, method=method, r=4, lora_alpha=8, progress=False, **options)
    assert isinstance(peft_model, PeftModel)
    assert torch.allclose(logits(peft_model, batches[0]), before, atol=1e-5)
    if method != "gaussian":  # the adapter really is non-zero
        layer = peft_model.get_base_model().get_submodule(peft_model.fisher_kernels_report.target_modules[0])
        assert layer.lora_B["default"].weight.abs().max() > 0


@pytest.mark.parametrize("method", ["filet", "lora_da", "pissa"])
def test_adapters_train_and_loss_decreases(method):
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 4)
    peft_model = init_lora(model, batches, method=method, r=4, progress=False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(**batches[0]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("method", ["filet", "lora_da", "gaussian"])
def test_save_and_reload_round_trip(tmp_path, method):
    from transformers import AutoModelForCausalLM
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 2)
    peft_model = init_lora(model, batches, method=method, r=4, progress=False)
    with torch.no_grad():  # pretend training happened: the adapter must survive the round trip
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    expected = logits(peft_model, batches[0])
    save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(logits(reloaded, batches[0]), expected, atol=1e-5)
    assert torch.allclose(logits(peft_model, batches[0]), expected)  # saving left the model as it was


@pytest.mark.parametrize("method", ["filet", "lora_da", "milora"])
def test_merge_and_unload_gives_back_the_original_weights(method):
    model = make_model("gpt2")
    original = {n: weight_matrix(m).detach().clone() for n, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2}
    options = {"residual_base": True} if method == "lora_da" else {}
    peft_model = init_lora(model, pad_batches(make_samples("gpt2", n=4), 2), method=method, r=4, progress=False,
                           **options)
    merged = peft_model.merge_and_unload()
    for name, W in original.items():
        assert torch.allclose(weight_matrix(merged.get_submodule(name)), W, atol=1e-5), name


def test_lora_da_keeps_the_base_weight_by_default_as_its_reference():
    model = make_model("llama")
    original = {n: weight_matrix(m).detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    batches = pad_batches(make_samples("llama", n=4), 2)
    peft_model = init_lora(model, batches, method="lora_da", r=4, lora_alpha=8, progress=False)
    report = peft_model.fisher_kernels_report
    assert not report.residual_base and not report.initial_adapter
    for name in report.target_modules:
        layer = peft_model.get_base_model().get_submodule(name)
        assert torch.equal(weight_matrix(layer.get_base_layer()), original[name]), name
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert B.abs().max() > 0
        merged = original[name] + report.scale * B @ A  # step-0 model: W + s·B₀A₀
        assert torch.allclose(merged, weight_matrix(peft_model.get_base_model().get_submodule(name).get_base_layer())
                              + report.scale * B @ A)


def test_lora_config_is_respected():
    model = make_model("llama")
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, target_modules=["q_proj", "v_proj"])
    batches = pad_batches(make_samples("llama", n=4), 2)
    before = logits(model, batches[0])
    peft_model = init_lora(model, batches, lora_config=config, progress=False)
    report = peft_model.fisher_kernels_report
    assert report.scale == pytest.approx(16 / 2)  # rsLoRA: alpha / sqrt(r)
    assert report.target_modules == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    assert torch.allclose(logits(peft_model, batches[0]), before, atol=1e-5)
    layer = peft_model.get_base_model().get_submodule(report.target_modules[0])
    assert layer.scaling["default"] == pytest.approx(8.0)


def test_bf16_model_outputs_unchanged_up_to_rounding():
    model = make_model("llama").to(torch.bfloat16)
    batches = pad_batches(make_samples("llama", n=4), 2)
    before = logits(model, batches[0]).float()
    peft_model = init_lora(model, batches, method="filet", r=4, progress=False)
    after = logits(peft_model, batches[0]).float()
    assert (after - before).abs().max() <= 0.05 * before.abs().max()
