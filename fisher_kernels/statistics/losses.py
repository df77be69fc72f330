"""The summed loss a calibration batch back-propagates, and its checks.

Statistics must not depend on how the loader batches the data, so the loss is the sum over
counted tokens (or samples), weighted as the method's reference weights positions
(:func:`loss_weights`), never a mean. The cross-entropy computes its gradient in the forward
sweep, a chunk of logit rows at a time, without a full fp32 copy of the logits.
"""

from __future__ import annotations


import math
from collections.abc import Mapping

import torch

from ..layers import row_blocks
from .batches import IGNORE_INDEX, PreparedBatch, split_batch


def counted_labels(prepared: PreparedBatch, *, causal: bool, sampled: bool) -> torch.Tensor | int:
    """Positions of the whole batch that enter the loss (for per-batch weighting of micro-batches):
    a count on the batch's device (not read back: no host synchronisation), or an int."""
    if sampled:
        mask = prepared.output_token_mask
        return prepared.num_sequences if mask is None else mask.sum()
    labels = prepared.targets
    if not isinstance(labels, torch.Tensor):
        return prepared.num_sequences
    if causal and labels.dim() == 2:
        labels = labels[:, 1:]
    return labels.ne(IGNORE_INDEX).sum()


def is_causal_lm(model) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def output_logits(outputs) -> torch.Tensor:
    """The ``logits`` of a model's output (a mapping, an object with ``.logits``, or the tensor itself)."""
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor):
        raise TypeError("the model's output has no 'logits'; pass loss_fn=... to say how to compute the loss")
    return logits


LOSS_WEIGHTINGS = ("token", "sequence", "batch")


