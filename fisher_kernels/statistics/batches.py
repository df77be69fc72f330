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
