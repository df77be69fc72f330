"""Initialising an existing PeftModel adapter in place, and inside Trainer / TRL SFTTrainer runs
through FisherInitCallback (before the optimizer's first step, the optimizer keeping the same
parameters)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fisher_kernels import FisherInitCallback, compute_initialization, init_lora
from tiny_models import make_model, make_samples, pad_batches, tiny_tokenizer


def llama_batches(n=6, size=3):
    return pad_batches(make_samples("llama", n=n), size)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("method", ["filet", "lora_da", "lora_ga"])
def test_an_existing_adapter_is_initialised_in_place_and_others_are_untouched(method):
    model = make_model("llama")
    batches = llama_batches()
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])
    standalone = init_lora(copy.deepcopy(model), batches, method=method, lora_config=config, progress=False)
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "v_proj"],
                                               init_lora_weights=False))
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "other" in module.lora_B:
                module.lora_B["other"].weight.normal_()
    other_before = {n: p.clone() for n, p in peft_model.named_parameters() if ".other." in n}
    default_ids = {n: id(p) for n, p in peft_model.named_parameters() if ".default." in n}
    returned = init_lora(peft_model, batches, method=method, progress=False)
    assert returned is peft_model
    assert {n: id(p) for n, p in peft_model.named_parameters() if ".default." in n} == default_ids  # same Parameters
    for name, value in other_before.items():
        assert torch.equal(dict(peft_model.named_parameters())[name], value), name
    expected = dict(standalone.named_parameters())
    for name, p in peft_model.named_parameters():
        if ".default." in name:
            assert torch.allclose(p, expected[name], atol=1e-5), name
    if method != "lora_da":  # residual methods: the step-0 model is unchanged
        peft_model.set_adapter("default")
        assert torch.allclose(logits(peft_model, batches[0]), logits(model, batches[0]), atol=1e-5)


def test_existing_adapter_options_are_checked():
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter 'missing'"):
        init_lora(peft_model, llama_batches(), adapter_name="missing", progress=False)
    with pytest.raises(ValueError, match="r=4 disagrees"):
        init_lora(peft_model, llama_batches(), r=4, progress=False)
    with pytest.raises(ValueError, match="target_modules and lora_config must not be given"):
        init_lora(peft_model, llama_batches(), target_modules=["k_proj"], progress=False)
    with pytest.raises(ValueError, match="KaSA"):
        init_lora(peft_model, None, method="kasa", progress=False)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.rows = [{k: v[0] for k, v in s.items()} for s in samples]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    return pad_batches([{k: v[None] for k, v in r.items()} for r in rows], len(rows))[0]


def test_callback_initialises_the_adapter_in_a_trainer_before_the_first_step(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = make_model("llama")
    samples = make_samples("llama", n=8)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    seen = {}

    class FirstStep(TrainerCallback):  # what the optimizer's parameters hold when training starts
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == 0:
                seen["B"] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    callback = FisherInitCallback(method="filet", num_batches=2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, learning_rate=1e-3, save_strategy="no", logging_strategy="no",
                             gradient_checkpointing=True, remove_unused_columns=False)
    trainer = Trainer(model=peft_model, args=args, train_dataset=_Rows(samples), data_collator=_collate,
                      callbacks=[callback, FirstStep()])
    trainer.train()
    assert callback.report is not None and callback.report.num_batches == 2
    # the adapter the optimizer trained from is FILet's (nonzero B), computed on the trainer's first batches
    expected = compute_initialization(model, [_collate(_Rows(samples).rows[i:i + 4]) for i in (0, 4)],
                                      method="filet", r=2, scale=2.0, progress=False)
    assert any(b.abs().max() > 0 for b in seen["B"])
    init = expected.layers["model.layers.0.self_attn.q_proj"]
    assert any(p.shape == init.lora_A.shape and torch.allclose(p, init.lora_A, atol=1e-5) for p in seen["B"])
    assert trainer.model.get_base_model().is_gradient_checkpointing  # switched back on


def test_callback_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = make_model("llama")
    rows = [{"input_ids": s["input_ids"][0].tolist()} for s in make_samples("llama", n=8)]
    callback = FisherInitCallback(method="lora_ga", num_batches=2)
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                           use_cpu=True, save_strategy="no", logging_strategy="no", dataset_kwargs={"skip_prepare_dataset": True},
                           remove_unused_columns=False)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer(),
                             peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                             callbacks=[callback])
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    assert callback.report is not None and callback.report.method == "lora_ga"
    assert sorted(callback.report.target_modules)[0].endswith("q_proj.base_layer")


def test_an_adapter_initialised_once_is_not_initialised_again():
    """A second init_lora on the same adapter would overwrite a (possibly trained) adapter and subtract a
    second residual from the base: refused, the model untouched."""
    batches = llama_batches()
    peft_model = init_lora(make_model("llama"), batches, method="filet", r=2, target_modules=["q_proj"], progress=False)
    assert peft_model.fisher_kernels_initialized == {"default": "filet"}
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(ValueError, match="adapter 'default' was already initialised by fisher_kernels"):
        init_lora(peft_model, batches, method="filet", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())
    existing = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    init_lora(existing, batches, method="lora_ga", progress=False)
    with pytest.raises(ValueError, match="already initialised by fisher_kernels \\(lora_ga\\)"):
        init_lora(existing, batches, method="filet", progress=False)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_base_peft_already_replaced_is_refused(init):
    model = make_model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}', which already replaced the base weights"):
        init_lora(peft_model, llama_batches(), method="filet", progress=False)
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())


def test_adapter_name_on_a_base_model_is_refused_not_ignored():
    with pytest.raises(ValueError, match="adapter_name='mine' names an adapter of an existing PeftModel"):
        init_lora(make_model("llama"), llama_batches(), adapter_name="mine", progress=False)


def test_a_second_train_call_continues_from_the_trained_adapter(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    from fisher_kernels import api

    calls = []
    real = api.init_lora
    monkeypatch.setattr(api, "init_lora", lambda *a, **k: calls.append(k.get("method")) or real(*a, **k))
    samples = make_samples("llama", n=8)
    peft_model = get_peft_model(make_model("llama"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, learning_rate=1e-3, save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False)
    trainer = Trainer(model=peft_model, args=args, train_dataset=_Rows(samples), data_collator=_collate,
                      callbacks=[FisherInitCallback(method="filet", num_batches=2)])
    trainer.train()
    base = {n: p.clone() for n, p in peft_model.named_parameters() if "base_layer" in n}
    trained = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    trainer.train()  # starts at global_step 0 again
    assert calls == ["filet"]
    assert all(torch.equal(p, base[n]) for n, p in peft_model.named_parameters() if "base_layer" in n)
    assert any(not torch.equal(p, trained[n]) for n, p in peft_model.named_parameters() if "lora_" in n)  # trained on


def _checkpointing_trainer(tmp_path, peft_model, samples, callback, max_steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=max_steps,
                             report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="steps", save_steps=2,
                             logging_strategy="no", remove_unused_columns=False)
    return Trainer(model=peft_model, args=args, train_dataset=_Rows(samples), data_collator=_collate,
                   callbacks=[callback])


def test_a_resumed_residual_run_trains_on_the_residual_base_it_started(tmp_path):
    """The checkpoint holds the adapter only; the run's base was W − s·B₀A₀. Resuming on a fresh
    PeftModel of the original weights writes the residual again (from the checkpoint's
    fisher_kernels_residual.safetensors) before the first step: the resumed model equals the one
    checkpointed, where it used to be 0.18 off in its logits."""
    from fisher_kernels.integrations.callback import RESIDUAL_FILE

    samples = make_samples("llama", n=8)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])
    first = get_peft_model(make_model("llama"), copy.deepcopy(config))
    with pytest.warns(UserWarning, match="trainer.save_model\\(\\) writes is only right on that residual base"):
        _checkpointing_trainer(tmp_path, first, samples, FisherInitCallback(method="filet", num_batches=2), 2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / RESIDUAL_FILE).exists()
    batch = llama_batches()[0]
    trained = logits(first, batch)

    resumed = get_peft_model(make_model("llama"), copy.deepcopy(config))  # the original weights again
    assert not torch.allclose(logits(resumed, batch), trained, atol=1e-2)
    trainer = _checkpointing_trainer(tmp_path, resumed, samples, FisherInitCallback(method="filet", num_batches=2), 2)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert torch.allclose(logits(resumed, batch), trained, atol=1e-5)
    # resuming again on the same (now residual) model writes nothing twice
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert torch.allclose(logits(resumed, batch), trained, atol=1e-5)


def test_a_resumed_residual_run_without_its_residual_is_refused(tmp_path):
    from fisher_kernels.integrations.callback import RESIDUAL_FILE

    samples = make_samples("llama", n=8)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    first = get_peft_model(make_model("llama"), copy.deepcopy(config))
    _checkpointing_trainer(tmp_path, first, samples, FisherInitCallback(method="pissa", num_batches=1), 2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    (checkpoint / RESIDUAL_FILE).unlink()
    resumed = get_peft_model(make_model("llama"), copy.deepcopy(config))
    before = {n: p.clone() for n, p in resumed.named_parameters() if "base_layer" in n}
    trainer = _checkpointing_trainer(tmp_path, resumed, samples, FisherInitCallback(method="pissa"), 2)
    with pytest.raises(ValueError, match="trained against a residual base .* no fisher_kernels_residual.safetensors"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(p, before[n]) for n, p in resumed.named_parameters() if "base_layer" in n)
