"""QLoRA: models quantized by bitsandbytes (4-bit nf4 / fp4, double quantization, 8-bit), on the CPU.

The calibration pass runs on the quantized model; a weight is unpacked only while its own layer
needs it; a residual base is re-quantized in place, or quantized once from the full-precision
checkpoint (``base_weights``)."""

import gc

import pytest
import torch

import fisher_kernels.quantized as quantized
import fisher_kernels.pipeline.write as write
from conftest import snapshot
from fisher_kernels import full_statistics_requests, collect_statistics, init_lora, save_residual_model
from fisher_kernels.layers import resolve_target_modules
from tiny_models import make_model, make_samples, pad_batches

bnb = pytest.importorskip("bitsandbytes")  # a dev requirement: present wherever the suite runs
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

SETTINGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4+double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
METHODS = ["filet", "lora_da", "lora_ga", "pissa", "milora", "gaussian"]
IDS = torch.tensor([[3, 8, 13, 18, 23, 7, 9, 11]])
DATA = pad_batches(make_samples("llama", n=4), 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny models saved in full precision (widths bitsandbytes' CPU kernels take)."""
    out = {}
    for kind in ("llama-wide", "gpt2-wide"):
        path = tmp_path_factory.mktemp(kind)
        make_model(kind).save_pretrained(path)
        out[kind] = path
    return out


def load(path, setting: str):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**SETTINGS[setting]),
                                                 device_map="cpu")
    return model.train()  # the same kernels before and after (eval mode repacks 4-bit weights for inference)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def data_for(method):
    return DATA if method in ("filet", "lora_da", "lora_ga") else None


@pytest.mark.parametrize("kind", ["llama-wide", "gpt2-wide"])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_initialises_a_quantized_model_within_its_quantization_error(checkpoint, kind, setting, method):
    model = load(checkpoint[kind], setting)
    before = logits(model)
    peft_model = init_lora(model, data_for(method), method=method, r=4, progress=False)
    report = peft_model.fisher_kernels_report
    after = logits(peft_model.train())
    assert torch.isfinite(after).all()
    if method == "gaussian":
        assert torch.equal(after, before)
    elif method == "lora_da":  # keeps W: W + s·B₀A₀ as its reference does
        assert not report.quantization_errors
    else:  # the residual base re-quantized in place: the initialised weights are off by about one quantization
        loaded = load(checkpoint[kind], setting)
        reference = init_lora(loaded, data_for(method), method=method, r=4, progress=False,
                              base_weights=checkpoint[kind]).fisher_kernels_report.quantization_errors
        for name, errors in report.quantization_errors.items():
            assert 0 < errors["initialised"] <= 1.5 * reference[name]["loaded"], name
    assert all(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for n, m in peft_model.named_modules()
               if n.endswith(".base_layer"))


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_statistics_equal_those_of_the_float_model_with_the_dequantized_weights(checkpoint, setting):
    model = load(checkpoint["llama-wide"], setting)
    names = resolve_target_modules(model)
    float_model = make_model("llama-wide").train()
    with torch.no_grad():  # the float model's weights: the quantized ones, unpacked
        for name in names:
            float_model.get_submodule(name).weight.copy_(quantized.dequantized(model.get_submodule(name)))
    got = collect_statistics(model, DATA, full_statistics_requests(model), progress=False)
    expected = collect_statistics(float_model, DATA, full_statistics_requests(float_model), progress=False)
    # 4-bit: the layer unpacks its weight and multiplies in the compute dtype (fp32 here): the same sums.
    # LLM.int8() also quantizes each activation row to int8 (in fp16): statistics within that rounding.
    tolerance = 1e-4 if setting == "nf4" else 0.1
    for name in names:
        for key, value in expected[name].tensors().items():
            other = got[name].tensors()[key]
            assert (other - value).abs().max() <= tolerance * value.abs().max().clamp_min(1e-6), (name, key)


def test_at_most_one_layer_is_unpacked_at_a_time(checkpoint, monkeypatch):
    """Every unpacked weight's memory is dropped before the next layer's is made (FILet: decomposition,
    initialisation and residual write all unpack): at each unpacking, the storages of earlier unpacked
    weights still referenced by any tensor are counted."""
    made, most = {}, [0]  # storage address -> (bytes, its first values): a reused address holds other values
    unpack = quantized.dequantized

    def signature(t):
        storage = t.untyped_storage()
        return storage.nbytes(), bytes(storage[:16])

    def address(t):  # None for tensors without memory (meta, fake tensors an earlier torch.compile left)
        try:
            return t.untyped_storage().data_ptr() if type(t) in (torch.Tensor,) and t.device.type == "cpu" else None
        except RuntimeError:
            return None

    def counted(module):
        W = unpack(module)
        made[W.untyped_storage().data_ptr()] = signature(W)
        alive = set()
        for t in gc.get_objects():
            if isinstance(t, torch.Tensor) and (where := address(t)) is not None and made.get(where) == signature(t):
                alive.add(where)
        most[0] = max(most[0], len(alive))
        return W

    monkeypatch.setattr("fisher_kernels.layers.dequantized", counted)
    monkeypatch.setattr("fisher_kernels.adapters.base_weights.dequantized", counted)
    init_lora(load(checkpoint["llama-wide"], "nf4"), DATA, method="filet", r=4, progress=False)
    assert 1 <= most[0] <= 2  # the layer's own, and at most one made from it while it is in use


