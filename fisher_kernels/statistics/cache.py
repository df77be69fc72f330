"""Statistics cache: one safetensors file with a header that says what the statistics are of.

Header (safetensors metadata, all strings): format, package version, model class, model
fingerprint, layer names, per-layer token counts, which layers share an input factor, batch and
sequence counts, fisher, token-mask and loss-weighting settings, dtype. Shared input factors are stored once.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from .containers import KFACStatistics, LayerStatistics, model_fingerprint

FORMAT = "fisher_kernels.statistics/1"
_FIELDS = ("input_factor", "output_factor", "output_factor_diag", "gradient",
           "input_projected_energy", "output_projected_energy")


def save_statistics(stats: KFACStatistics, path) -> None:
    """Write ``stats`` to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    from .. import __version__

    tensors = {}
    for name, layer in stats.layers.items():
        for key in _FIELDS:
            value = getattr(layer, key)
            if value is None or (key == "input_factor" and layer.input_factor_shared_with):
                continue
            tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "package_version": __version__,
        "fingerprint": stats.fingerprint or "",
        "layers": json.dumps(list(stats.layers)),
        "num_tokens": json.dumps({n: l.num_tokens for n, l in stats.layers.items()}),
        "shared_input_factor": json.dumps({n: l.input_factor_shared_with for n, l in stats.layers.items()
                                           if l.input_factor_shared_with}),
        "num_batches": str(stats.num_batches),
        "num_sequences": str(stats.num_sequences),
        "fisher": stats.fisher,
        "token_mask": stats.token_mask,
        "loss_weighting": stats.loss_weighting,
        "loss_units": str(stats.loss_units),
        "dtype": "float32",
    }
    save_file(tensors, str(path), metadata=metadata)


def load_statistics(path, model: nn.Module | None = None, device=None) -> KFACStatistics:
    """Read statistics written by :func:`save_statistics`.

    With ``model``, the file's fingerprint must match the model's target layers: statistics of
    another model, other weights or another layer set raise ``ValueError``.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a fisher_kernels statistics file (format {metadata.get('format')!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    names = json.loads(metadata["layers"])
    if model is not None:
        missing = [n for n in names if not _has_module(model, n)]
        if missing:
            raise ValueError(f"statistics in {path} are of layers this model does not have: {missing[:5]}")
        if metadata["fingerprint"] != model_fingerprint(model, names):
            raise ValueError(f"statistics in {path} were collected on a different model (other architecture, "
                             "weights or layer set); collect them again for this model")
    counts = json.loads(metadata["num_tokens"])
    shared = json.loads(metadata["shared_input_factor"])
    layers = {}
    for name in names:
        values = {key: tensors.get(f"{name}::{key}") for key in _FIELDS}
        values = {k: (v.to(device) if v is not None and device is not None else v) for k, v in values.items()}
        layers[name] = LayerStatistics(num_tokens=counts[name], input_factor_shared_with=shared.get(name), **values)
    for name, owner in shared.items():
        layers[name].input_factor = layers[owner].input_factor
    return KFACStatistics(layers=layers, num_batches=int(metadata["num_batches"]),
                          num_sequences=int(metadata["num_sequences"]), fisher=metadata["fisher"],
                          token_mask=metadata["token_mask"], fingerprint=metadata["fingerprint"] or None,
                          loss_weighting=metadata.get("loss_weighting", "token"),
                          loss_units=int(metadata.get("loss_units", "0")))


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
