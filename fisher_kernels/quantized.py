"""Layers quantized by bitsandbytes (QLoRA): reading a weight, and writing one back.

A 4-bit (``Linear4bit``: nf4 or fp4, any block size, with or without double quantization) or
8-bit (``Linear8bitLt``, LLM.int8()) layer holds its weight packed. The calibration pass runs on
the quantized model as it is (the model that will be trained). Where a method needs the weight
itself (FILet's and PiSSA's decompositions, a residual base), :func:`dequantized` unpacks that
one layer into a float matrix, used and dropped: never more than one layer at a time.

A method that changes the base weight writes ``W − s·B A`` back with :func:`quantize_into_`,
re-quantized into the same layer with its own quantization settings (the "in place" route: the
base then carries the quantization error of ``W − s·B A``, measured by the tests and the
benchmark). :func:`quantize_into_` replaces the layer's weight parameter by a new one; the
old one is kept by the caller for an exact rollback.

Other quantizers (torchao, HQQ, GPTQ / AWQ layers, ...) are refused with one line naming the
layer type (:func:`refuse_unsupported`).
"""

from __future__ import annotations

import torch
from torch import nn

from .lazy_weights import LazyWeights

# class names of quantized layers from other libraries: refused until supported
_OTHER_QUANTIZERS = ("HQQLinear", "QuantLinear", "WQLinear", "GPTQLinear", "AWQLinear", "Int8DynActInt4WeightLinear",
                     "FP8Linear", "QLinear", "EetqLinear", "MarlinLinear", "ExllamaLinear", "HiggsLinear")


def quantization_of(module: nn.Module) -> str | None:
    """``"4bit"`` (bitsandbytes ``Linear4bit``), ``"8bit"`` (``Linear8bitLt``) or ``None``."""
    name = type(module).__name__
    if "bitsandbytes" not in type(module).__module__:
        return None
    if name in ("Linear4bit", "LinearFP4", "LinearNF4"):
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_of(module) is not None


def refuse_unsupported(model: nn.Module, names: list[str]) -> None:
    """One line naming the first target layer quantized by a library this package cannot read yet."""
    for name in names:
        module = model.get_submodule(name)
        kind = type(module).__name__
        weight = getattr(module, "weight", None)
        tensor_subclass = isinstance(weight, torch.Tensor) and type(weight.data).__name__ not in ("Tensor", "Parameter") \
            and "torchao" in type(weight.data).__module__
        if (kind in _OTHER_QUANTIZERS or hasattr(module, "qweight") or tensor_subclass) and not is_quantized(module):
            origin = type(weight.data).__module__ if tensor_subclass else type(module).__module__
            raise TypeError(f"layer {name!r} is quantized by {origin.split('.')[0]} ({kind}"
                            f"{', ' + type(weight.data).__name__ if tensor_subclass else ''}), which fisher_kernels "
                            "cannot read yet; bitsandbytes 4-bit and 8-bit layers are supported (load the model with "
                            "BitsAndBytesConfig), or pass the unquantized model")


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in (that of its dequantized weight)."""
    if quantization_of(module) == "4bit":
        return module.compute_dtype or torch.float32
    if quantization_of(module) == "8bit":
        return torch.float16
    return module.weight.dtype


def dequantized(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float ``(d_out, d_in)`` matrix (a new tensor; the layer is unchanged):
    fp32 for a 4-bit layer computing in fp32, else the compute dtype; fp32 for an 8-bit one."""
    import bitsandbytes.functional as F

    kind = quantization_of(module)
    weight = module.weight
    if kind == "4bit":
        return F.dequantize_4bit(*_unpacked(weight)).reshape(module.out_features, module.in_features)
    if kind == "8bit":
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return F.int8_vectorwise_dequant(weight.data, scales).reshape(module.out_features, module.in_features)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes 4-bit or 8-bit layer")


def _unpacked(weight) -> tuple[torch.Tensor, object]:
    """A 4-bit weight's packed data and quant state in bitsandbytes' usual layout (undoing the CPU
    inference kernel's repacking, which carries the same values)."""
    import bitsandbytes.functional as F

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        return F._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return weight.data, weight.quant_state


