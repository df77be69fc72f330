"""Every common model family, built tiny from its config: the initialised model computes what the
original did at step 0, saves and reloads as plain PEFT + residual base, and the statistics do not
depend on padding or batching (decoder sides, flattened token layouts and cross-attention included)."""

import copy

import pytest
import torch
import transformers as T
from peft import PeftModel

from fisher_kernels import collect_statistics, full_statistics_requests, init_lora, save_residual_model

V, H = 53, 16
LLAMA_LIKE = dict(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def causal(config_cls, model_cls, **extra):
    return lambda: model_cls(config_cls(**{**LLAMA_LIKE, **extra}))


FAMILIES = {
    "mistral": causal(T.MistralConfig, T.MistralForCausalLM),
    "qwen2": causal(T.Qwen2Config, T.Qwen2ForCausalLM),
    "qwen3": causal(T.Qwen3Config, T.Qwen3ForCausalLM, head_dim=4),
    "gemma": causal(T.GemmaConfig, T.GemmaForCausalLM, head_dim=4),
    "gemma2": causal(T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=4),
    "phi3": causal(T.Phi3Config, T.Phi3ForCausalLM, pad_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=V, hidden_size=H, intermediate_size=32,
                                                             num_hidden_layers=2, num_attention_heads=4)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2,
                                                         num_attention_heads=4)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=32, num_hidden_layers=2,
                                                num_attention_heads=4, word_embed_proj_dim=H)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=H, d_kv=4, d_ff=32, num_layers=2,
                                                          num_heads=4, decoder_start_token_id=0, pad_token_id=0)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)),
    "whisper": lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=V, num_mel_bins=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, d_model=H, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=12,
        max_target_positions=16, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
        num_labels=3, max_position_embeddings=64)),
}
SEQ2SEQ = {"t5", "bart", "whisper"}


def samples(kind, n=5, seed=0):
    """Unpadded samples, one sequence each: sources and targets of different, unequal lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        source_len, target_len = 4 + (3 * i) % 6, 2 + (2 * i) % 5
        ids = torch.randint(3, V, (1, source_len), generator=g)
        if kind == "roberta":
            out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                            labels=torch.randint(0, 3, (1,), generator=g)))
        elif kind == "whisper":
            out.append(dict(input_features=torch.randn(1, 8, 24, generator=g),
                            labels=torch.randint(3, V, (1, target_len), generator=g)))
        elif kind in SEQ2SEQ:
            out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                            labels=torch.randint(3, V, (1, target_len), generator=g)))
        else:
            out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone()))
    return out


def pad(chunk):
    """Right-pad a list of samples into one batch (pad id 1, labels -100)."""
    batch = {}
    for key in chunk[0]:
        values = [s[key] for s in chunk]
        if key == "input_features" or values[0].dim() == 1:
            batch[key] = torch.cat(values)
            continue
        length = max(v.shape[1] for v in values)
        fill = {"labels": -100, "attention_mask": 0}.get(key, 1)
        batch[key] = torch.cat([torch.nn.functional.pad(v, (0, length - v.shape[1]), value=fill) for v in values])
    return batch


def batches(kind, size=3):
    data = samples(kind)
    return [pad(data[i:i + size]) for i in range(0, len(data), size)]


def model_inputs(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if model.config.is_encoder_decoder:
        labels = batch["labels"].masked_fill(batch["labels"] == -100, 0)
        shifted = torch.full_like(labels, model.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        inputs["decoder_input_ids"] = shifted
    return inputs


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_family_initialises_keeps_step0_outputs_and_reloads(kind, tmp_path):
    torch.manual_seed(0)
    model = FAMILIES[kind]().eval()
    original = copy.deepcopy(model)
    data = batches(kind)
    inputs = model_inputs(model, data[0])
    with torch.no_grad():
        expected = model(**inputs).logits
    peft_model = init_lora(model, data, method="filet", r=2, progress=False)
    with torch.no_grad():
        got = peft_model(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item())), kind
    names = peft_model.fisher_kernels_report.target_modules
    if kind in SEQ2SEQ:
        assert any("decoder" in n for n in names) and any("encoder" in n for n in names)
    if kind == "roberta":  # the classification head is left out of the targets and trained in full
        assert not any(n.startswith("classifier") for n in names)
        assert all(p.requires_grad for n, p in peft_model.named_parameters() if "classifier" in n and "modules_to_save" in n)
    save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "base")
    reloaded = PeftModel.from_pretrained(type(original).from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, got, atol=1e-5 * max(1.0, got.abs().max().item())), kind


@pytest.mark.parametrize("kind", ["opt", "t5", "bart", "whisper"])
def test_statistics_do_not_depend_on_padding_or_batching(kind):
    """Padded batches of 3 (sources and targets padded to different lengths) give the statistics
    of the same samples run one at a time unpadded: every layer counts exactly its own side's
    real positions, decoder layers the label positions, cross-attention keys/values the source."""
    torch.manual_seed(0)
    model = FAMILIES[kind]().eval()
    requests = full_statistics_requests(model)
    padded = collect_statistics(model, batches(kind), requests, progress=False)
    singles = collect_statistics(model, [pad([s]) for s in samples(kind)], requests, progress=False)
    for name, layer in padded.layers.items():
        other = singles[name]
        assert layer.num_tokens == other.num_tokens, name
        for field, tensor in layer.tensors().items():
            ref = other.tensors()[field]
            assert torch.allclose(tensor, ref, atol=1e-5 * max(1.0, ref.abs().max().item())), (name, field)


def test_mixtral_fused_experts_are_named_in_a_warning_and_the_rest_is_initialised():
    model = T.MixtralForCausalLM(T.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)).eval()
    data = batches("mistral")
    with pytest.warns(UserWarning, match=r"mixture-of-experts weights are fused 3-D parameters \(model\.layers\.0\.mlp"):
        peft_model = init_lora(model, data, method="filet", r=2, progress=False)
    assert all(n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in peft_model.fisher_kernels_report.target_modules)
    # the same layers as PEFT's own "all-linear", which leaves the fused experts out too
    from peft import LoraConfig, get_peft_model

    fresh = T.MixtralForCausalLM(T.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2))
    peft_targets = get_peft_model(fresh, LoraConfig(r=2, target_modules="all-linear")).peft_config["default"]
    assert {n.rsplit(".", 1)[-1] for n in peft_model.fisher_kernels_report.target_modules} == set(
        peft_targets.target_modules)


def test_fused_experts_named_in_target_parameters_get_peft_adapters_with_a_warning_saying_which_init():
    from peft import LoraConfig

    torch.manual_seed(0)
    model = T.MixtralForCausalLM(T.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)).eval()
    data = batches("mistral")
    with torch.no_grad():
        before = model(**{k: v for k, v in data[0].items() if k != "labels"}).logits
    config = LoraConfig(r=2, lora_alpha=2, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    with pytest.warns(UserWarning, match=r"target_parameters=.*default initialisation.*method='filet'") as caught:
        peft_model = init_lora(model, data, method="filet", r=2, lora_config=config, progress=False)
    assert not any("stay without adapters" in str(w.message) for w in caught)  # they do get adapters
    wrapped = [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"]
    assert wrapped and all(not m.lora_B["default"].weight.detach().any() for m in wrapped)
    with torch.no_grad():
        after = peft_model(**{k: v for k, v in data[0].items() if k != "labels"}).logits
    assert torch.allclose(before, after, atol=1e-5)  # FILet's residual layers and the zero-B experts: unchanged
