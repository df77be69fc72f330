"""Stage 1 (``make_plan``): checks and decisions before any work, carried in the Plan."""

import pytest
import torch

from conftest import assert_same_snapshot, snapshot
from fisher_kernels import Calibration, Resources, init_lora
from fisher_kernels.pipeline import make_plan, plan_layer_groups
from tiny_models import make_model, make_samples, pad_batches


def _plan(model, data, **overrides):
    settings = dict(method="filet", r=2, scale=1.0, target_modules=None, method_options={},
                    calibration=Calibration(), resources=Resources(progress=False), statistics=None)
    settings.update(overrides)
    return make_plan(model, data, **settings)


def test_a_plan_decides_groups_and_workers_and_touches_nothing():
    model = make_model("llama")
    data = pad_batches(make_samples("llama", n=4), 2)
    before = snapshot(model)
    whole = _plan(model, data)
    assert whole.groups == [whole.names] and whole.needs_pass and not whole.split and whole.world == 1
    assert whole.report.memory_plan.startswith("planned: ") and "whole batches, 1 calibration pass" in \
        whole.report.memory_plan  # the default: planned from the free memory, which here holds everything
    budget = 3 * max(whole.method.held_bytes(*whole.weights[n].shape, whole.weights[n].dtype) for n in whole.names)
    grouped = _plan(model, data, resources=Resources(max_stats_memory=budget, progress=False))
    assert len(grouped.groups) > 1 and sum(grouped.groups, []) == grouped.names
    assert f"{len(grouped.groups)} calibration passes" in grouped.report.memory_plan
    assert_same_snapshot(before, snapshot(model))


def test_groups_are_consecutive_and_fit():
    assert plan_layer_groups({"a": 3, "b": 3, "c": 5}, 6) == [["a", "b"], ["c"]]
    assert plan_layer_groups({"a": 3, "b": 3}, None) == [["a", "b"]]
    with pytest.raises(ValueError, match="layer 'c' alone needs 7 bytes"):
        plan_layer_groups({"a": 3, "c": 7}, 6)


def test_a_weight_only_method_plans_no_pass_and_needs_no_data():
    plan = _plan(make_model("llama"), None, method="pissa")
    assert not plan.needs_pass and plan.report.memory_plan == "no calibration pass"


def test_one_parameter_from_init_lora_to_the_pass():
    """``micro_batch_size`` given to init_lora reaches the pass through Calibration and the Plan: each batch
    of 2 runs as 2 forwards (plus the one-sequence check of the model's own loss on the first batch)."""
    data = pad_batches(make_samples("llama", n=4), 2)
    counts = {}
    for micro in (None, 1):
        model = make_model("llama")
        calls = []
        model.register_forward_pre_hook(  # real batches only (the memory plan's estimate runs on meta tensors)
            lambda module, args, kwargs: calls.append(1) if kwargs["input_ids"].device.type != "meta" else None,
            with_kwargs=True)
        init_lora(model, data, r=2, calibration=Calibration(micro_batch_size=micro), progress=False)
        counts[micro] = len(calls)
    assert counts == {None: 2 + 1, 1: 4 + 1}


def test_settings_given_as_keywords_equal_the_grouped_ones():
    data = pad_batches(make_samples("llama", n=4), 2)
    a = init_lora(make_model("llama"), data, r=2, num_batches=1, progress=False)
    b = init_lora(make_model("llama"), data, r=2, calibration=Calibration(num_batches=1),
                  resources=Resources(progress=False))
    assert a.fisher_kernels_report.num_batches == b.fisher_kernels_report.num_batches == 1
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
