"""Typed option objects: one per method, the same fields and defaults as the method, and the same
result as loose keyword options."""

import dataclasses
import inspect

import pytest
import torch

import fisher_kernels.options as options_module
from fisher_kernels import FiletOptions, LoraDAOptions, MethodOptions, compute_initialization
from fisher_kernels.methods import METHODS
from tiny_models import make_model, make_samples, pad_batches


def test_every_method_has_an_options_class_with_its_fields_and_defaults():
    classes = {cls.method: cls for cls in vars(options_module).values()
               if isinstance(cls, type) and issubclass(cls, MethodOptions) and cls is not MethodOptions}
    assert set(classes) == set(METHODS)
    for name, cls in classes.items():
        expected = {p.name: p.default for p in inspect.signature(METHODS[name].__init__).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert {f.name: f.default for f in dataclasses.fields(cls)} == expected, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), next(iter(expected), "x"), None)


def test_an_options_object_gives_the_same_result_as_keywords_and_is_not_mixed_with_them():
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 2)
    typed = compute_initialization(model, batches, method=FiletOptions(energy="component"), r=2, progress=False)
    loose = compute_initialization(model, batches, method="filet", energy="component", r=2, progress=False)
    for name, init in loose.layers.items():
        assert torch.equal(typed.layers[name].selected, init.selected)
    assert typed.method == "filet" and typed.options["energy"] == "component"
    with pytest.raises(TypeError, match="either in LoraDAOptions or as keywords"):
        compute_initialization(model, batches, method=LoraDAOptions(), damping=1e-3, r=2, progress=False)
    with pytest.raises(TypeError, match="method must be a method name"):
        compute_initialization(model, batches, method=3, r=2, progress=False)
