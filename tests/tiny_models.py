"""Tiny models built from configs (no download) and padded calibration batches for them."""

from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, ViTConfig, ViTForImageClassification)

VOCAB = 61
HIDDEN = 24


def make_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(config)
    elif kind == "llama-wide":  # widths that bitsandbytes' CPU kernels take (multiples of 32): quantized tests
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(config)
    elif kind == "gpt2-wide":
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=0, eos_token_id=0, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
        model = GPT2LMHeadModel(config)
    elif kind == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=40, num_labels=3, max_position_embeddings=64)
        model = BertForSequenceClassification(config)
    elif kind == "vit":
        config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=40, num_labels=3)
        model = ViTForImageClassification(config)
    else:
        raise ValueError(kind)
    # larger than default init so that gradients and energies are well separated
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


def make_samples(kind: str, n: int = 5, seed: int = 1):
    """Unpadded samples: list of dicts for one sequence (or image) each, lengths differ."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        if kind == "vit":
            samples.append({"pixel_values": torch.randn(1, 3, 8, 8, generator=g),
                            "labels": torch.randint(0, 3, (1,), generator=g)})
            continue
        length = 4 + (3 * i) % 7
        ids = torch.randint(1, VOCAB, (1, length), generator=g)
        if kind == "bert":
            samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                            "labels": torch.randint(0, 3, (1,), generator=g)})
        else:
            samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return samples


def pad_batches(samples, batch_size: int, pad_id: int = 0):
    """Right-pad samples into batches; padded label positions are -100."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        if "pixel_values" in chunk[0]:
            batches.append({k: torch.cat([s[k] for s in chunk]) for k in chunk[0]})
            continue
        length = max(s["input_ids"].shape[1] for s in chunk)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for s in chunk:
            pad = length - s["input_ids"].shape[1]
            batch["input_ids"].append(torch.nn.functional.pad(s["input_ids"], (0, pad), value=pad_id))
            batch["attention_mask"].append(torch.nn.functional.pad(s["attention_mask"], (0, pad), value=0))
            labels = s["labels"]
            batch["labels"].append(torch.nn.functional.pad(labels, (0, pad), value=-100) if labels.dim() == 2 and labels.shape[1] > 1 else labels)
        batches.append({k: torch.cat(v) for k, v in batch.items()})
    return batches


def tiny_tokenizer():
    """A word-level tokenizer over the tiny model's vocabulary (``t0`` … ``t{VOCAB-1}``), built in memory
    (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", unk_token="t1")
