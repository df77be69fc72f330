"""Faults injected at every stage after the calibration pass (PEFT wiring, adapter snapshot,
base-weight writes), as exceptions and as KeyboardInterrupt: the model is left as found
(requires_grad, .grad, train/eval modes, hooks, no PEFT layer or attribute left; weights exactly,
or, once base weights were written in place, restored as W' + P Q: within one rounding)."""

import copy

import pytest
import torch

import peft

import fisher_kernels.pipeline.write as write
import fisher_kernels.adapters.base_weights as base_weights
import fisher_kernels.adapters.layers as adapter_layers
from conftest import assert_same_snapshot, snapshot
from fisher_kernels import init_lora
from tiny_models import make_model, make_samples, pad_batches


class Injected(Exception):
    pass


def failing_after(calls, fault, after_call=False):
    """A wrapper that lets ``calls`` calls through, then raises ``fault`` once (before the call,
    or right after it with ``after_call``); later calls (the clean-up's) go through."""
    def wrap(fn):
        count = {"n": 0}

        def run(*args, **kwargs):
            count["n"] += 1
            if count["n"] != calls + 1:
                return fn(*args, **kwargs)
            if after_call:
                fn(*args, **kwargs)
            raise fault("injected")
        return run
    return wrap


STAGES = {
    # where: (module, attribute, calls let through, raise after the call)
    "peft wrapping": (peft, "get_peft_model", 0, True),
    "adapter values": (adapter_layers, "_materialise_kasa_adapter", 2, False),
    "adapter snapshot": (write, "snapshot_adapter", 0, False),
    "base weights": (base_weights, "add_low_rank_", 3, False),
    "report": (write, "attach_report", 0, False),
}


# the stages each method goes through (LoRA-DA keeps W, only KaSA materialises adapters itself,
# only the residual methods snapshot the initial adapter)
METHOD_STAGES = {"filet": ["peft wrapping", "adapter snapshot", "base weights", "report"],
                 "kasa": ["peft wrapping", "adapter values", "base weights", "report"],
                 "lora_da": ["peft wrapping", "report"]}


@pytest.mark.parametrize("fault", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("method,stage", [(m, s) for m, stages in METHOD_STAGES.items() for s in stages])
def test_a_fault_after_the_pass_leaves_the_model_as_found(monkeypatch, stage, fault, method):
    module, attribute, calls, after_call = STAGES[stage]
    model = make_model("llama").train()
    model.model.layers[1].eval()  # mixed modes must survive
    model.lm_head.weight.requires_grad_(False)
    model.model.embed_tokens.weight.grad = torch.ones_like(model.model.embed_tokens.weight)
    batches = pad_batches(make_samples("llama", n=4), 2)
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    model.train()
    model.model.layers[1].eval()
    before, attributes = snapshot(model), set(vars(model))
    monkeypatch.setattr(module, attribute, failing_after(calls, fault, after_call)(getattr(module, attribute)))
    with pytest.raises(fault):
        init_lora(model, batches if method != "kasa" else None, method=method, r=2, progress=False)
    after = snapshot(model)
    written = stage in ("base weights", "report") and method != "lora_da"
    if written:  # W' = W − P Q was written in place, then W' + P Q
        for key, value in before["state"].items():
            assert torch.allclose(after["state"][key], value, rtol=0, atol=4 * torch.finfo(value.dtype).eps
                                  * max(1.0, value.abs().max().item())), key
        after["state"] = before["state"]
    assert_same_snapshot(before, after)
    assert set(vars(model)) == attributes
    assert not any("lora" in name for name, _ in model.named_modules())
    with torch.no_grad():
        got = copy.deepcopy(model).eval()(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5) if written else torch.equal(got, expected)


def test_ctrl_c_while_a_layer_is_written_is_held_until_it_is_recorded_then_undone(monkeypatch):
    import os
    import signal

    real = base_weights.add_low_rank_
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the second layer is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(base_weights, "add_low_rank_", interrupted)
    model = make_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        init_lora(model, pad_batches(make_samples("llama", n=4), 2), method="pissa", r=2, progress=False)
    assert calls["n"] >= 4  # two writes, then both undone
    for key, value in model.state_dict().items():
        assert torch.allclose(value, state[key], rtol=0, atol=1e-6), key


@pytest.mark.parametrize("method", ["filet", "pissa"])
def test_a_failed_init_of_a_bf16_model_restores_its_weights_through_the_row_blocks(monkeypatch, method):
    """bf16 weights are written and restored through fp32 row blocks (layers.UPDATE_ENTRIES): after a
    fault at the last stage every weight is back within one bf16 rounding of what it was."""
    from fisher_kernels import layers

    monkeypatch.setattr(layers, "UPDATE_ENTRIES", 24 * 5)  # 5 rows at a time: several blocks per weight
    model = make_model("llama").to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(write, "attach_report", failing_after(0, Injected)(write.attach_report))
    with pytest.raises(Injected):
        init_lora(model, pad_batches(make_samples("llama", n=4), 2) if method == "filet" else None, method=method,
                  r=2, progress=False)
    for key, value in model.state_dict().items():
        assert torch.allclose(value.float(), before[key].float(), rtol=2 ** -7, atol=1e-3), key
