import pytest
import torch

from brute_force import brute_force_statistics
from fisher_kernels import StatisticsRequest, collect_statistics, resolve_target_modules
from fisher_kernels.layers import layer_dims
from tiny_models import make_model, make_samples, pad_batches

KINDS = ["llama", "gpt2", "bert", "vit"]


def full_requests(model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    requests = {}
    for name in names:
        d_out, d_in = layer_dims(model.get_submodule(name))
        requests[name] = StatisticsRequest(
            input_factor=True, output_factor=True, output_factor_diag=True, gradient=True,
            input_basis=torch.randn(d_in, 5, generator=g), output_basis=torch.randn(d_out, 3, generator=g))
    return requests


def close(actual, expected, rtol=1e-4):
    actual = actual.double()
    scale = expected.abs().max().clamp_min(1e-12)
    return (actual - expected).abs().max().item() <= rtol * scale.item()


@pytest.mark.parametrize("kind", KINDS)
def test_statistics_equal_brute_force_per_token_sums(kind):
    model = make_model(kind)
    samples = make_samples(kind, n=5)
    names = resolve_target_modules(model)
    requests = full_requests(model, names)
    stats = collect_statistics(model, pad_batches(samples, batch_size=3), requests, progress=False)
    expected = brute_force_statistics(model, kind, samples, names)
    for name in names:
        got, want, req = stats[name], expected[name], requests[name]
        assert got.num_tokens == want["n"], name
        assert close(got.input_factor, want["A"]), name
        assert close(got.output_factor, want["G"]), name
        assert close(got.output_factor_diag, want["G"].diagonal()), name
        assert close(got.gradient, want["grad"]), name
        V, U = req.input_basis.double(), req.output_basis.double()
        assert close(got.input_projected_energy, ((V.T @ want["A"]) * V.T).sum(1)), name
        assert close(got.output_projected_energy, ((U.T @ want["G"]) * U.T).sum(1)), name
        assert torch.equal(got.input_factor, got.input_factor.T)
        assert torch.equal(got.output_factor, got.output_factor.T)


def test_layers_reading_one_input_share_one_input_factor():
    model = make_model("llama")
    names = resolve_target_modules(model)
    stats = collect_statistics(model, pad_batches(make_samples("llama"), 2),
                               {n: StatisticsRequest(input_factor=True) for n in names}, progress=False)
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert k.input_factor is q.input_factor and v.input_factor is q.input_factor
    assert k.input_factor_shared_with == "model.layers.0.self_attn.q_proj"
    gate, up = stats["model.layers.1.mlp.gate_proj"], stats["model.layers.1.mlp.up_proj"]
    assert up.input_factor is gate.input_factor
    assert stats["model.layers.1.mlp.down_proj"].input_factor_shared_with is None
    shared_bytes = stats.nbytes()
    assert shared_bytes < sum(s.input_factor.numel() * 4 for s in stats.layers.values())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_masked_tokens_change_nothing(kind):
    model = make_model(kind)
    batches = pad_batches(make_samples(kind, n=6), batch_size=3)
    names = resolve_target_modules(model)
    requests = full_requests(model, names)
    reference = collect_statistics(model, batches, requests, progress=False)
    scrambled = []
    g = torch.Generator().manual_seed(7)
    for b in batches:
        b = dict(b)
        pad = b["attention_mask"] == 0
        assert pad.any()
        b["input_ids"] = torch.where(pad, torch.randint(1, 50, b["input_ids"].shape, generator=g), b["input_ids"])
        scrambled.append(b)
    other = collect_statistics(model, scrambled, requests, progress=False)
    for name in names:
        for key, t in reference[name].tensors().items():
            assert torch.allclose(t, getattr(other[name], key), rtol=1e-5, atol=1e-7), (name, key)


def test_label_token_mask_counts_only_loss_positions():
    model = make_model("llama")
    samples = make_samples("llama", n=4)
    for s in samples:  # ignore the first two labels of each sequence
        s["labels"][0, :2] = -100
    names = ["model.layers.0.mlp.down_proj"]
    req = {names[0]: StatisticsRequest(input_factor=True)}
    stats = collect_statistics(model, pad_batches(samples, 2), req, token_mask="labels", progress=False)
    # position t counts when labels[t + 1] != -100: length - 1 - 1 positions per sequence
    assert stats[names[0]].num_tokens == sum(s["input_ids"].shape[1] - 2 for s in samples)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_size_does_not_change_statistics(kind):
    model = make_model(kind)
    samples = make_samples(kind, n=6)
    names = resolve_target_modules(model)
    requests = full_requests(model, names)
    one = collect_statistics(model, pad_batches(samples, 1), requests, progress=False)
    four = collect_statistics(model, pad_batches(samples, 4), requests, progress=False)
    for name in names:
        for key, t in one[name].tensors().items():
            assert torch.allclose(t, getattr(four[name], key), rtol=1e-4, atol=1e-6), (name, key)


def test_fp32_and_bf16_models_agree_within_bf16_tolerance():
    """bf16 activations carry ~3 significant digits; accumulation is fp32, so the factors agree
    to a relative (max-norm) error of 5% for A and 15% for G, whose gradients go through a
    whole bf16 backward pass."""
    model = make_model("llama")
    names = resolve_target_modules(model)
    batches = pad_batches(make_samples("llama", n=6), 3)
    requests = {n: StatisticsRequest(input_factor=True, output_factor=True) for n in names}
    fp32 = collect_statistics(model, batches, requests, progress=False)
    bf16 = collect_statistics(model.to(torch.bfloat16), batches, requests, progress=False)
    for name in names:
        assert bf16[name].input_factor.dtype == torch.float32
        assert close(bf16[name].input_factor, fp32[name].input_factor.double(), rtol=5e-2), name
        assert close(bf16[name].output_factor, fp32[name].output_factor.double(), rtol=1.5e-1), name


def test_true_fisher_is_seeded_and_differs_from_empirical():
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 2)
    name = "model.layers.1.mlp.down_proj"
    req = {name: StatisticsRequest(output_factor=True)}
    a = collect_statistics(model, batches, req, fisher="true", label_seed=3, progress=False)
    b = collect_statistics(model, batches, req, fisher="true", label_seed=3, progress=False)
    emp = collect_statistics(model, batches, req, progress=False)
    assert torch.equal(a[name].output_factor, b[name].output_factor)
    assert not torch.allclose(a[name].output_factor, emp[name].output_factor)
    no_labels = [{k: v for k, v in bt.items() if k != "labels"} for bt in batches]
    c = collect_statistics(model, no_labels, req, fisher="true", label_seed=3, progress=False)
    assert torch.equal(a[name].output_factor, c[name].output_factor)


