"""The settings of an initialisation, in three groups (as ``LoraConfig`` groups ``EvaConfig`` /
``LoraGAConfig``); the method's own options are a fourth (:mod:`fisher_kernels.options`).

    init_lora(model, loader, method=FiletOptions(energy="component"),
              calibration=Calibration(num_batches=32, micro_batch_size=2),
              resources=Resources(max_stats_memory="auto"),
              rank_budget=RankBudget(total=512, max_rank=64))

``init_lora``, ``compute_initialization``, ``collect_statistics``, the Trainer callback and the CLI
take the same objects. A field of :class:`Calibration` or :class:`Resources` may also be given as a
keyword (``init_lora(model, loader, num_batches=32, progress=False)``); each name has one meaning.
Every value is checked when the object is made, with a one-line error naming the field.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from dataclasses import dataclass

TOKEN_MASKS = ("attention", "labels")
FISHER_KINDS = ("empirical", "true")


def positive_int(name: str, value, optional: bool = False) -> int | None:
    """``value`` as an int, or a one-line ``ValueError`` naming ``name`` (``None`` passes when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Calibration:
    """How the calibration pass reads the data and forms the loss.

    Args:
        num_batches: use at most this many batches (default: all).
        loss_fn: ``(outputs, targets) -> summed loss`` (``reduction="sum"``), for models without a
            Hugging Face loss or ``(inputs, targets)`` loaders.
        token_mask: ``"attention"`` (every non-padding token) or ``"labels"`` (only positions that
            enter the loss).
        fisher: ``"empirical"`` (labels from the data) or ``"true"`` (labels sampled from the
            model's own predictions).
        label_seed: seed of the labels sampled when ``fisher="true"``.
        micro_batch_size: run each batch as forward+backward passes of at most this many sequences:
            identical statistics, activations of one micro-batch at a time. ``"auto"`` (default):
            whole batches where they fit, else the largest micro-batches that do (planned with
            ``Resources.max_stats_memory``); ``None``: whole batches.
    """

    num_batches: int | None = None
    loss_fn: Callable | None = None
    token_mask: str = "attention"
    fisher: str = "empirical"
    label_seed: int = 0
    micro_batch_size: int | str | None = "auto"

    def __post_init__(self):
        positive_int("num_batches", self.num_batches, optional=True)
        if self.micro_batch_size != "auto":
            positive_int("micro_batch_size", self.micro_batch_size, optional=True)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(self.loss_fn).__name__}")
        if self.token_mask not in TOKEN_MASKS:
            raise ValueError(f"token_mask must be 'attention' or 'labels', got {self.token_mask!r}")
        if self.fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be 'empirical' or 'true', got {self.fisher!r}")
        if isinstance(self.label_seed, bool) or not isinstance(self.label_seed, numbers.Integral) or self.label_seed < 0:
            raise ValueError(f"label_seed must be a non-negative integer, got {self.label_seed!r}")


@dataclass(frozen=True)
class Resources:
    """Where and how the work runs.

    Args:
        backend: statistics kernels, ``"auto" | "cuda" | "triton" | "torch"`` (see
            :func:`fisher_kernels.backends`).
        max_stats_memory: bytes of statistics (and FILet's bases) held at once; layers are then
            processed in groups, one calibration pass each (the loader must be re-iterable).
            ``"auto"`` (default): planned from the free memory of the model's device (CUDA:
            ``mem_get_info``; CPU: available RAM) and the memory estimate: one pass of whole
            batches where it fits, else the fewest passes and the largest micro-batches that do
            (``report.memory_plan`` says what and why). ``None``: one pass, whatever it needs.
        distributed: ``None``: under ``torch.distributed``, statistics summed over the ranks and
            the per-layer work split across them; ``False``: this process alone.
        progress: a line before the work and a bar for every stage longer than a second.
    """

    backend: str = "auto"
    max_stats_memory: int | str | None = "auto"
    distributed: bool | None = None
    progress: bool = True

    def __post_init__(self):
        memory = self.max_stats_memory
        if memory is not None and memory != "auto" and (
                isinstance(memory, bool) or not isinstance(memory, numbers.Integral) or memory < 1):
            raise ValueError(f"max_stats_memory must be a positive number of bytes or 'auto', got {memory!r}")
        if self.distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {self.distributed!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a name such as 'auto', got {type(self.backend).__name__}")


@dataclass(frozen=True)
class RankBudget:
    """FILet only: ``total`` rank over all target layers, spread by Fisher energy (the globally
    largest candidate energies), each layer between ``min_rank`` and ``max_rank`` (default 4 × the
    mean rank). ``rank_budget=512`` is short for ``RankBudget(total=512)``."""

    total: int
    min_rank: int = 1
    max_rank: int | None = None

    def __post_init__(self):
        for name in ("total", "min_rank"):
            positive_int("rank_budget" if name == "total" else name, getattr(self, name))
        positive_int("max_rank", self.max_rank, optional=True)
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise ValueError(f"max_rank={self.max_rank} is below min_rank={self.min_rank}")


CALIBRATION_FIELDS = tuple(f.name for f in dataclasses.fields(Calibration))
RESOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(Resources))


def grouped(keywords: dict, calibration: Calibration | None, resources: Resources | None
            ) -> tuple[Calibration, Resources, dict]:
    """``(calibration, resources, the other keywords)``: the keywords that are fields of a group go
    into it (a field given both ways is refused)."""
    groups = []
    for group, cls, fields in ((calibration, Calibration, CALIBRATION_FIELDS), (resources, Resources, RESOURCE_FIELDS)):
        if group is not None and not isinstance(group, cls):
            raise TypeError(f"{cls.__name__.lower()} must be a {cls.__name__}(...), got {type(group).__name__}")
        given = {k: keywords[k] for k in fields if k in keywords}
        if group is not None and given:
            raise TypeError(f"give {', '.join(given)} either in {cls.__name__}(...) or as keywords, not both")
        groups.append(group if group is not None else cls(**given))
    rest = {k: v for k, v in keywords.items() if k not in CALIBRATION_FIELDS and k not in RESOURCE_FIELDS}
    return groups[0], groups[1], rest


def rank_budget_of(value) -> RankBudget | None:
    """``rank_budget`` as given (an int, a :class:`RankBudget` or ``None``) as a ``RankBudget``."""
    if value is None or isinstance(value, RankBudget):
        return value
    return RankBudget(total=positive_int("rank_budget", value))


def misplaced_keyword_hint(names) -> str:
    """Where a keyword that is no option of the method belongs, when it belongs to another group."""
    hints = []
    if "seed" in names:
        hints.append("the seed of fisher='true' label sampling is Calibration(label_seed=...)")
    if "min_rank" in names or "max_rank" in names:
        hints.append("min_rank and max_rank go into rank_budget=RankBudget(total, min_rank=..., max_rank=...)")
    return ("; " + "; ".join(hints)) if hints else ""
