"""The statistics cache and multi-pass runs refuse what would silently give wrong statistics:
any changed weight of the model (targets, embeddings, norms, head; one entry deep inside a layer),
a flipped bit or truncation in the file, a format this version does not read, a loader that
yields other batches in another pass."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fisher_kernels import KFACStatistics, collect_statistics, compute_initialization, full_statistics_requests
from tiny_models import make_model, make_samples, pad_batches


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_model("llama")
    stats = collect_statistics(model, pad_batches(make_samples("llama", n=6), 3), full_statistics_requests(model),
                               progress=False)
    path = tmp_path_factory.mktemp("cache") / "stats.safetensors"
    stats.save(path)
    return model, stats, path


CHANGES = {
    "one entry deep in a target weight": lambda m: m.model.layers[1].mlp.down_proj.weight.__setitem__((-1, -1), 0.5),
    "the input embedding": lambda m: m.model.embed_tokens.weight.__setitem__((7, 3), 0.25),
    "a norm": lambda m: m.model.layers[0].input_layernorm.weight.__setitem__(0, 1.5),
    "the output head": lambda m: m.lm_head.weight.__setitem__((-1, 0), 0.1),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_statistics_of_a_model_with_any_changed_weight_are_refused(saved, change):
    _, _, path = saved
    model = make_model("llama")
    KFACStatistics.load(path, model=model)  # the same model loads
    with torch.no_grad():
        CHANGES[change](model)
    with pytest.raises(ValueError, match="different model"):
        KFACStatistics.load(path, model=model)


def test_a_flipped_bit_and_a_truncated_file_are_named_in_one_line(saved, tmp_path):
    _, _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the last stored tensor
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped\.safetensors: tensor .* does not match its checksum") as err:
        KFACStatistics.load(flipped)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: cannot read it as a statistics file") as err:
        KFACStatistics.load(truncated)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="missing.safetensors: cannot read"):
        KFACStatistics.load(tmp_path / "missing.safetensors")


def test_another_format_is_refused_with_both_versions(tmp_path):
    old = tmp_path / "old.safetensors"
    save_file({"x": torch.zeros(2)}, str(old), metadata={"format": "fisher_kernels.statistics/1",
                                                          "package_version": "0.0.1", "layers": json.dumps([])})
    with pytest.raises(ValueError, match=r"written by fisher_kernels 0\.0\.1 in format 'fisher_kernels.statistics/1'"):
        KFACStatistics.load(old)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"format": "something/else"})
    with pytest.raises(ValueError, match="not a fisher_kernels statistics file"):
        KFACStatistics.load(other)


def test_a_loader_that_changes_between_passes_is_refused():
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=8), 2)

    class Reshuffled:
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.epoch)).tolist()
            self.epoch += 1
            return iter([batches[i] for i in order])

    with pytest.raises(ValueError, match="other batches in calibration pass 2 than in pass 1.*shuffle=False"):
        compute_initialization(model, Reshuffled(), method="lora_da", r=2, max_stats_memory=30_000, progress=False)
    # the same data in every pass is fine
    compute_initialization(model, batches, method="lora_da", r=2, max_stats_memory=30_000, progress=False)


@pytest.mark.parametrize("key", ["num_sequences", "num_tokens", "loss_units", "shared_input_factor"])
def test_a_flipped_bit_in_a_header_value_is_refused(saved, tmp_path, key):
    """A header count (e.g. the number of sequences, LoRA-DA's population) changed by one bit would
    load and change the initialisation: the header has its own checksum."""
    _, _, path = saved
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    header = data[8:8 + header_length]
    at = header.index(f'"{key}":"'.encode()) + len(key) + 4
    while not chr(header[at]).isdigit():  # the first digit of the value
        at += 1
    data[8 + at] ^= 0x01  # '2' <-> '3', '4' <-> '5', ...: still a valid number
    damaged = tmp_path / "header.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"header\.safetensors: its header does not match its checksum") as err:
        KFACStatistics.load(damaged)
    assert "\n" not in str(err.value)


def test_the_previous_format_without_a_header_checksum_is_refused_with_both_versions(saved, tmp_path):
    from safetensors import safe_open

    _, _, path = saved
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del metadata["header_checksum"]
    metadata["format"] = "fisher_kernels.statistics/2"
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=r"format 'fisher_kernels.statistics/2', which fisher_kernels .* does not read"):
        KFACStatistics.load(tmp_path / "v2.safetensors")


def test_a_failed_save_leaves_the_file_that_was_there(saved, tmp_path, monkeypatch):
    from fisher_kernels.statistics import cache

    _, stats, path = saved
    target = tmp_path / "stats.safetensors"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(cache, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        stats.save(target)
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]