@torch.no_grad()
def quantize_into_(module: nn.Module, W: torch.Tensor) -> None:
    """Replace the layer's weight by ``W`` quantized with the layer's own settings (4-bit: its quant
    type, block size, double quantization and storage dtype; 8-bit: row-wise int8)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    kind = quantization_of(module)
    old = module.weight
    if kind == "4bit":
        state = old.quant_state
        data, new_state = F.quantize_4bit(W.to(compute_dtype(module)).contiguous(), blocksize=state.blocksize,
                                          compress_statistics=state.nested, quant_type=state.quant_type,
                                          quant_storage=old.quant_storage)
        set_weight_(module, bnb.nn.Params4bit(data, requires_grad=False, quant_state=new_state,
                                              blocksize=state.blocksize, compress_statistics=state.nested,
                                              quant_type=state.quant_type, quant_storage=old.quant_storage,
                                              module=module, bnb_quantized=True))
        return
    if kind == "8bit":
        if getattr(old, "SCB", None) is None:  # a forward moved its int8 data and scales into the layer's state
            old.CB, old.SCB = module.state.CB, module.state.SCB  # kept with it, for an exact restore
        CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16).contiguous())
        new = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
        new.CB, new.SCB = CB, SCB
        set_weight_(module, new)
        return
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes 4-bit or 8-bit layer")


def set_weight_(module: nn.Module, weight: nn.Parameter) -> None:
    """``weight`` as the layer's weight parameter: a new one from :func:`quantize_into_`, or the one it
    replaced, put back exactly (an 8-bit layer's next forward takes the int8 data and scales from it)."""
    module.weight = weight
    if quantization_of(module) == "8bit":
        module.state.CB, module.state.SCB = None, None


def keep_gradients_flowing_(model: nn.Module) -> None:
    """Before a calibration pass (whose module modes are restored afterwards): on the CPU,
    bitsandbytes repacks a 4-bit weight for its inference kernel in an eval-mode forward without
    gradient (e.g. the check of the model's own loss), and from then on its matmul passes no
    gradient back to the layer's input. Every repacked weight is unpacked again (the same values)
    and the 4-bit layers are put in training mode (they hold no dropout), so the pass's gradients
    reach every layer."""
    for module in model.modules():
        if quantization_of(module) != "4bit":
            continue
        module.training = True
        weight = module.weight
        weight.data, weight.quant_state = _unpacked(weight)


def relative_error(approximation: torch.Tensor, target: torch.Tensor) -> float:
    """``‖approximation − target‖_F / ‖target‖_F`` in fp32 (0 for a zero target)."""
    target = target.float()
    norm = torch.linalg.matrix_norm(target)
    return 0.0 if norm == 0 else float(torch.linalg.matrix_norm(approximation.float() - target) / norm)


class CheckpointWeights(LazyWeights):
    """``{layer name: its full-precision weight (d_out, d_in)}`` read from a safetensors checkpoint
    (a file, or a directory with ``model.safetensors`` or a sharded index), one layer per access,
    memory-mapped: for a quantized model, the weights it was quantized from.

    Keys are the layers' ``.weight`` entries (a PEFT ``.base_layer`` suffix or ``base_model.model.``
    prefix dropped); a weight stored transposed (GPT-2's ``Conv1D``) is turned to ``(d_out, d_in)``
    (square ones: the orientation closest to the quantized layer's own weight)."""

    def __init__(self, path, model: nn.Module, names: list[str]):
        from safetensors import safe_open

        self.path, self.model, self.names = str(path), model, list(names)
        file_of = _checkpoint_keys(self.path)
        self.where: dict[str, tuple[str, str]] = {}
        for name in self.names:
            stem = name.removesuffix(".base_layer").removeprefix("base_model.model.")
            candidates = [f"{stem}.weight", f"base_model.model.{stem}.weight"]
            found = next((key for key in candidates if key in file_of), None)
            if found is None:
                raise ValueError(f"base_weights={self.path!r} holds no weight for layer {name!r} (looked for "
                                 f"{candidates[0]!r}): give the checkpoint the quantized model was loaded from")
            module = model.get_submodule(name)
            with safe_open(file_of[found], framework="pt") as f:
                shape = tuple(f.get_slice(found).get_shape())
            if sorted(shape) != sorted((module.out_features, module.in_features)) or len(shape) != 2:
                raise ValueError(f"base_weights: {found} has shape {shape}, but layer {name!r} is "
                                 f"{module.out_features}×{module.in_features}: another model's checkpoint")
            self.where[name] = (file_of[found], found)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file, key = self.where[name]
        with safe_open(file, framework="pt") as f:
            W = f.get_tensor(key).float()
        module = self.model.get_submodule(name)
        shape = (module.out_features, module.in_features)
        if tuple(W.shape) != shape:
            return W.T.contiguous()
        if shape[0] == shape[1] and is_quantized(module):  # square: the orientation the quantized layer is closer to
            own = dequantized(module)
            if relative_error(own, W.T) < relative_error(own, W):
                return W.T.contiguous()
        return W


def _checkpoint_keys(path: str) -> dict[str, str]:
    """``{tensor key: file}`` of a safetensors checkpoint: a file, or a directory with a sharded index or
    ``model.safetensors``."""
    import json
    import os

    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(path):
        single = path
    elif os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
    else:
        raise ValueError(f"base_weights={path!r}: no safetensors checkpoint there (a .safetensors file, or a "
                         "directory with model.safetensors or model.safetensors.index.json)")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}
