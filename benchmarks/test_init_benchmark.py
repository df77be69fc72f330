"""pytest-benchmark view of the init-time suite (tiny Llama; for the real shapes use the script).

    python -m pytest benchmarks/test_init_benchmark.py --benchmark-columns=median,iqr,rounds

Not part of the test suite (``testpaths = tests``): timings are benchmarks, not tests.
"""

import copy

import pytest
import torch

from benchmarks.models import PRESETS, build_model, calibration_batches, target_module_names
from fisher_kernels import init_lora

PRESET = PRESETS["smoke"]


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    return build_model(PRESET), calibration_batches(PRESET)


def plain_forward_backward(model, batches):
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()


@pytest.mark.parametrize("method,options", [
    ("filet", {"route": "projected"}), ("filet", {"route": "full"}), ("lora_da", {}), ("lora_ga", {}),
    ("pissa", {}), ("kasa", {}), ("gaussian", {}),
])
def test_init_time(benchmark, model_and_data, method, options):
    model, batches = model_and_data
    benchmark.group = "init_lora, preset smoke"
    benchmark.pedantic(lambda m: init_lora(m, batches, method=method, r=PRESET["r"],
                                           target_modules=target_module_names(PRESET), progress=False, **options),
                       setup=lambda: ((copy.deepcopy(model),), {}), rounds=5)


def test_plain_forward_backward(benchmark, model_and_data):
    model, batches = model_and_data
    benchmark.group = "init_lora, preset smoke"
    benchmark.pedantic(plain_forward_backward, setup=lambda: ((copy.deepcopy(model), batches), {}), rounds=5)
