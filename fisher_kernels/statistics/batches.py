"""Turning one calibration batch into model inputs, a token mask and a *summed* loss.

Statistics must not depend on how the loader batches the data, so the loss that is
back-propagated is the sum over counted tokens (or samples), never a mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class PreparedBatch:
    args: tuple
    kwargs: dict
    targets: object            # labels (dict batches) or the targets of an (inputs, targets) pair
    token_mask: torch.Tensor | None  # (B, T) bool; None means every token counts
    num_sequences: int


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def causal_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose output predicts a counted label: ``labels[t + 1] != -100``."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:].ne(IGNORE_INDEX)
    return mask


def prepare_batch(batch, index: int, device, *, token_mask: str, needs_labels: bool, causal: bool) -> PreparedBatch:
    """Split ``batch`` into model inputs, targets and the mask of tokens that count.

    Dict batches are passed as keyword arguments (``labels`` is kept apart); ``(inputs,
    targets)`` pairs are passed as ``model(**inputs)``, ``model(*inputs)`` or ``model(inputs)``.
    """
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        targets = kwargs.pop("labels", None)
        args = ()
        attention_mask = kwargs.get("attention_mask")
    elif isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, targets = batch
        attention_mask = None
        if isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
            attention_mask = kwargs.get("attention_mask")
        elif isinstance(inputs, (list, tuple)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
    else:
        raise TypeError(
            f"batch {index}: expected a dict of tensors (with 'labels') or an (inputs, targets) pair, "
            f"got {type(batch).__name__}"
        )
    if needs_labels and targets is None:
        raise ValueError(
            f"batch {index} has no 'labels' and no loss_fn was given: add labels to the batches, "
            "pass loss_fn=..., or use fisher='true'"
        )
    args, kwargs, targets = _to_device(args, device), _to_device(kwargs, device), _to_device(targets, device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)

    if token_mask == "attention":
        mask = None if attention_mask is None else attention_mask.bool()
    elif token_mask == "labels":
        if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
            raise ValueError(
                f"batch {index}: token_mask='labels' needs token-level labels of shape (batch, seq); "
                f"got {getattr(targets, 'shape', type(targets).__name__)}"
            )
        mask = causal_label_mask(targets) if causal else targets.ne(IGNORE_INDEX)
    else:
        raise ValueError(f"token_mask must be 'attention' or 'labels', got {token_mask!r}")

    first = _first_tensor((args, kwargs))
    num_sequences = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    return PreparedBatch(args, kwargs, targets, mask, num_sequences)


def is_causal_lm(model) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _logits(outputs) -> torch.Tensor:
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor):
        raise TypeError("the model's output has no 'logits'; pass loss_fn=... to say how to compute the loss")
    return logits


def summed_model_loss(outputs, labels: torch.Tensor, *, causal: bool) -> tuple[torch.Tensor, int]:
    """Sum of per-token (or per-sample) losses for the usual Hugging Face heads, and their count.

    Causal LM: cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``; token-level
    heads: cross-entropy per token; sequence classification: cross-entropy per sample
    (mean-squared error when there is one float target per sample). ``-100`` is ignored.
    """
    logits = _logits(outputs).float()
    if labels.dim() == logits.dim() - 1 and labels.shape == logits.shape[:-1]:
        if causal and labels.dim() == 2:
            logits, labels = logits[:, :-1], labels[:, 1:]
        flat_labels = labels.reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int(flat_labels.ne(IGNORE_INDEX).sum())
    if labels.is_floating_point() and logits.shape[-1] == 1 and labels.numel() == logits.shape[0]:
        return F.mse_loss(logits.reshape(-1), labels.reshape(-1).float(), reduction="sum"), labels.numel()
    if logits.dim() == 2 and labels.shape == logits.shape[:1]:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"), int(labels.ne(IGNORE_INDEX).sum())
    raise ValueError(
        f"cannot tell how to compute the loss for logits of shape {tuple(logits.shape)} and labels of "
        f"shape {tuple(labels.shape)}; pass loss_fn=(outputs, targets) -> summed loss"
    )


def sampled_label_loss(outputs, token_mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """True-Fisher loss: cross-entropy against labels drawn from the model's own prediction.

    Token-level logits (B, T, V): one label per counted token; sequence-level (B, C): one per
    sample. Sampling is done without gradient; the loss is summed.
    """
    logits = _logits(outputs).float()
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1)
        sampled = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(flat.device)
    if logits.dim() == 3 and token_mask is not None:
        sampled = sampled.masked_fill(~token_mask.reshape(-1), IGNORE_INDEX)
    return F.cross_entropy(flat, sampled, ignore_index=IGNORE_INDEX, reduction="sum")
