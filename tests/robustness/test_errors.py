"""Bad input raises a clear error before any weight is touched, and leaves the model as found."""

import math

import pytest
import torch

from fisher_kernels import init_lora
from tiny_models import make_model, make_samples, pad_batches


def batches():
    return pad_batches(make_samples("llama", n=4), 2)


def nan_loss(outputs, labels):
    return outputs.logits.sum() * math.nan


def exploding_loader():
    yield from batches()[:1]
    raise RuntimeError("disk on fire")


def interrupted_loader():
    yield from batches()[:1]
    raise KeyboardInterrupt


CASES = [
    ("empty loader", dict(loader=[]), ValueError, "no batch"),
    ("no loader for a data method", dict(loader=None), ValueError, "needs calibration data"),
    ("no matching target", dict(target_modules=["nonexistent_proj"]), ValueError, "matched no layer"),
    ("unsupported layer type", dict(target_modules=["embed_tokens"]), TypeError, "embed_tokens"),
    ("r too large", dict(r=25), ValueError, "larger than min"),
    ("r not positive", dict(r=0), ValueError, "positive integer"),
    ("unknown method", dict(method="svd"), ValueError, "unknown method"),
    ("unknown option", dict(energy="loud"), ValueError, "energy"),
    ("non-finite loss", dict(loss_fn=nan_loss), ValueError, "batch 0: the loss is not finite"),
    ("batch without labels", dict(loader="no-labels"), ValueError, "batch 0 has no 'labels'"),
    ("not a batch", dict(loader=[torch.zeros(3)]), TypeError, "batch 0"),
    ("loader raises mid-pass", dict(loader="exploding"), RuntimeError, "batch 1: disk on fire"),
    ("bad lora_alpha", dict(lora_alpha=-1), ValueError, "lora_alpha"),
    ("bad token mask", dict(token_mask="everything"), ValueError, "token_mask"),
    ("bad fisher", dict(fisher="false"), ValueError, "fisher"),
    ("lora_da bad damping", dict(method="lora_da", damping=-1.0), ValueError, "damping"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_leaves_the_model_untouched(case, model_snapshot):
    snapshot, assert_same = model_snapshot
    _, kwargs, error, message = case
    model = make_model("llama").train()
    model.model.layers[0].mlp.eval()  # mixed modes must come back as they were
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    before = snapshot(model)
    kwargs = dict(kwargs)
    loader = kwargs.pop("loader", batches())
    if loader == "no-labels":
        loader = [{k: v for k, v in b.items() if k != "labels"} for b in batches()]
    elif loader == "exploding":
        loader = exploding_loader()
    with pytest.raises(error, match=message):
        init_lora(model, loader, r=kwargs.pop("r", 4), progress=False, **kwargs)
    assert_same(before, snapshot(model))


def test_keyboard_interrupt_during_the_pass_leaves_the_model_untouched(model_snapshot):
    snapshot, assert_same = model_snapshot
    model = make_model("llama").train()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        init_lora(model, interrupted_loader(), r=4, progress=False)
    assert_same(before, snapshot(model))


def test_a_model_with_lora_layers_that_is_not_a_peft_model_is_refused():
    model = make_model("llama")
    peft_model = init_lora(model, None, method="pissa", r=2, progress=False)
    with pytest.raises(TypeError, match="holds LoRA layers but is not a PeftModel"):
        init_lora(peft_model.get_base_model(), batches(), r=2, progress=False)


def test_weight_only_methods_need_no_loader():
    model = make_model("llama")
    peft_model = init_lora(model, method="milora", r=2, progress=False)
    assert peft_model.fisher_kernels_report.stats_bytes == 0


def test_gradient_checkpointing_is_refused_before_the_pass(model_snapshot):
    snapshot, assert_same = model_snapshot
    model = make_model("llama")
    model.gradient_checkpointing_enable()
    before = snapshot(model)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        init_lora(model, batches(), r=2, progress=False)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["filet", "lora_da", "lora_ga"])
def test_all_labels_masked_is_a_clear_error_for_every_data_driven_method(method, model_snapshot):
    snapshot, assert_same = model_snapshot
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 2)
    for batch in batches:
        batch["labels"] = torch.full_like(batch["labels"], -100)
    before = snapshot(model)
    with pytest.raises(ValueError, match="every label is -100"):
        init_lora(model, batches, method=method, r=2, progress=False)
    assert_same(before, snapshot(model))


def test_a_loss_without_gradient_is_a_clear_error():
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 2)

    def detached_loss(outputs, labels):
        return outputs.logits.detach().float().sum()

    with pytest.raises(ValueError, match="does not depend on the model's outputs"):
        init_lora(model, batches, method="filet", r=2, loss_fn=detached_loss, progress=False)


def test_kasa_refuses_a_rank_that_truncates_a_layer_to_rank_zero():
    model = make_model("llama")
    with pytest.raises(ValueError, match="would truncate .* to rank 0"):
        init_lora(model, None, method="kasa", r=24, target_modules=["q_proj"], progress=False)
