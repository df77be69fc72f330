"""Property: a write that fails at any step (a rename, a file write) leaves every directory and file on
disk exactly as it was, and leaves no temporary behind; one that succeeds leaves the whole result."""

import os

import pytest
import safetensors.torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisher_kernels import init_lora, save_as_plain_lora, save_residual_model
from tiny_models import make_model, make_samples, pad_batches


class Fault(RuntimeError):
    pass


def _tree(root) -> dict:
    """Every file under ``root``: its path and its bytes."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


_MODEL = {}


def _peft_model():
    if "model" not in _MODEL:
        _MODEL["model"] = init_lora(make_model("llama"), pad_batches(make_samples("llama", n=4), 2), method="filet",
                                    r=2, progress=False)
    return _MODEL["model"]


def _fail_at(monkeypatch, step: int) -> list[int]:
    """Every rename, replace, link and safetensors write counted; the ``step``-th raises."""
    calls = [0]

    def counted(original):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                raise Fault(f"injected at step {step}")
            return original(*args, **kwargs)
        return wrapper

    for module, name in ((os, "rename"), (os, "replace"), (os, "link"), (safetensors.torch, "save_file")):
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    return calls


WRITES = {
    "save_residual_model": lambda model, root: save_residual_model(model, root / "adapter", root / "base"),
    "save_as_plain_lora": lambda model, root: save_as_plain_lora(model, root / "adapter"),
    "statistics cache": lambda model, root: model.fisher_kernels_statistics.save(root / "adapter" / "stats.safetensors"),
    "report": lambda model, root: model.fisher_kernels_report.save(root / "adapter" / "report.json"),
}


@pytest.mark.parametrize("write", list(WRITES))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(step=st.integers(1, 12), existing=st.booleans())
def test_a_write_that_fails_at_any_step_leaves_the_disk_as_it_was(write, step, existing, tmp_path_factory):
    import torch

    from fisher_kernels import KFACStatistics, StatisticsRequest, collect_statistics

    model = _peft_model()
    if not hasattr(model, "fisher_kernels_statistics"):
        base = make_model("llama")
        stats = collect_statistics(base, pad_batches(make_samples("llama", n=2), 2),
                                   {"model.layers.0.mlp.up_proj": StatisticsRequest(input_factor=True)}, progress=False)
        assert isinstance(stats, KFACStatistics)
        model.fisher_kernels_statistics = stats
    root = tmp_path_factory.mktemp("disk")
    if existing:  # a previous result in place, and a file of the user's beside it
        for folder in ("adapter", "base"):
            (root / folder).mkdir()
            (root / folder / "notes.txt").write_text("mine")
            (root / folder / "adapter_config.json").write_text("{}")
        (root / "adapter" / "stats.safetensors").write_bytes(b"old")
        (root / "adapter" / "report.json").write_text("old")
    before = _tree(root)
    with pytest.MonkeyPatch.context() as patch:
        calls = _fail_at(patch, step)
        try:
            WRITES[write](model, root)
            failed = False
        except Fault:
            failed = True
    after = _tree(root)
    leftovers = [p for p in os.listdir(root) if ".partial" in p or ".replaced" in p]
    assert not leftovers, leftovers
    for folder in ("adapter", "base"):
        if (root / folder).exists():
            assert not [p for p in os.listdir(root / folder) if ".partial" in p], folder
    if failed:
        assert after == before, sorted(set(after) ^ set(before)) or "contents changed"
    else:
        assert calls[0] < step
        changed = {k for k in after if before.get(k) != after[k]}
        assert changed, "nothing written"
        if existing:
            assert after["adapter/notes.txt"] == b"mine"  # the user's own file stays
    del torch