def loss_weights(labels: torch.Tensor, weighting: str,
                 batch_total: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position weights of the calibration loss and the number of loss units they make.

    ``labels`` (B, T) or (B,), ``-100`` ignored. ``"token"``: every counted label weighs 1 (the
    summed loss; units = counted labels). ``"sequence"``: each sequence's labels weigh ``1/T_n``,
    so the loss is the sum over sequences of Hugging Face's per-sequence mean loss (units =
    sequences with a label). ``"batch"``: every label weighs ``1/T`` of the whole batch, the
    batch's mean loss (units = 1 when the batch has a label). For a micro-batch of a larger batch,
    ``batch_total`` is the whole batch's label count and the units are 0 (the caller counts the
    batch once). The units are a 0-dim int64 tensor on the labels' device, never read back here
    (each read would stall the host until the device is idle).
    """
    counted = labels.ne(IGNORE_INDEX)
    weights = counted.float()
    if weighting == "token":
        return weights, counted.sum()
    if weighting == "batch":
        if batch_total is not None:
            total = batch_total.clamp_min(1) if isinstance(batch_total, torch.Tensor) else max(batch_total, 1)
            return weights.div_(total), torch.zeros((), dtype=torch.int64, device=labels.device)
        total = counted.sum()
        return weights.div_(total.clamp_min(1)), total.clamp_max(1)
    if weighting == "sequence":
        per_sequence = counted.reshape(counted.shape[0], -1).sum(dim=1)  # (B,)
        shape = (-1,) + (1,) * (counted.dim() - 1)
        return weights.div_(per_sequence.clamp_min(1).reshape(shape)), per_sequence.clamp_max(1).sum()
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")


# the loss's fp32 temporary: a quarter of the logits, within [2²⁰, 2²⁴] entries (4 to 64 MiB): a few
# chunks a batch (each costs a handful of kernel launches), never much memory beside the logits'
CHUNK_ELEMENTS = 2**24


MIN_CHUNK_ELEMENTS = 2**20


CHUNKS = 4


def loss_row_chunks(logits: torch.Tensor):
    """The row blocks in which the loss widens logits (N, C) to fp32."""
    rows, width = logits.shape[0], max(1, logits.shape[-1])
    elements = min(CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, -(-rows * width // CHUNKS)))
    return row_blocks(rows, max(1, elements // width))


class _WeightedCrossEntropy(torch.autograd.Function):
    """``Σ_t w_t · CE(logits_t, label_t)`` over rows, in fp32, a chunk of rows at a time.

    When the logits need a gradient it is computed in the same sweep, ``w_t (softmax(z_t) −
    onehot(label_t))`` rounded as ``F.cross_entropy``'s backward rounds it, stored in the logits'
    dtype and kept in place of the logits (no fp32 copy of the logits, no recomputation and no
    autograd call per chunk in the backward, which only scales it by the incoming gradient). Each
    chunk is one fp32 temporary. Rows with label ``-100`` (weight 0) contribute nothing.
    """

    @staticmethod
    def forward(ctx, logits, labels, weights, wants_gradient):
        index = labels.clamp_min(0).unsqueeze(1)  # -100 -> 0: weight 0 there
        weights = weights.unsqueeze(1)
        log_p_label = torch.empty(labels.shape[0], 1, dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if wants_gradient else None
        negated = weights.neg() if wants_gradient else None
        for rows in loss_row_chunks(logits):
            log_p = torch.log_softmax(logits[rows], 1, dtype=torch.float32)  # the chunk's one fp32 temporary
            chunk_index = index[rows]
            torch.gather(log_p, 1, chunk_index, out=log_p_label[rows])
            if wants_gradient:  # F.cross_entropy's own backward: w·exp(log p) − w at the label
                log_p.exp_().mul_(weights[rows]).scatter_add_(1, chunk_index, negated[rows])
                grad[rows].copy_(log_p)
        ctx.grad = grad
        return log_p_label.masked_fill_(labels.eq(IGNORE_INDEX).unsqueeze(1), 0.0).T.mm(weights).neg().squeeze()

    @staticmethod
    def backward(ctx, grad_total):
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_t w_t · CE(logits_t, labels_t)`` for logits (N, C) of any float dtype, labels (N,) with
    ``-100`` where ``w_t = 0``; computed in fp32 without a full fp32 copy of the logits (the
    gradient, when autograd will want one, is computed in the same sweep)."""
    wants_gradient = torch.is_grad_enabled() and logits.requires_grad
    return _WeightedCrossEntropy.apply(logits, labels, weights.to(torch.float32), wants_gradient)


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    """Causal LM labels aligned with the logits that predict them: ``labels[:, t + 1]`` at t."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


def summed_model_loss(outputs, labels: torch.Tensor, *, causal: bool, weighting: str = "token",
                      batch_total: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The calibration loss for the usual Hugging Face heads, its label count and loss units.

    Causal LM: cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``; token-level
    heads: cross-entropy per token; sequence classification: cross-entropy per sample
    (mean-squared error when there is one float target per sample). ``-100`` is ignored.
    The per-position losses are weighted as :func:`loss_weights` says (``"token"``: their sum).
    Returns ``(loss, number of counted labels, number of loss units)``, the counts as 0-dim
    tensors on the device (read them with ``int()`` only where a host synchronisation is fine).
    """
    logits = output_logits(outputs)
    if labels.dim() == logits.dim() - 1 and labels.shape == logits.shape[:-1]:
        if causal and labels.dim() == 2:
            labels = _shifted(labels)
        weights, units = loss_weights(labels, weighting, batch_total)
        flat_labels = labels.reshape(-1)
        loss = weighted_cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_labels, weights.reshape(-1))
        return loss, (units if weighting == "token" else flat_labels.ne(IGNORE_INDEX).sum()), units
    if labels.is_floating_point() and logits.shape[-1] == 1 and labels.numel() == logits.shape[0]:
        weights, units = loss_weights(torch.zeros(labels.numel(), dtype=torch.long, device=labels.device), weighting,
                                      batch_total)
        squared = (logits.reshape(-1).float() - labels.reshape(-1).float()).square()
        return (squared * weights).sum(), torch.tensor(labels.numel()), units
    if logits.dim() == 2 and labels.shape == logits.shape[:1]:
        weights, units = loss_weights(labels, weighting, batch_total)
        return weighted_cross_entropy(logits, labels, weights), labels.ne(IGNORE_INDEX).sum(), units
    raise ValueError(
        f"cannot tell how to compute the loss for logits of shape {tuple(logits.shape)} and labels of "
        f"shape {tuple(labels.shape)}; pass loss_fn=(outputs, targets) -> summed loss"
    )


