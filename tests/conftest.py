import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (tiny_models, brute_force)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))  # build_cuda, sass
if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def snapshot(model):
    """Everything a failed init must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "modules": [n for n, _ in model.named_modules()],
    }


def assert_same_snapshot(before, after):
    assert before["modules"] == after["modules"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for k, v in before["grad"].items():
        w = after["grad"][k]
        assert (v is None and w is None) or torch.equal(v, w), k


@pytest.fixture
def model_snapshot():
    return snapshot, assert_same_snapshot
