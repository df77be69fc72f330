"""Statistics cache: one safetensors file with a header that says what the statistics are of.

Header (safetensors metadata, all strings): format, package version, model fingerprint (every
weight of the model, hashed in full), fingerprint of the calibration batches, layer names,
per-layer token counts, which layers share an input factor, batch and sequence counts, fisher,
token-mask and loss-weighting settings, dtype, a checksum of every stored tensor and one of the
header itself (format /3: a flipped bit in a count is refused too). Shared input factors are
stored once. Loading refuses, each with a one-line error naming the file: a file that
is not a statistics file or cannot be read, a format this version does not declare compatible, a
tensor that does not match its checksum, and (given the model) statistics of another model.
"""

from __future__ import annotations

import hashlib
import json

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..files import write_atomically
from .fingerprint import model_fingerprint, tensor_hash

FORMAT = "fisher_kernels.statistics/3"
# formats this version reads: /1 (sampled fingerprint, no checksums) and /2 (header not checksummed) are not among them
COMPATIBLE_FORMATS = (FORMAT,)
_FIELDS = ("input_factor", "output_factor", "output_factor_diag", "gradient",
           "input_projected_energy", "output_projected_energy")


def write_statistics(stats, path) -> None:
    """Write a :class:`~fisher_kernels.statistics.KFACStatistics` to ``path`` (safetensors)."""
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
        "data_fingerprint": stats.data_fingerprint or "",
        "dtype": "float32",
        "checksums": json.dumps({key: f"{tensor_hash(value):016x}" for key, value in tensors.items()}),
    }
    metadata["header_checksum"] = header_checksum(metadata)
    write_atomically(path, lambda target: save_file(tensors, target, metadata=metadata))


def read_statistics(path, model: nn.Module | None = None, device=None) -> tuple[dict, dict[str, dict]]:
    """Read statistics written by :func:`write_statistics`, verifying every tensor's checksum:
    ``(the KFACStatistics fields but layers, {layer: the LayerStatistics fields})``.

    With ``model``, the file's fingerprint must match the model (every weight, in full, and the
    layer set): statistics of another model or of other weights raise ``ValueError``. Every
    refusal is one ``ValueError`` line that names the file.
    """
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # missing, truncated or not safetensors at all
        reason = " ".join(str(err).split())
        raise ValueError(f"{path}: cannot read it as a statistics file ({type(err).__name__}: {reason})") from None
    found = metadata.get("format", "")
    if not found.startswith("fisher_kernels.statistics/"):
        raise ValueError(f"{path} is not a fisher_kernels statistics file (format {found or None!r})")
    if found not in COMPATIBLE_FORMATS:
        raise ValueError(f"{path} was written by fisher_kernels {metadata.get('package_version', '?')} in format "
                         f"{found!r}, which fisher_kernels {__version__} does not read (it reads "
                         f"{', '.join(COMPATIBLE_FORMATS)}): collect the statistics again")
    if metadata.get("header_checksum") != header_checksum(metadata):
        raise ValueError(f"{path}: its header does not match its checksum (the file is corrupted)")
    try:
        checksums = json.loads(metadata["checksums"])
        names = json.loads(metadata["layers"])
        counts = json.loads(metadata["num_tokens"])
        shared = json.loads(metadata["shared_input_factor"])
        header = {key: metadata[key] for key in ("num_batches", "num_sequences", "fisher", "token_mask",
                                                  "fingerprint", "loss_weighting", "loss_units", "data_fingerprint")}
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: its header is incomplete or damaged ({type(err).__name__}: {err})") from None
    if set(checksums) != set(tensors):
        raise ValueError(f"{path}: its tensors do not match the header's list (the file is damaged)")
    for key, value in tensors.items():
        if f"{tensor_hash(value):016x}" != checksums[key]:
            raise ValueError(f"{path}: tensor {key!r} does not match its checksum (the file is corrupted)")
    if model is not None:
        missing = [n for n in names if not _has_module(model, n)]
        if missing:
            raise ValueError(f"statistics in {path} are of layers this model does not have: {missing[:5]}")
        if header["fingerprint"] != model_fingerprint(model, names):
            raise ValueError(f"statistics in {path} were collected on a different model (other architecture, "
                             "weights or layer set); collect them again for this model")
    layers = {}
    for name in names:
        values = {key: tensors.get(f"{name}::{key}") for key in _FIELDS}
        values = {k: (v.to(device) if v is not None and device is not None else v) for k, v in values.items()}
        layers[name] = dict(num_tokens=counts[name], input_factor_shared_with=shared.get(name), **values)
    return dict(num_batches=int(header["num_batches"]), num_sequences=int(header["num_sequences"]),
                fisher=header["fisher"], token_mask=header["token_mask"], fingerprint=header["fingerprint"] or None,
                loss_weighting=header["loss_weighting"], loss_units=int(header["loss_units"]),
                data_fingerprint=header["data_fingerprint"] or None), layers


def header_checksum(metadata: dict[str, str]) -> str:
    """SHA-256 of every header entry but the checksum itself, in key order."""
    entries = sorted((k, v) for k, v in metadata.items() if k != "header_checksum")
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