def sampled_label_loss(outputs, token_mask: torch.Tensor | None, generator: torch.Generator,
                       weighting: str = "token",
                       batch_total: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """True-Fisher loss: cross-entropy against labels drawn from the model's own prediction.

    Token-level logits (B, T, V): one label per counted token; sequence-level (B, C): one per
    sample. Sampling is done without gradient, a chunk of rows at a time; the per-position losses
    are weighted as :func:`loss_weights` says. Returns ``(loss, number of loss units)``.
    """
    logits = output_logits(outputs)
    flat = logits.reshape(-1, logits.shape[-1])
    sampled = torch.empty(flat.shape[0], dtype=torch.long)
    with torch.no_grad():
        for rows in loss_row_chunks(flat):
            probs = torch.softmax(flat[rows].float(), dim=-1).cpu()
            sampled[rows] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    sampled = sampled.to(flat.device)
    if logits.dim() == 3 and token_mask is not None:
        sampled = sampled.masked_fill(~token_mask.reshape(-1), IGNORE_INDEX)
    labels = sampled.reshape(logits.shape[:-1])
    weights, units = loss_weights(labels, weighting, batch_total)
    return weighted_cross_entropy(flat, sampled, weights.reshape(-1)), units


def check_losses_finite(losses: list[tuple[int, torch.Tensor]]) -> None:
    """The first batch whose loss is not finite, named in a ValueError (read once, after the pass)."""
    if not losses:
        return
    finite = torch.stack([loss.float() for _, loss in losses]).isfinite()
    if bool(finite.all()):
        return
    at = int((~finite).to(torch.int64).argmax())
    index, loss = losses[at]
    raise ValueError(f"batch {index}: the loss is not finite ({loss.item()})")


def batch_loss(model, prepared, loss_fn, fisher, generator, causal, check, weighting,
                 batch_total=None, hooks=None) -> tuple[torch.Tensor, int]:
    """The batch's calibration loss (weighted per ``weighting``) and its number of loss units."""
    labels = prepared.targets
    try:
        if check and loss_fn is None and fisher == "empirical":
            check_model_loss(model, prepared, causal, hooks)
        outputs = model(*prepared.args, **prepared.kwargs)
    except IndexError as err:  # read the ids only now that the model failed: no cost on the way
        _explain_index_error(model, prepared, err)
        raise
    if fisher == "true":
        return sampled_label_loss(outputs, prepared.output_token_mask, generator, weighting, batch_total)
    if loss_fn is not None:
        loss = loss_fn(outputs, labels)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if check:
            _refuse_mean_loss(loss, outputs, labels, causal)
        return loss, token_count(prepared)
    loss, _, units = summed_model_loss(outputs, labels, causal=causal, weighting=weighting, batch_total=batch_total)
    return loss, units


@torch.no_grad()
def check_model_loss(model, prepared, causal: bool, hooks=None) -> None:
    """The loss recomputed from the logits must match the model's own (given ``labels``) on the
    batch's first sequence, else the model computes another loss and ``loss_fn`` is needed. One
    sequence without autograd and with the hooks paused: the model's own loss (Hugging Face's
    upcasts all the logits to fp32) then costs no memory on the scale of the batch's logits."""
    one = split_batch(prepared, 1)[0]
    if hooks is not None:
        hooks.paused = True
    try:
        outputs = model(*one.args, **one.kwargs, labels=one.targets)
    finally:
        if hooks is not None:
            hooks.paused = False
    model_loss = getattr(outputs, "loss", None)
    summed, count, _ = summed_model_loss(outputs, one.targets, causal=causal)
    count = int(count)
    if model_loss is None or count == 0:
        return
    model_loss = model_loss.item()
    if not math.isfinite(model_loss):
        raise ValueError(f"the model's own loss is {model_loss}: its outputs are not finite (check its weights "
                         "and inputs)")
    mean = summed.item() / count
    if not math.isclose(mean, model_loss, rel_tol=2e-2, abs_tol=1e-4):
        raise ValueError(
            f"the summed loss recomputed from logits ({mean:.6g} per token) does not match the model's "
            f"own loss ({model_loss:.6g}); pass loss_fn=(outputs, targets) -> summed loss"
        )


def _explain_index_error(model, prepared, err: IndexError) -> None:
    """An input id outside the model's vocabulary, said as such (the embedding's IndexError says
    'index out of range in self')."""
    ids = prepared.kwargs.get("input_ids")
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(ids, torch.Tensor) or size is None or not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise ValueError(f"input ids range from {low} to {high}, outside the model's vocabulary of {size} (a "
                         "tokenizer of another model?)") from err


def _refuse_mean_loss(loss: torch.Tensor, outputs, labels, causal: bool) -> None:
    """A ``loss_fn`` must return a sum; one whose value is the cross-entropy *mean* over the
    batch's labels (checked where the outputs have logits the labels fit) is refused."""
    try:
        with torch.no_grad():
            summed, count, _ = summed_model_loss(outputs, labels, causal=causal)
            count = int(count)
    except (ValueError, TypeError, RuntimeError):
        return  # not a cross-entropy we can recompute: nothing to compare with
    value, summed = float(loss.detach()), float(summed)
    if count > 1 and math.isclose(value, summed / count, rel_tol=1e-3) and not math.isclose(value, summed, rel_tol=1e-3):
        raise ValueError(f"loss_fn returned {value:.6g}, the mean over the batch's {count} labels (their sum is "
                         f"{summed:.6g}): it must return the sum, e.g. nn.CrossEntropyLoss(reduction='sum'), so that "
                         "statistics do not depend on batch sizes")


def token_count(prepared) -> torch.Tensor | int:
    """Counted tokens of a batch (the loss units of a user's summed ``loss_fn``), on the device."""
    mask = prepared.output_token_mask
    return prepared.num_sequences if mask is None else mask.sum()
