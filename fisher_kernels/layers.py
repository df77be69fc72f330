"""Finding target layers and reading their weights in one orientation.

Every method sees a weight as ``W`` of shape ``(d_out, d_in)`` (``nn.Linear``'s layout).
GPT-2's ``Conv1D`` stores ``Wᵀ``, and a bitsandbytes layer a packed 4-bit or 8-bit weight; the
helpers here hide that.
"""

from __future__ import annotations


import torch
from torch import nn

from .lazy_weights import LazyWeights, WeightStandIn
from .quantized import compute_dtype, dequantized, is_quantized

try:  # transformers is a dependency, but keep the module importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

SUPPORTED_LAYER_TYPES = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())

# Heads that PEFT's "all-linear" leaves out: they map to labels/vocabulary, not features. Every
# linear layer inside them is left out (RoBERTa's ``classifier.dense`` and ``classifier.out_proj``).
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
# Task heads PEFT trains in full for classification / QA tasks (``modules_to_save``).
_TRAINABLE_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def is_supported_layer(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYER_TYPES)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
    return d_out, d_in


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(d_out, d_in)``: a view, no copy (a quantized layer's: its weight
    unpacked into a new float tensor, see :mod:`fisher_kernels.quantized`; writes to it are lost)."""
    if is_quantized(module):
        return dequantized(module)
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of :func:`weight_matrix` (a quantized layer's compute dtype), without unpacking."""
    return compute_dtype(module) if is_quantized(module) else module.weight.dtype


def weight_stand_in(module: nn.Module) -> WeightStandIn:
    """The layer's weight's shape ``(d_out, d_in)``, dtype (of :func:`weight_matrix`) and device, read
    from the module alone."""
    return WeightStandIn(torch.Size(layer_dims(module)), weight_dtype(module), module.weight.device)


class WeightsOneAtATime(LazyWeights):
    """``{name: weight_matrix}`` read on access, one layer at a time (a model with quantized target
    layers: each access unpacks that layer, which is dropped after use)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return weight_matrix(self.model.get_submodule(name)).detach()

    def stand_in(self, name: str) -> WeightStandIn:
        """Shape, dtype and device of ``self[name]``, without unpacking it."""
        return weight_stand_in(self.model.get_submodule(name))


def row_blocks(n: int, size: int):
    """Slices ``[0, size), [size, 2·size), …`` covering ``range(n)``: the blocks of rows in which
    large matrices (weights, logits) are widened to a higher precision without a full-size copy."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def resolve_target_modules(model: nn.Module, target_modules=None) -> list[str]:
    """Names of the layers to adapt, in model order.

    ``target_modules`` follows PEFT's ``LoraConfig`` semantics: a list of name suffixes, a
    regex string matched against the full name, or ``None`` / ``"all-linear"`` for every
    ``nn.Linear`` and ``Conv1D`` except the output embedding and every layer inside a task head
    (``lm_head``, ``classifier``, ``score``, ``qa_outputs``).

    Raises ``ValueError`` when nothing matches and ``TypeError`` when a matched layer is of a
    type this package cannot initialise.
    """
    if target_modules is None or target_modules == "all-linear":
        output_embeddings = _output_embeddings(model)
        names = [
            name
            for name, module in model.named_modules()
            if is_supported_layer(module)
            and module is not output_embeddings
            and not any(part in _HEAD_NAMES for part in name.split("."))
        ]
        if not names:
            raise ValueError(f"no nn.Linear or Conv1D layer found in {type(model).__name__}")
        _warn_about_fused_experts(model)
        return names

    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(target_modules, str):
        config = LoraConfig(target_modules=target_modules)
    else:
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty")
        config = LoraConfig(target_modules=target_modules)
    names, unsupported = [], []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(config, name):
            continue
        if is_supported_layer(module):
            names.append(name)
        elif not any(True for _ in module.children()):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TypeError(
            "target_modules matched layers that fisher_kernels cannot initialise (only nn.Linear and "
            f"GPT-2 Conv1D are supported): {', '.join(unsupported)}"
        )
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no layer of {type(model).__name__}")
    return names


def fused_expert_parameters(model: nn.Module) -> list[str]:
    """3-D expert weights of mixture-of-experts blocks (transformers >= 5 stores Mixtral's, Qwen-MoE's,
    ... experts as one ``(experts, d_out, d_in)`` parameter, not as ``nn.Linear`` layers)."""
    return [name for name, p in model.named_parameters() if p.dim() == 3 and "expert" in name.lower()]


def _warn_about_fused_experts(model: nn.Module) -> None:
    fused = fused_expert_parameters(model)
    if fused:
        import warnings

        warnings.warn(
            f"{len(fused)} mixture-of-experts weights are fused 3-D parameters ({', '.join(fused[:2])}"
            f"{', ...' if len(fused) > 2 else ''}), which fisher_kernels cannot initialise yet: they stay without "
            "adapters, as with PEFT's 'all-linear' (LoraConfig(target_parameters=[...]) adds PEFT-initialised "
            "adapters to them). The attention and other linear layers are initialised.", UserWarning, stacklevel=3)


def trainable_heads(model: nn.Module) -> list[str]:
    """Top-level task heads (``classifier``, ``score``, ``qa_outputs``) that are not the output
    embedding: what PEFT's classification and QA task types train in full (``modules_to_save``)."""
    output_embeddings = _output_embeddings(model)
    return [name for name, module in model.named_children()
            if name in _TRAINABLE_HEAD_NAMES and module is not output_embeddings]


def _output_embeddings(model: nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


# entries of a bf16/fp16 weight widened to fp32 at a time: a 2 MiB temporary on the CPU; on a GPU
# 32 MiB, so that a layer takes a few large GEMMs rather than many small launches
UPDATE_ENTRIES = 1 << 19
UPDATE_ENTRIES_CUDA = 1 << 23


def update_rows(d_in: int, device=None) -> int:
    """Rows of a ``(d_out, d_in)`` weight on ``device`` updated through one fp32 temporary."""
    entries = UPDATE_ENTRIES_CUDA if torch.device(device or "cpu").type == "cuda" else UPDATE_ENTRIES
    return max(1, entries // d_in)


def check_rank_fits(model: nn.Module, names: list[str], r: int) -> None:
    """Refuse a rank larger than a target layer's ``min(d_out, d_in)`` (a rank budget's per-layer
    cap is not checked here: each layer takes ``min(cap, its min(d))``)."""
    for name in names:
        d_out, d_in = layer_dims(model.get_submodule(name))
        if r > min(d_out, d_in):
            raise ValueError(f"r={r} is larger than min(d_out, d_in) = {min(d_out, d_in)} of layer {name!r} "
                             f"({d_out}×{d_in})")
