"""PEFT options and data shapes a PEFT user passes: honoured, or refused before any work with the
reason and the fix."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from fisher_kernels import compute_initialization, init_lora
from tiny_models import make_model, make_samples, pad_batches


class CountingLoader:
    """A re-iterable loader that counts the batches it hands out (to prove no pass ran)."""

    def __init__(self, batches):
        self.batches, self.served = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.served += 1
            yield batch


def llama_batches():
    return pad_batches(make_samples("llama", n=6), 3)


def adapted(peft_model):
    return sorted(n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A"))


def test_exclude_modules_is_honoured():
    model = make_model("llama")
    config = LoraConfig(r=2, lora_alpha=2, exclude_modules=["k_proj", "down_proj"])
    peft_model = init_lora(model, llama_batches(), lora_config=config, progress=False)
    names = adapted(peft_model)
    assert names == sorted(peft_model.fisher_kernels_report.target_modules)
    assert names and not any(n.endswith(("k_proj", "down_proj")) for n in names)
    assert any(n.endswith("q_proj") for n in names)


def test_layers_to_transform_is_honoured_and_saved(tmp_path):
    model = make_model("llama")
    config = LoraConfig(r=2, lora_alpha=2, layers_to_transform=[1])
    peft_model = init_lora(model, llama_batches(), lora_config=config, progress=False)
    names = adapted(peft_model)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    assert adapted(reloaded) == names
    assert reloaded.peft_config["default"].layers_to_transform == [1]


def test_a_config_that_leaves_nothing_or_asks_for_another_init_is_refused_before_the_pass():
    loader = CountingLoader(llama_batches())
    with pytest.raises(ValueError, match="no target layer is left"):
        init_lora(make_model("llama"), loader, lora_config=LoraConfig(r=2, layers_to_transform=[7]), progress=False)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*method='pissa'"):
        init_lora(make_model("llama"), loader, method="filet",
                  lora_config=LoraConfig(r=2, init_lora_weights="pissa"), progress=False)
    with pytest.raises(ValueError, match="init_lora_weights=False"):
        init_lora(make_model("llama"), loader, lora_config=LoraConfig(r=2, init_lora_weights=False), progress=False)
    assert loader.served == 0


def test_a_classification_head_is_trained_in_full_without_a_task_type():
    model = make_model("bert")
    peft_model = init_lora(model, pad_batches(make_samples("bert", n=6), 3), r=2, progress=False)
    assert not any(n.startswith("classifier") for n in peft_model.fisher_kernels_report.target_modules)
    head = [p for n, p in peft_model.named_parameters() if "classifier" in n and "modules_to_save" in n]
    assert head and all(p.requires_grad for p in head)
    # an explicit choice is kept
    config = LoraConfig(r=2, lora_alpha=2, modules_to_save=[])
    frozen = init_lora(make_model("bert"), pad_batches(make_samples("bert", n=6), 3), lora_config=config,
                       progress=False)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if "classifier" in n)


def as_examples(samples, tensors=False):
    rows = []
    for s in samples:
        row = {k: v[0] for k, v in s.items()}
        rows.append(row if tensors else {k: v.tolist() for k, v in row.items()})
    return rows


@pytest.mark.parametrize("container", ["list_of_lists", "list_of_tensors", "dataset"])
def test_unbatched_examples_are_padded_into_batches(container):
    samples = make_samples("llama", n=10)
    if container == "dataset":
        datasets = pytest.importorskip("datasets")
        examples = datasets.Dataset.from_list(as_examples(samples))
    else:
        examples = as_examples(samples, tensors=container == "list_of_tensors")
    model = make_model("llama")
    got = compute_initialization(model, examples, method="lora_ga", r=2, progress=False)
    expected = compute_initialization(model, pad_batches(samples, 8), method="lora_ga", r=2, progress=False)
    for name, init in expected.layers.items():
        assert torch.allclose(got.layers[name].lora_A, init.lora_A, atol=1e-6), name


def test_single_examples_as_batches_and_raw_text_get_a_clear_error():
    model = make_model("llama")
    one_by_one = iter(as_examples(make_samples("llama", n=2)))  # a generator of examples cannot be regrouped
    with pytest.raises(TypeError, match="single unbatched example.*DataCollatorWithPadding"):
        init_lora(model, one_by_one, r=2, progress=False)
    with pytest.raises(ValueError, match="raw 'text'.*tokenise"):
        init_lora(model, [{"text": "hello"}], r=2, progress=False)


def test_a_loss_fn_that_returns_a_mean_is_refused_on_the_first_batch():
    model = make_model("llama")
    batches = llama_batches()

    def causal_ce(reduction):
        def loss_fn(outputs, labels):
            logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
            return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction=reduction)
        return loss_fn

    with pytest.raises(ValueError, match="the mean over the batch's .* labels.*reduction='sum'"):
        init_lora(copy.deepcopy(model), batches, r=2, loss_fn=causal_ce("mean"), progress=False)
    init_lora(copy.deepcopy(model), batches, r=2, loss_fn=causal_ce("sum"), progress=False)
