"""Every model shape the benchmarks use (one table), random-weight models built from it (no
download; on the ``meta`` device for estimates) and calibration data for them."""

from __future__ import annotations

import torch

PRESETS = {
    # name: model shape, calibration set, rank; "cpu" is the goal configuration of the suite
    "smoke": dict(kind="llama", hidden=64, layers=2, intermediate=176, vocab=512, heads=4, kv_heads=2,
                  samples=16, seq_len=32, batch_size=8, r=4),
    "cpu": dict(kind="llama", hidden=1024, layers=2, intermediate=2816, vocab=8192, heads=16, kv_heads=4,
                samples=256, seq_len=128, batch_size=8, r=16),
    "gpt2": dict(kind="gpt2", hidden=768, layers=12, intermediate=3072, vocab=50257, heads=12, kv_heads=12,
                 samples=256, seq_len=128, batch_size=8, r=16),
    "llama-1b": dict(kind="llama", hidden=2048, layers=16, intermediate=8192, vocab=128256, heads=32, kv_heads=8,
                     samples=256, seq_len=512, batch_size=8, r=32),
    # benchmarks.memory: peaks above the model on the CPU (blocks set per row)
    "memory": dict(kind="llama", hidden=1024, layers=4, intermediate=2816, vocab=8192, heads=16, kv_heads=4,
                   samples=8, seq_len=128, batch_size=4, r=16),
    # benchmarks.pass_cost: Llama-3's vocabulary, where the loss dominates a batch's operator calls
    "pass-cost": dict(kind="llama", hidden=256, layers=2, intermediate=512, vocab=128256, heads=4, kv_heads=2,
                      samples=4, seq_len=64, batch_size=4, r=8),
    # published Llama-3 shapes (estimates on the meta device; gpu_memory builds a few blocks of the 8B)
    "llama-3-8b": dict(kind="llama", hidden=4096, layers=32, intermediate=14336, vocab=128256, heads=32, kv_heads=8,
                       samples=16, seq_len=512, batch_size=8, r=16),
    "llama-3-70b": dict(kind="llama", hidden=8192, layers=80, intermediate=28672, vocab=128256, heads=64, kv_heads=8,
                        samples=16, seq_len=512, batch_size=8, r=16),
}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(preset: dict, seed: int = 0, dtype=torch.float32, device="cpu"):
    """The preset's model with random weights, built on ``device`` (``"meta"``: no weights)."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device: much faster for large models on a GPU
        model = _make(preset)
    return model.to(dtype=dtype).eval()


def _make(preset: dict):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if preset["kind"] == "llama":
        config = LlamaConfig(vocab_size=preset["vocab"], hidden_size=preset["hidden"],
                             intermediate_size=preset["intermediate"], num_hidden_layers=preset["layers"],
                             num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
                             max_position_embeddings=max(8192 if preset["hidden"] >= 4096 else 2048, preset["seq_len"]))
        return LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=preset["vocab"], n_embd=preset["hidden"], n_layer=preset["layers"],
                            n_head=preset["heads"], n_inner=preset["intermediate"],
                            n_positions=max(1024, preset["seq_len"]))
        return GPT2LMHeadModel(config)


def calibration_batches(preset: dict, seed: int = 1, device="cpu"):
    """Batches of random token sequences with a padded tail on every other sequence."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    n, L, bs = preset["samples"], preset["seq_len"], preset["batch_size"]
    for start in range(0, n, bs):
        size = min(bs, n - start)
        ids = torch.randint(0, preset["vocab"], (size, L), generator=g)
        mask = torch.ones(size, L, dtype=torch.long)
        mask[1::2, L - L // 8:] = 0
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                        "labels": ids.masked_fill(mask == 0, -100).to(device)})
    return batches


def target_module_names(preset: dict) -> list[str]:
    """All linear layers of the transformer blocks (the suite's "all linear layers")."""
    if preset["kind"] == "llama":
        return list(LLAMA_TARGETS)
    return ["c_attn", "c_proj", "c_fc"]


def training_copy(model, frozen: bool = False):
    """A copy of ``model`` for one ordinary training forward+backward, the baseline every pass is
    compared with; ``frozen``: parameters without gradients and the input embeddings' output made to
    require one (what a calibration pass differentiates)."""
    import copy

    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    return model