def test_loss_fn_with_input_target_pairs_matches_dict_batches():
    model = make_model("llama")
    batches = pad_batches(make_samples("llama", n=4), 2)
    name = "model.layers.0.self_attn.o_proj"
    req = {name: StatisticsRequest(input_factor=True, output_factor=True)}
    ref = collect_statistics(model, batches, req, progress=False)

    def loss_fn(outputs, labels):
        logits = outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1])
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction="sum")

    pairs = [({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]) for b in batches]
    got = collect_statistics(model, pairs, req, loss_fn=loss_fn, progress=False)
    # two fp32 cross-entropy kernels: equal to fp32 rounding of the largest entry (both are ~5e-7 from fp64)
    scale = ref[name].output_factor.abs().max()
    assert torch.allclose(got[name].output_factor, ref[name].output_factor, rtol=1e-5, atol=2e-6 * scale)
    assert torch.allclose(got[name].input_factor, ref[name].input_factor, rtol=1e-6)


def test_triton_backend_gives_the_reference_statistics():
    """End to end through the collector (symmetrisation of upper-triangle kernels included)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: interpreted (conftest)
    model = make_model("llama").to(device)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    requests = full_requests(model, names)
    batches = [{k: v.to(device) for k, v in b.items()} for b in pad_batches(make_samples("llama", n=4), 2)]
    ref = collect_statistics(model, batches, requests, backend="torch", progress=False)
    tri = collect_statistics(model, batches, requests, backend="triton", progress=False)
    for name in names:
        for key, t in ref[name].tensors().items():
            assert torch.allclose(getattr(tri[name], key), t, rtol=1e-4, atol=1e-6), (name, key)


@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_bf16_hooks_single_gemm_products_equal_the_blocked_ones(layer_type, monkeypatch):
    """On a GPU the hooks multiply bf16 rows by the bf16 weight in one GEMM with an fp32 result
    (GPT-2's Conv1D weights are transposed views); forced here on the CPU, where that GEMM is
    widened, ``W x`` and ``Wᵀ g`` must equal the block-by-block products."""
    from transformers.pytorch_utils import Conv1D

    from fisher_kernels.statistics import hooks

    torch.manual_seed(0)
    module = (torch.nn.Linear(40, 24) if layer_type == "linear" else Conv1D(24, 40)).to(torch.bfloat16)
    layer = hooks.LayerAccumulator("layer", module, StatisticsRequest(), "cpu")
    x, g = torch.randn(7, 40).bfloat16(), torch.randn(7, 24).bfloat16()
    narrow = torch.empty(7, 3)  # not the layer's output: W x is recomputed
    blocked = layer.weight_times_input(x, narrow), layer.weight_transpose_times_gradient(g)
    monkeypatch.setattr(hooks, "_tensor_core_gemm", lambda W, rows: W.dtype == rows.dtype == torch.bfloat16)
    calls, mm_fp32 = [], hooks.cublas.mm_fp32
    monkeypatch.setattr(hooks.cublas, "mm_fp32", lambda a, b: calls.append(1) or mm_fp32(a, b))
    single = layer.weight_times_input(x, narrow), layer.weight_transpose_times_gradient(g)
    assert len(calls) == 2
    for got, expected in zip(single, blocked):
        assert got.dtype == torch.float32 and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_filet_takes_wt_g_from_autograd_where_the_input_has_a_gradient(kind, monkeypatch):
    """FILet's ``Wᵀ g`` (layers whose basis is V) is the gradient autograd computes at the layer's
    input anyway; only layers whose input has no gradient (the first of a frozen model) multiply
    by W themselves. Same energies either way (the projected and the full route agree)."""
    from fisher_kernels import compute_initialization
    from fisher_kernels.statistics import hooks

    model = make_model(kind)
    batches = pad_batches(make_samples(kind, n=4), 2)
    explicit, product = [], hooks.LayerAccumulator.weight_transpose_times_gradient
    monkeypatch.setattr(hooks.LayerAccumulator, "weight_transpose_times_gradient",
                        lambda self, g: explicit.append(self.name) or product(self, g))
    projected = compute_initialization(model, batches, method="filet", r=2, progress=False)
    full = compute_initialization(model, batches, method="filet", r=2, progress=False, route="full")
    input_side = [n for n in projected.layers if layer_dims(model.get_submodule(n))[1] <= layer_dims(model.get_submodule(n))[0]]
    assert input_side and len(set(explicit)) < len(input_side)
    for name, init in full.layers.items():
        assert torch.allclose(projected.layers[name].scores, init.scores, rtol=1e-4, atol=1e-6 * init.scores.max()), name
