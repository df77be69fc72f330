"""Turning one calibration batch into model inputs, a token mask and a *summed* loss.

Statistics must not depend on how the loader batches the data, so the loss that is
back-propagated is the sum over counted tokens (or samples), never a mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers import row_blocks

IGNORE_INDEX = -100


@dataclass
class PreparedBatch:
    args: tuple
    kwargs: dict
    targets: object            # labels (dict batches) or the targets of an (inputs, targets) pair
    token_mask: torch.Tensor | None  # (B, T) bool; None means every token counts
    num_sequences: int
    # encoder-decoder models: the decoder's positions (B, T_dec) that count; token_mask is the encoder's
    decoder_token_mask: torch.Tensor | None = None

    @property
    def output_token_mask(self) -> torch.Tensor | None:
        """The mask of the positions the logits belong to (the decoder's for encoder-decoder models)."""
        return self.decoder_token_mask if self.decoder_token_mask is not None else self.token_mask


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


EXAMPLE_BATCH_SIZE = 8  # examples per batch when the loader holds unbatched examples
_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "decoder_attention_mask": 0, "token_type_ids": 0}


def _is_example(item) -> bool:
    """One tokenised example (a dict whose ``input_ids`` is a list of ints or a 1-D tensor)
    rather than a batch."""
    if not isinstance(item, Mapping):
        return False
    ids = item.get("input_ids")
    return isinstance(ids, (list, tuple)) or (isinstance(ids, torch.Tensor) and ids.dim() == 1)


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def collate_examples(examples: list, pad_token_id: int) -> dict:
    """Tokenised examples as one right-padded batch: ``input_ids`` padded with ``pad_token_id``,
    ``attention_mask`` with 0, ``labels`` with -100; equal-shaped fields are stacked."""
    keys = [k for k in examples[0] if k != "text"]
    missing = [k for k in keys if any(k not in e for e in examples)]
    if missing:
        raise ValueError(f"examples differ in their fields ({missing} missing from some)")
    batch = {}
    for key in keys:
        values = [_as_tensor(e[key]) for e in examples]
        if all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
            continue
        if any(v.dim() != 1 for v in values):
            raise ValueError(f"cannot pad field {key!r}: its values have shapes {[tuple(v.shape) for v in values][:4]}")
        fill = _PAD_VALUES.get(key, pad_token_id if key.endswith("input_ids") else 0)
        length = max(v.shape[0] for v in values)
        batch[key] = torch.stack([F.pad(v, (0, length - v.shape[0]), value=fill) for v in values])
    return batch


class CollatedExamples:
    """A re-iterable loader over a list or ``datasets.Dataset`` of tokenised examples, in batches
    of ``batch_size`` padded by :func:`collate_examples`."""

    def __init__(self, examples, pad_token_id: int, batch_size: int = EXAMPLE_BATCH_SIZE):
        self.examples, self.pad_token_id, self.batch_size = examples, pad_token_id, batch_size

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.examples), self.batch_size):
            stop = min(start + self.batch_size, len(self.examples))
            yield collate_examples([self.examples[i] for i in range(start, stop)], self.pad_token_id)


def as_batches(loader, model=None):
    """``loader`` itself, unless it is a list (or ``datasets.Dataset``) of unbatched tokenised
    examples: then those, padded into batches of ``EXAMPLE_BATCH_SIZE`` (pad id: the model's
    ``pad_token_id``, else 0)."""
    if not (isinstance(loader, (list, tuple)) or hasattr(loader, "column_names")) or len(loader) == 0:
        return loader
    first = loader[0]
    if isinstance(first, Mapping) and "input_ids" not in first and "text" in first:
        raise ValueError("the calibration examples hold raw 'text': tokenise them first (input_ids, attention_mask "
                         "and labels), e.g. dataset.map(lambda e: tokenizer(e['text']))")
    if not _is_example(first):
        return loader
    pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    return CollatedExamples(loader, 0 if pad_token_id is None else int(pad_token_id))


def causal_label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose output predicts a counted label: ``labels[t + 1] != -100``."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:].ne(IGNORE_INDEX)
    return mask


def prepare_batch(batch, index: int, device, *, token_mask: str, needs_labels: bool, causal: bool,
                  encoder_decoder: bool = False) -> PreparedBatch:
    """Split ``batch`` into model inputs, targets and the mask of tokens that count.

    Dict batches are passed as keyword arguments (``labels`` is kept apart); ``(inputs,
    targets)`` pairs are passed as ``model(**inputs)``, ``model(*inputs)`` or ``model(inputs)``.
    For encoder-decoder models ``token_mask`` is the encoder's (``attention_mask``) and
    ``decoder_token_mask`` the decoder's: ``decoder_attention_mask`` when given (and
    ``token_mask="attention"``), else the positions with a label.
    """
    if isinstance(batch, Mapping):
        if _is_example(batch):
            raise TypeError(
                f"batch {index} is a single unbatched example ('input_ids' is "
                f"{'a list' if not isinstance(batch['input_ids'], torch.Tensor) else 'a 1-D tensor'}): pass "
                "batches of tensors (e.g. a DataLoader with DataCollatorWithPadding), or the examples themselves "
                f"as a list or datasets.Dataset, which are padded into batches of {EXAMPLE_BATCH_SIZE}")
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

    decoder_mask = None
    if encoder_decoder:
        if token_mask == "labels":
            mask = None if attention_mask is None else attention_mask.bool()  # every source token feeds the loss
        given = kwargs.get("decoder_attention_mask")
        if given is not None and token_mask == "attention":
            decoder_mask = given.bool()
        elif isinstance(targets, torch.Tensor) and targets.dim() == 2:
            decoder_mask = targets.ne(IGNORE_INDEX)
    first = first_tensor((args, kwargs))
    if first is not None and first.dim() > 0 and (first.shape[0] == 0 or (first.dim() > 1 and first.shape[1] == 0)):
        raise ValueError(f"batch {index} is empty (its inputs have shape {tuple(first.shape)}): drop empty batches "
                         "from the calibration data")
    num_sequences = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    return PreparedBatch(args, kwargs, targets, mask, num_sequences, decoder_mask)


def split_batch(prepared: PreparedBatch, size: int | None) -> list[PreparedBatch]:
    """``prepared`` cut into micro-batches of at most ``size`` sequences along the first dimension of
    every tensor that has the batch's leading size (``None``: the batch itself). Statistics are
    sums over tokens, so they do not change; only the activations held at once shrink."""
    n = prepared.num_sequences
    if size is None or size >= n:
        return [prepared]

    def cut(value, rows):
        if isinstance(value, torch.Tensor):
            return value[rows] if value.dim() > 0 and value.shape[0] == n else value
        if isinstance(value, Mapping):
            return {k: cut(v, rows) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(cut(v, rows) for v in value)
        return value

    parts = []
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        parts.append(PreparedBatch(cut(prepared.args, rows), cut(prepared.kwargs, rows), cut(prepared.targets, rows),
                                   cut(prepared.token_mask, rows), rows.stop - rows.start,
                                   cut(prepared.decoder_token_mask, rows)))
    return parts


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
