"""What a calibration batch costs, counted (no timing): operator calls (kernel launches on a GPU)
and host synchronisations, against one training forward+backward of the same batch, at Llama-3's
128,256-token vocabulary (where the loss dominates); the chunked loss; deferred reads."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks import pass_cost
from fisher_kernels import StatisticsRequest, collect_statistics
from fisher_kernels.statistics import losses as losses_module
from tiny_models import make_model, make_samples, pad_batches

PRESET = dict(pass_cost.PRESET, hidden=64, intermediate=96)


@pytest.fixture(scope="module")
def llama_128k():
    torch.manual_seed(0)
    model = pass_cost.build(PRESET)
    batch = pass_cost.batches_for(PRESET, 1)[0]
    return model, pass_cost.training_step_cost(model, batch)


@pytest.mark.parametrize("method", ["filet", "filet_full", "lora_ga", "lora_da"])
def test_a_calibration_batch_costs_at_most_1_3_training_steps_and_no_sync_of_its_own(llama_128k, method):
    model, training = llama_128k
    assert training.syncs == 2  # the model's own (Llama's mask and position code)
    row = pass_cost.per_batch(model, PRESET, method)
    assert row["calls"] <= 1.3 * training.calls, (row["calls"], training.calls, row["top_ops"])
    assert row["syncs"] <= training.syncs + 1, row["syncs_by_op"]


def test_the_counter_sees_launches_and_syncs():
    """The instrument itself: a known sequence of operators and host reads."""
    x = torch.ones(4)
    with pass_cost.Counted() as counted:
        y = (x * 2).sum()
        y.item()
        bool(y > 0)
        (x > 0).nonzero()
        x.tolist()
    assert counted.syncs == 4
    assert counted.by_op["mul"] == 1 and counted.by_op["sum"] == 1 and counted.by_op["gt"] == 2


def test_the_loss_makes_no_autograd_call_per_chunk_and_chunking_changes_no_gradient(monkeypatch):
    model = make_model("llama")
    data = pad_batches(make_samples("llama", n=6), 3)
    name = "model.layers.1.mlp.down_proj"
    request = {name: StatisticsRequest(output_factor=True, gradient=True)}
    whole = collect_statistics(model, data, request, progress=False)
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    monkeypatch.setattr(losses_module, "CHUNK_ELEMENTS", 2 * 61)  # two rows a chunk: many chunks a batch
    chunked = collect_statistics(model, data, request, progress=False)
    assert calls == []
    assert torch.equal(chunked[name].output_factor, whole[name].output_factor)
    assert torch.equal(chunked[name].gradient, whole[name].gradient)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_cross_entropy_equals_torch_in_value_and_gradient(dtype, monkeypatch):
    torch.manual_seed(0)
    logits = (torch.randn(40, 97) * 3).to(dtype)
    labels = torch.randint(0, 97, (40,))
    labels[[2, 9, 30]] = -100
    weights = torch.rand(40).masked_fill(labels == -100, 0)
    expected_logits = logits.clone().requires_grad_(True)
    expected = (F.cross_entropy(expected_logits.float(), labels, reduction="none") * weights).sum()
    (expected * 3).backward()
    for chunk in (2**24, 5 * 97):
        monkeypatch.setattr(losses_module, "CHUNK_ELEMENTS", chunk)
        ours_logits = logits.clone().requires_grad_(True)
        loss = losses_module.weighted_cross_entropy(ours_logits, labels, weights)
        (loss * 3).backward()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-5)
        assert ours_logits.grad.dtype == dtype
        torch.testing.assert_close(ours_logits.grad, expected_logits.grad)
        assert not ours_logits.grad[[2, 9, 30]].any()  # ignored rows: no gradient
    with torch.no_grad():  # no gradient wanted: none computed, the same value
        torch.testing.assert_close(losses_module.weighted_cross_entropy(logits, labels, weights), expected.detach(),
                                   rtol=1e-6, atol=1e-5)


def test_a_non_finite_loss_in_a_later_batch_is_named_after_the_pass():
    model = make_model("llama")
    data = pad_batches(make_samples("llama", n=6), 2)
    seen = []

    def loss_fn(outputs, labels):
        seen.append(1)
        loss = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, 61), labels[:, 1:].reshape(-1), reduction="sum")
        return loss * float("nan") if len(seen) == 3 else loss

    request = {"model.layers.0.mlp.up_proj": StatisticsRequest(output_factor=True)}
    with pytest.raises(ValueError, match="batch 2: the loss is not finite"):
        collect_statistics(model, data, request, loss_fn=loss_fn, progress=False)


def test_token_counts_read_at_the_end_equal_the_masks():
    model = make_model("llama")
    data = pad_batches(make_samples("llama", n=5), 2)
    request = {"model.layers.0.self_attn.q_proj": StatisticsRequest(input_factor=True),
               "model.layers.0.mlp.down_proj": StatisticsRequest(output_factor=True)}
    stats = collect_statistics(model, data, request, progress=False)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    assert {n: stats[n].num_tokens for n in request} == {n: tokens for n in request}
    labels = collect_statistics(model, data, request, token_mask="labels", progress=False)
    counted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    assert {n: labels[n].num_tokens for n in request} == {n: counted for n in request}
    assert labels.loss_units == counted


def test_filet_copies_each_full_precision_basis_to_the_host_without_waiting(monkeypatch):
    """On a GPU model FILet keeps each layer's float64 basis in host memory; the copy must be
    asynchronous (pinned memory), so that the next layer's decomposition is queued at once."""
    from torch.overrides import TorchFunctionMode

    from fisher_kernels import compute_initialization
    from fisher_kernels.methods import filet

    class HostCopies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") == "to" and "cpu" in [str(a) for a in args[1:]] + [str(kwargs.get("device"))]:
                self.copies.append(kwargs.get("non_blocking", False))
            return func(*args, **kwargs)

    model = make_model("llama").to(torch.bfloat16)
    monkeypatch.setattr(filet.FILet, "_keeps_exact_on_host", staticmethod(lambda W: True))
    method = filet.FILet(3, 1.0)
    spy = HostCopies()
    with spy:
        method.prepare("layer", model.model.layers[0].mlp.down_proj.weight.detach())
    assert spy.copies == [True]
    assert "layer" in method._exact_on_host
    compute_initialization(model, pad_batches(make_samples("llama", n=2), 2), method="filet", r=3, progress=False)
