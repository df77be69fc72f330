"""The residual base ``W − P Q`` written into the base layers in place, one layer at a time, and undone
on failure (plain, sharded, partitioned and quantized weights).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
from torch import nn

from ..layers import row_blocks, update_rows, weight_matrix
from ..quantized import dequantized, is_quantized, quantize_into_, relative_error, set_weight_
from ..distributed.sharded import is_partitioned, is_sharded, local_update_factors, modify_whole_
from ..methods import LayerInit


def _base_layer(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def add_low_rank_(module: nn.Module, P: torch.Tensor, Q: torch.Tensor, alpha: float) -> None:
    """``W += alpha · P Q`` in place for a layer's weight ``W (d_out, d_in)``: directly for fp32/fp64
    weights, through one fp32 temporary of ``UPDATE_ENTRIES`` entries (``UPDATE_ENTRIES_CUDA`` on a
    GPU) for narrower dtypes (the same numbers as one fp32 temporary of the whole layer). A sharded
    (FSDP2) weight: this rank's rows;
    a partitioned (ZeRO-3) one: gathered, changed on rank 0 and re-partitioned. (A quantized layer's
    base is replaced, not changed: :func:`apply_base_updates`.)"""
    if is_sharded(module.weight):
        _add_low_rank_to_(*local_update_factors(module, P, Q), alpha)
    elif is_partitioned(module.weight):  # ZeRO-3: the whole weight, changed on rank 0 and re-partitioned
        modify_whole_(module.weight, lambda W: _add_low_rank_to_(W if isinstance(module, nn.Linear) else W.T, P, Q,
                                                                 alpha))
    else:
        _add_low_rank_to_(weight_matrix(module), P, Q, alpha)


def _add_low_rank_to_(W: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, alpha: float) -> None:
    P, Q = P.to(W.device), Q.to(W.device)
    if W.dtype in (torch.float32, torch.float64):
        W.addmm_(P.to(W.dtype), Q.to(W.dtype), alpha=alpha)
        return
    P, Q = P.float(), Q.float()
    for rows in row_blocks(W.shape[0], update_rows(W.shape[1], W.device)):  # one fp32 block of rows at a time
        W[rows] = W[rows].float().addmm_(P[rows], Q, alpha=alpha)


@torch.no_grad()
def apply_base_updates(model: nn.Module, inits: dict[str, LayerInit], progress: bool = False,
                       sources=None) -> list:
    """``W ← W − P Q`` for every layer whose ``LayerInit`` has a ``base_update``, in place, one
    layer at a time. Returns what was written, for :func:`revert_base_updates`. On any failure
    (``KeyboardInterrupt`` included) the layers already updated get ``P Q`` added back, which
    restores them up to one rounding in the weight's dtype (a quantized layer gets its own
    weight parameter back, exactly).

    A quantized (bitsandbytes) layer's new base is ``W − P Q`` quantized with the layer's settings,
    ``W`` being ``sources[name]`` (a full-precision checkpoint's weight) or else the layer's own
    unpacked weight; each entry of the result then also holds the errors, relative to ``‖W‖``, of
    the initialised weight ``Q(W − P Q) + P Q`` and of the loaded one against ``W``
    (``InitReport.quantization_errors``)."""
    from tqdm.auto import tqdm

    todo = [(name, init.base_update) for name, init in inits.items() if init.base_update is not None]
    done = []
    try:
        for name, (P, Q) in tqdm(todo, desc="fisher_kernels: base weights", unit="layer",
                                 disable=not progress or len(todo) < 2):
            with _interrupts_deferred():  # a layer is written and recorded, or neither
                layer = _base_layer(model, name)
                if is_quantized(layer):  # replaced, not changed: the old weight is kept to restore
                    done.append((name, P, Q, layer.weight, _requantize_residual_(layer, P, Q, sources, name)))
                else:
                    add_low_rank_(layer, P, Q, alpha=-1.0)
                    done.append((name, P, Q, None, None))
    except BaseException:
        revert_base_updates(model, done)
        raise
    return done


def _requantize_residual_(layer: nn.Module, P: torch.Tensor, Q: torch.Tensor, sources, name: str) -> dict:
    """A quantized layer's base ``W − P Q`` quantized into it, and the errors, relative to ``‖W‖``, of the
    initialised weight ``Q(W − P Q) + P Q`` and (with ``sources``) of the loaded quantized weight against ``W``."""
    old = dequantized(layer).float()
    W = sources[name].float() if sources is not None else old
    P, Q = P.to(W.device, torch.float32), Q.to(W.device, torch.float32)
    loaded = relative_error(old, W) if sources is not None else 0.0
    del old
    quantize_into_(layer, W.addmm(P, Q, alpha=-1.0))
    return {"initialised": relative_error(dequantized(layer).addmm_(P, Q), W), "loaded": loaded}


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C during the block is held back until the block has finished (main thread only), so a
    layer's in-place update is never left half-written or unrecorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@torch.no_grad()
def revert_base_updates(model: nn.Module, done: list) -> None:
    """Undo :func:`apply_base_updates` (``W ← W + P Q``, last layer first; exact up to one rounding)."""
    for name, P, Q, original, _ in reversed(done):
        if original is not None:
            set_weight_(_base_layer(model, name), original)
        else:
            add_low_rank_(_base_layer(model, name), P, Q, alpha=1.0)