@pytest.mark.parametrize("method,reads", [("lora_ga", 0), ("lora_da", 0), ("filet", 2)])
def test_the_stages_before_the_write_unpack_each_layer_only_where_a_method_reads_its_weight(checkpoint, monkeypatch,
                                                                                            method, reads):
    """Unpacking a 4-bit layer is a dequantisation of its weight: the statistics request does not read
    the weight (it used to, once per layer and pass); LoRA-GA and LoRA-DA compute from statistics
    alone, FILet reads it to decompose and to initialise."""
    from fisher_kernels import compute_initialization

    calls = []
    unpack = quantized.dequantized
    monkeypatch.setattr("fisher_kernels.layers.dequantized", lambda module: calls.append(module) or unpack(module))
    model = load(checkpoint["llama-wide"], "nf4")
    report = compute_initialization(model, DATA, method=method, r=4, progress=False)
    assert len(calls) == reads * len(report.layers), (method, len(calls), len(report.layers))


def test_the_full_precision_route_quantizes_the_residual_once_and_errs_less(checkpoint):
    """With base_weights, W − s·B₀A₀ is quantized from the checkpoint's W: the initialised weight is
    closer to W than the loaded quantized weight is (PiSSA's claim, for its top-r split), and closer
    than the in-place route's, which re-quantizes an already quantized weight."""
    from safetensors.torch import load_file

    W = load_file(checkpoint["llama-wide"] / "model.safetensors")
    routes = {}
    for route, base in (("in place", None), ("checkpoint", checkpoint["llama-wide"])):
        peft_model = init_lora(load(checkpoint["llama-wide"], "nf4"), None, method="pissa", r=8, progress=False,
                               base_weights=base)
        errors = {}
        for name, init in peft_model.fisher_kernels_report.layers.items():
            layer = peft_model.get_base_model().get_submodule(name)
            P, Q = init.base_update
            initialised = quantized.dequantized(layer.get_base_layer()) + P @ Q
            errors[name] = quantized.relative_error(initialised, W[f"{name}.weight"])
        routes[route] = errors
        if base is not None:
            report = peft_model.fisher_kernels_report.quantization_errors
            for name, e in report.items():
                assert e["initialised"] < e["loaded"], name
                assert abs(e["initialised"] - errors[name]) < 1e-5, name
    for name in routes["checkpoint"]:
        assert routes["checkpoint"][name] < routes["in place"][name], name


@pytest.mark.parametrize("setting,layer_type", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_a_quantized_residual_model_saves_reloads_and_trains(checkpoint, tmp_path, setting, layer_type):
    from peft import PeftModel

    peft_model = init_lora(load(checkpoint["llama-wide"], setting), DATA, method="filet", r=4, progress=False)
    expected = logits(peft_model.train())
    save_residual_model(peft_model, tmp_path / "adapter", tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")  # its config says quantized
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == layer_type
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    assert (logits(reloaded) - expected).abs().max() < (1e-4 if setting == "nf4" else 2e-2)  # int8: fp16 compute

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = DATA[0]
    losses = []
    for _ in range(5):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_failed_write_puts_the_quantized_weights_back_exactly(checkpoint, monkeypatch):
    model = load(checkpoint["llama-wide"], "nf4")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(write, "attach_report", fail)  # after every base weight was re-quantized
    with pytest.raises(RuntimeError, match="injected"):
        init_lora(model, None, method="pissa", r=4, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_kasa_and_other_quantizers_are_refused_in_one_line(checkpoint):
    model = load(checkpoint["llama-wide"], "nf4")
    state = snapshot(model)
    with pytest.raises(ValueError, match="KaSA truncates each base weight inside PEFT's KaSA layer") as raised:
        init_lora(model, None, method="kasa", r=4, progress=False)
    assert "\n" not in str(raised.value)
    assert all(torch.equal(v, snapshot(model)["state"][k]) for k, v in state["state"].items())

    class HQQLinear(torch.nn.Linear):  # the class name another quantizer's layers carry
        pass

    other = make_model("llama")
    layer = other.model.layers[0].mlp.up_proj
    replacement = HQQLinear(layer.in_features, layer.out_features, bias=False)
    other.model.layers[0].mlp.up_proj = replacement
    with pytest.raises(TypeError, match="layer 'model.layers.0.mlp.up_proj' is quantized by .*HQQLinear"):
        init_lora(other, None, method="pissa", r=2, progress=False)


def test_base_weights_are_checked_against_the_model(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="this model's target layers are not quantized"):
        init_lora(make_model("llama-wide"), None, method="pissa", r=2, base_weights=checkpoint["llama-wide"],
                  progress=False)
    with pytest.raises(ValueError, match="no safetensors checkpoint there"):
        init_lora(load(checkpoint["llama-wide"], "nf4"), None, method="pissa", r=2, base_weights=tmp_path,
                  progress=False)
    with pytest.raises(ValueError, match="another model's checkpoint|holds no weight for layer"):
        init_lora(load(checkpoint["llama-wide"], "nf4"), None, method="pissa", r=2,
                  base_weights=checkpoint["gpt2-wide"], progress=False)
