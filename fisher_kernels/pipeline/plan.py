"""Stage 1, ``plan``: every check and decision made before any work.

:func:`make_plan` checks the model, the method and its options, the rank, the targets and the
weights; says whether a calibration pass is needed and into how many groups of layers (one pass
each) the statistics must be split to fit ``max_stats_memory``; and decides who computes what
(this process, or the ranks of a process group; whole or sharded weights). Everything later stages
need travels in the returned :class:`Plan`; nothing travels beside it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import memory
from ..layers import WeightsOneAtATime, check_rank_fits, resolve_target_modules, weight_matrix
from ..quantized import CheckpointWeights, is_quantized, refuse_unsupported
from ..methods import METHODS
from ..options import method_and_options
from ..settings import Calibration, Resources, misplaced_keyword_hint, positive_int
from ..distributed.sharded import count_nonfinite, sharding_of
from ..distributed.split_work import rank_and_world
from ..statistics import KFACStatistics
from ..statistics.batches import as_batches, first_tensor
from .report import InitReport

@dataclass
class Plan:
    """What will be done, decided before any work; passed from stage to stage.

    ``method`` is the method object (rank, scale, options); ``weights`` are views of the target
    weights (a sharded model's are its shards); ``groups`` are the layers of each calibration pass;
    ``rank``/``world``/``split`` say whether the per-layer work is dealt across ranks;
    ``forward_module`` is what the calibration pass calls (the model, or the ``PeftModel`` around it
    when an existing adapter is initialised: FSDP's root runs the forward); ``base_weights``: for a
    quantized model, the full-precision weights that decompositions and residual bases are computed
    from (else the quantized layers' own, unpacked one at a time).
    """

    model: nn.Module
    method: object
    names: list[str]
    weights: dict[str, torch.Tensor]
    groups: list[list[str]]
    calibration: Calibration
    resources: Resources
    loader: object
    statistics: KFACStatistics | None
    sharding: str | None
    rank: int = 0
    world: int = 1
    split: bool = False
    forward_module: nn.Module | None = None
    base_weights: CheckpointWeights | None = None  # a quantized model's full-precision weights, read per layer
    owners: dict[str, int] | None = None  # {layer: rank} holding its statistics and basis (a sharded split pass)
    report: InitReport = field(default=None)

    @property
    def needs_pass(self) -> bool:
        return self.method.needs_data and self.statistics is None


def check_model(model, existing_adapter: bool = False) -> str | None:
    """Checks ``model``; returns its sharding (``"fsdp2"``, ``"zero3"`` or ``None``, see
    :mod:`fisher_kernels.distributed.sharded`). ``existing_adapter``: ``model`` is the base of a ``PeftModel``
    whose adapter is initialised (its LoRA layers are expected then)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sharding = sharding_of(model, inside_fsdp=existing_adapter)
    if not existing_adapter and any(isinstance(m, LoraLayer) for m in model.modules()):
        raise TypeError("model holds LoRA layers but is not a PeftModel: pass the base model, or the PeftModel "
                        "itself to initialise one of its adapters")
    return sharding


def make_plan(model: nn.Module, loader, *, method, r: int, scale: float, target_modules, method_options: dict,
              calibration: Calibration, resources: Resources, statistics: KFACStatistics | None,
              rank_is_a_cap: bool = False, existing_adapter: bool = False,
              forward_module: nn.Module | None = None, base_weights=None) -> Plan:
    """Stage 1: check everything and decide the groups and who computes what (see the module)."""
    sharding = check_model(model, existing_adapter)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale (lora_alpha / r) must be a positive number, got {scale!r}")
    method, method_options = method_and_options(method, method_options)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    unknown = sorted(set(method_options) - set(METHODS[method].option_names()))
    if unknown:
        raise TypeError(f"method {method!r} got unexpected options {unknown}; it accepts "
                        f"{METHODS[method].option_names() or 'none'}{misplaced_keyword_hint(unknown)}")
    r = positive_int("r", r)
    names = resolve_target_modules(model, target_modules)
    refuse_unsupported(model, names)
    if not rank_is_a_cap:  # a rank budget's r is each layer's cap, min(r, the layer's min(d))
        check_rank_fits(model, names, r)
    for name in names:
        if model.get_submodule(name).weight.device.type == "meta":
            raise ValueError(f"layer {name!r} has its weight on the meta device: load the weights first "
                             "(fisher_kernels.estimate_memory works on meta models)")
    init_method = METHODS[method](r, scale, **method_options)
    if statistics is not None:  # the statistics say how they were collected; a call asking otherwise is refused
        if not isinstance(statistics, KFACStatistics):
            raise TypeError(f"statistics must be a KFACStatistics (from collect_statistics or KFACStatistics.load), "
                            f"got {type(statistics).__name__}")
        for name, asked, default, collected in (
                ("token_mask", calibration.token_mask, "attention", statistics.token_mask),
                ("fisher", calibration.fisher, "empirical", statistics.fisher)):
            if asked != default and asked != collected:
                raise ValueError(f"{name}={asked!r}, but the given statistics were collected with {name}="
                                 f"{collected!r}: collect them again with {name}={asked!r}, or leave {name} out")
    token_mask = statistics.token_mask if statistics is not None else calibration.token_mask
    fisher = statistics.fisher if statistics is not None else calibration.fisher
    report = InitReport(method=method, r=r, scale=scale, target_modules=names, residual_base=init_method.residual_base,
                        options=dict(method_options, token_mask=token_mask, fisher=fisher,
                                     label_seed=calibration.label_seed, num_batches=calibration.num_batches,
                                     micro_batch_size=calibration.micro_batch_size))
    # views, no copies (a sharded model's are its shards, gathered one layer at a time where needed; a
    # quantized model's are unpacked one layer at a time, when a stage reads them)
    quantized = [name for name in names if is_quantized(model.get_submodule(name))]
    if quantized and method == "kasa":
        raise ValueError(f"KaSA truncates each base weight inside PEFT's KaSA layer, which PEFT does not provide for "
                         f"bitsandbytes layers ({quantized[0]!r} is quantized): use another method, or the "
                         "unquantized model")
    if base_weights is not None and not quantized:
        raise ValueError("base_weights gives a quantized model's full-precision weights; this model's target layers "
                         "are not quantized (their own weights are used)")
    checkpoint = CheckpointWeights(base_weights, model, names) if base_weights is not None else None
    if checkpoint is not None:
        weights = checkpoint
    elif quantized:
        weights = WeightsOneAtATime(model, names)
    else:
        weights = {name: weight_matrix(model.get_submodule(name)).detach() for name in names}
    for name, bad in count_nonfinite(model, names).items():
        if bad:
            raise ValueError(f"layer {name!r}: its weight holds {bad} NaN or Inf entries; the model's weights are "
                             "corrupted (nothing was changed)")
    if init_method.needs_data and statistics is None and loader is None:
        raise ValueError(f"method {method!r} needs calibration data: pass a loader")
    loader = as_batches(loader, model)  # a list / Dataset of unbatched examples: padded batches
    plan = Plan(model=model, method=init_method, names=names, weights=weights, groups=[names], calibration=calibration,
                resources=resources, loader=loader, statistics=statistics, sharding=sharding,
                forward_module=forward_module, base_weights=checkpoint, report=report)
    if sharding and resources.distributed is False:
        raise ValueError(f"the model is sharded ({sharding}): every rank holds a part of each weight, so every rank "
                         "must take part; distributed=False is not possible")
    plan.rank, plan.world = rank_and_world() if resources.distributed is not False else (0, 1)
    plan.split = plan.world > 1 and init_method.splittable  # each rank computes its share of the layers
    report.split_ranks = plan.world if plan.split else 1
    if not init_method.needs_data:
        report.memory_plan = "no calibration pass"
    elif statistics is not None:
        report.memory_plan = "statistics given: no calibration pass"
    else:
        budget = plan_memory_of(plan, rank_is_a_cap)
        held = memory.layer_held_bytes(model, init_method, names)
        owning = plan.world if plan.split and sharding else 1  # statistics and bases on one owner per layer
        plan.groups = memory.plan_layer_groups(held, budget, owning)
        if owning > 1:
            plan.owners = memory.group_owners(held, plan.groups, owning)
        if len(plan.groups) > 1 and iter(loader) is loader:
            raise ValueError(f"max_stats_memory={resources.max_stats_memory} needs {len(plan.groups)} passes over the "
                             "data, so the loader must be re-iterable (a DataLoader or a list, not a generator)")
        if "calibration pass" not in report.memory_plan:
            report.memory_plan += f"; {len(plan.groups)} calibration pass{'es' if len(plan.groups) > 1 else ''}"
    if resources.progress:  # what is about to happen, before the first stage
        tqdm.write(summary_line(plan), file=sys.stderr)
    return plan


def summary_line(plan: Plan) -> str:
    """One line before the work: method, rank, layers, data, memory plan."""
    count = plan.calibration.num_batches
    if count is None and hasattr(plan.loader, "__len__"):
        count = len(plan.loader)
    data = ((f"{count} calibration batch{'es' if count != 1 else ''}" if count is not None else "calibration data")
            if plan.needs_pass else "no calibration pass")
    return (f"fisher_kernels: {plan.method.name}, r {plan.method.r}, {len(plan.names)} layers; {data}; "
            f"{plan.report.memory_plan}")


def plan_memory_of(plan: Plan, rank_is_a_cap: bool) -> int | None:
    """Bytes of statistics (and bases) per calibration pass, and the micro-batches, as the settings say:
    ``"auto"`` (the default for both) plans them from the free memory of the model's device and
    :func:`fisher_kernels.memory.plan_memory`; a number or ``None`` is kept. Sets
    ``plan.calibration.micro_batch_size`` and ``report.memory_plan`` (what was planned and why)."""
    max_stats_memory = plan.resources.max_stats_memory
    micro_batch_size = plan.calibration.micro_batch_size
    model, sharded_split = plan.model, bool(plan.sharding) and plan.split
    if plan.sharding:  # the estimate runs the forward on meta tensors: a sharded model's meta twin from its config
        model = meta_twin(plan.model) if sharded_split and plan.sharding == "fsdp2" else None
        if model is None:
            max_stats_memory = None if max_stats_memory == "auto" else max_stats_memory
            micro_batch_size = None if micro_batch_size == "auto" else micro_batch_size
            plan.calibration = dataclasses.replace(plan.calibration, micro_batch_size=micro_batch_size)
    if max_stats_memory != "auto" and micro_batch_size != "auto":
        plan.report.memory_plan = ("one calibration pass: no max_stats_memory given" if max_stats_memory is None else
                                   f"max_stats_memory={int(max_stats_memory)} bytes"
                                   f"{' per rank' if sharded_split else ''}, as given")
        if plan.sharding and model is None:
            plan.report.memory_plan += (f" (a {plan.sharding} model without a Hugging Face config to rebuild on meta "
                                        "is not planned: give the numbers)")
        return None if max_stats_memory is None else int(max_stats_memory)
    device = next((p.device for p in plan.model.parameters()), torch.device("cpu"))
    free, source = memory.available_memory(device)  # read here, so that a test can stand in for it
    batch_size, seq_len = batch_shape(plan.loader)
    try:
        planned = memory.plan_memory(model, plan.method, plan.names, batch_size=batch_size, seq_len=seq_len,
                                     free_bytes=free, source=source, max_stats_memory=max_stats_memory,
                                     micro_batch_size=micro_batch_size, can_repeat=iter(plan.loader) is not plan.loader,
                                     rank_is_a_cap=rank_is_a_cap, world_size=plan.world if sharded_split else 1)
    except MemoryError:
        raise
    except Exception as error:  # the estimate's forward on meta tensors takes input_ids alone: not every model does
        if max_stats_memory == "auto" and micro_batch_size == "auto":
            plan.calibration = dataclasses.replace(plan.calibration, micro_batch_size=None)
            plan.report.memory_plan = (f"not planned (the memory estimate cannot run this model: "
                                       f"{type(error).__name__}); one calibration pass of whole batches")
            return None
        raise ValueError(f"max_stats_memory={max_stats_memory!r}, micro_batch_size={micro_batch_size!r}: the memory "
                         f"estimate that plans 'auto' cannot run this model ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}); give both as numbers or None") from None
    plan.calibration = dataclasses.replace(plan.calibration, micro_batch_size=planned.micro_batch_size)
    plan.report.options["micro_batch_size"] = planned.micro_batch_size
    plan.report.memory_plan = f"planned: {planned.reason}"
    return planned.budget


def meta_twin(model: nn.Module) -> nn.Module | None:
    """The model rebuilt on the ``meta`` device from its Hugging Face config, in its dtype (what the
    memory estimate of a sharded model runs); ``None`` when it has no config or cannot be rebuilt."""
    config = getattr(model, "config", None)
    from torch.distributed.fsdp import FSDPModule

    cls = next((c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule)), None)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if config is None or cls is None or not hasattr(cls, "config_class"):
        return None
    try:
        with torch.device("meta"):
            twin = cls(config)
    except Exception:  # a model class whose constructor takes more than its config
        return None
    return twin.to(dtype)


def batch_shape(loader) -> tuple[int, int]:
    """``(batch size, sequence length)`` of the loader's first batch, for memory planning
    (peeks only at re-iterable loaders; a generator gives (1, 1))."""
    if iter(loader) is loader:
        return 1, 1
    batch = next(iter(loader), None)
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        return 1, 1
    return max(1, int(tensor.shape[0])), max(1, int(tensor.shape[1])) if tensor.dim() > 1 else 1
