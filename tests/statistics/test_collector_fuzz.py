"""Hypothesis fuzzing of batch shapes, masks (all-masked batches included) and dtypes against
statistics computed directly from the definition."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisher_kernels import StatisticsRequest, collect_statistics


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(5, 7)
        self.second = torch.nn.Linear(7, 3)

    def forward(self, x, attention_mask=None):
        return self.second(torch.tanh(self.first(x)))


def summed_ce(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs.reshape(-1, 3).float(), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")


@st.composite
def batches(draw):
    n_batches = draw(st.integers(1, 3))
    out = []
    for i in range(n_batches):
        b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
        mask = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        x = torch.randn(b, t, 5, generator=g)
        y = torch.randint(0, 3, (b, t), generator=g).masked_fill(~mask, -100)
        out.append((x, mask, y))
    return out


def expected(model, data, dtype):
    """A, G of both layers straight from the definition, in float64."""
    sums = {n: [0, 0, 0] for n in ("first", "second")}
    for x, mask, y in data:
        x = x.to(dtype)
        h = model.first(x)
        h.retain_grad()
        out = model.second(torch.tanh(h))
        out.retain_grad()
        summed_ce(out, y).backward()
        m = mask.reshape(-1)
        for name, inp, grad in (("first", x, h.grad), ("second", torch.tanh(h).detach(), out.grad)):
            xi = inp.reshape(-1, inp.shape[-1]).double()[m]
            gi = grad.reshape(-1, grad.shape[-1]).double()[m]
            sums[name][0] = sums[name][0] + xi.T @ xi
            sums[name][1] = sums[name][1] + gi.T @ gi
            sums[name][2] += int(m.sum())
    model.zero_grad()
    return {n: (A / count, G / count, count) for n, (A, G, count) in sums.items() if count}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=batches(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fuzzed_batches_match_the_definition(data, dtype):
    model = TwoLayer().to(dtype)
    loader = [({"x": x.to(dtype), "attention_mask": mask}, y) for x, mask, y in data]
    requests = {n: StatisticsRequest(input_factor=True, output_factor=True) for n in ("first", "second")}
    total = sum(int(mask.sum()) for _, mask, _ in data)
    if total == 0:
        with pytest.raises(ValueError, match="saw no counted token"):
            collect_statistics(model, loader, requests, loss_fn=summed_ce, progress=False)
        return
    stats = collect_statistics(model, loader, requests, loss_fn=summed_ce, progress=False)
    model_requires = [p.requires_grad for p in model.parameters()]
    assert all(model_requires)  # left as found
    want = expected(model, data, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, (A, G, count) in want.items():
        assert stats[name].num_tokens == count
        for got, ref in ((stats[name].input_factor, A), (stats[name].output_factor, G)):
            scale = max(ref.abs().max().item(), 1e-12)
            assert (got.double() - ref).abs().max().item() <= tol * scale, (name, dtype)
