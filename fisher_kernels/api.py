"""``init_lora``: the whole pipeline in one call (see :mod:`fisher_kernels.pipeline`).

    plan → per group of layers: prepare → collect → solve → write (one transaction)

This module turns the PEFT-style arguments (``r``, ``lora_alpha``, ``lora_config``, an existing
adapter, a rank budget) into a plan, runs the stages, and writes the result.
"""

from __future__ import annotations

import math
import numbers
import warnings

from torch import nn

from .adapters.existing import check_adapter_config, lora_layers_of, warn_about_shared_bases
from .layers import layer_dims, resolve_target_modules, trainable_heads
from .methods import lora_scale
from .options import method_and_options
from .adapters.config import make_lora_config
from .pipeline import make_plan, run_stages, write_existing_adapter, write_new_adapter
from .pipeline.plan import check_model
from .rank_allocation import allocate_ranks, rank_patterns, truncated
from .settings import Calibration, RankBudget, Resources, grouped, positive_int, rank_budget_of
from .distributed.sharded import is_partitioned, sharding_of
from .statistics import KFACStatistics


def init_lora(
    model: nn.Module,
    loader=None,
    *,
    method="filet",
    r: int | None = None,
    lora_alpha: float | None = None,
    target_modules=None,
    lora_config=None,
    adapter_name: str = "default",
    statistics: KFACStatistics | None = None,
    calibration: Calibration | None = None,
    resources: Resources | None = None,
    rank_budget: int | RankBudget | None = None,
    base_weights=None,
    **options,
):
    """Initialise LoRA adapters from calibration data and return a ready-to-train ``PeftModel``.

    Args:
        model: a ``transformers`` model or any ``nn.Module``. It is wrapped in place, as
            ``peft.get_peft_model`` does; if anything fails, it is left as it was. It may be
            sharded with FSDP2 (``fully_shard``), or be a ``PeftModel`` partitioned by DeepSpeed
            ZeRO-3 (``engine.module``): every rank then calls ``init_lora`` with its own shard of
            the data (see :mod:`fisher_kernels.distributed.sharded`).
        loader: iterable of calibration batches: dicts of tensors with ``labels`` (as
            ``transformers`` models take them), or ``(inputs, targets)`` pairs with ``loss_fn``;
            or a list / Dataset of unbatched examples (padded into batches of 8).
            Not needed by the weight-only methods (``gaussian``, ``pissa``, ``milora``).
        method: ``"filet"`` (default), ``"lora_da"``, ``"lora_ga"``, ``"pissa"``, ``"milora"``,
            ``"kasa"`` or ``"gaussian"``, or an options object such as ``FiletOptions(...)``.
        r: LoRA rank (default 16, or ``lora_config.r``).
        lora_alpha: LoRA alpha (default ``r``, so the scale ``s = lora_alpha / r`` is 1).
        target_modules: PEFT-style selector; default every ``nn.Linear`` / ``Conv1D`` except
            the output embedding and task heads.
        lora_config: a ``peft.LoraConfig`` to start from (dropout, rsLoRA, bias, ...); its
            ``r``, ``lora_alpha`` and ``target_modules`` are used unless given here too, in
            which case they must agree.
        adapter_name: when ``model`` is already a ``PeftModel`` (e.g. made by TRL from a
            ``peft_config``), the LoRA adapter of that name is initialised in place: its ``r``,
            ``lora_alpha``, rsLoRA and targets come from its config (``target_modules`` and
            ``lora_config`` must not be given); its ``lora_A``/``lora_B`` parameters are
            overwritten in place, so an optimizer that holds them stays valid; the statistics
            are those of the model with every adapter switched off; other adapters' parameters
            are not touched (a residual method changes the base weights they share: warned).
        statistics: reuse statistics from :func:`collect_statistics` or
            :meth:`KFACStatistics.load` instead of a new pass (checked against the model).
        calibration: :class:`~fisher_kernels.Calibration`: number of batches, ``loss_fn``,
            token mask, empirical or true Fisher, label seed, micro-batches.
        resources: :class:`~fisher_kernels.Resources`: kernels backend, ``max_stats_memory``
            (bytes or ``"auto"``: the layers in groups whose statistics fit, one pass each;
            ``report.memory_plan`` says why), ``distributed``, ``progress``.
        rank_budget: FILet only: the total rank over all target layers (an int, or
            :class:`~fisher_kernels.RankBudget` with ``min_rank``/``max_rank``), spread across
            layers by Fisher energy (see :mod:`fisher_kernels.rank_allocation`). The per-layer
            ranks go into the config's ``rank_pattern`` (and ``alpha_pattern``, keeping every
            layer's scale), so the saved adapter reloads in plain PEFT; ``r`` (default: the
            budget over the number of layers) and ``lora_alpha`` set the scale.
        base_weights: for a model quantized by bitsandbytes (QLoRA), the full-precision checkpoint it
            was loaded from (a directory or ``.safetensors`` file): decompositions and residual bases
            are computed from those weights, read one layer at a time, and ``W − s·B₀A₀`` is
            quantized once. Without it a quantized layer's own weight is unpacked (one layer at a
            time) and its residual re-quantized in place. ``report.quantization_errors`` holds both
            routes' errors (see the docs' QLoRA section).
        **options: the method's options (e.g. ``energy="component"`` for FILet, ``damping`` for
            LoRA-DA; see ``FiletOptions`` and the others), and any field of ``Calibration`` or
            ``Resources`` as a keyword (``num_batches=32``, ``progress=False``).

    Returns:
        ``peft.PeftModel`` whose outputs at step 0 equal the original model's (except for
        floating-point rounding of the residual base weight in bf16/fp16; KaSA changes it by
        design, and LoRA-DA's reference keeps ``W`` so its step-0 model is ``W + s·B₀A₀``).
        Memory: no copy of the weights is held; each layer's base weight is updated in place
        (through an fp32 temporary of that one layer when the model is not fp32), last, after
        everything else succeeded. If that last stage is interrupted, the layers already
        updated are restored as ``W' + P Q`` (exact up to one rounding in the weight's dtype).
        ``filet``, ``lora_da``, ``lora_ga``, ``pissa`` and ``milora`` store ``W' = W − s·B A`` in
        the base layers, ``kasa`` its truncation of W; save with
        :func:`fisher_kernels.save_residual_model`, or, after training, convert to a plain LoRA
        adapter for the original model with :func:`fisher_kernels.save_as_plain_lora` (not KaSA).
        The report of what was done is at ``peft_model.fisher_kernels_report``.
    """
    from peft import LoraConfig, PeftModel

    calibration, resources, method_options = grouped(options, calibration, resources)
    method, method_options = method_and_options(method, method_options)
    budget = rank_budget_of(rank_budget)
    if isinstance(model, PeftModel):
        if target_modules is not None or lora_config is not None:
            raise ValueError("model is a PeftModel: its adapter's config says what to initialise, so target_modules "
                             "and lora_config must not be given")
        if budget is not None:
            raise ValueError("rank_budget spreads ranks over the layers of an adapter init_lora creates; an existing "
                             "adapter's ranks are fixed by its config: pass the base model instead")
        return _init_existing_adapter(model, loader, adapter_name, method, r, lora_alpha, statistics, calibration,
                                      resources, method_options, base_weights)
    if adapter_name != "default":
        raise ValueError(f"adapter_name={adapter_name!r} names an adapter of an existing PeftModel; a base model gets "
                         "PEFT's 'default' adapter (wrap it with peft.get_peft_model(model, config, adapter_name=...) "
                         "first to initialise an adapter of another name)")
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if lora_config is not None:
        for arg, value, config_value in (("r", r, lora_config.r), ("lora_alpha", lora_alpha, lora_config.lora_alpha)):
            if value is not None and value != config_value:
                raise ValueError(f"{arg}={value} disagrees with lora_config.{arg}={config_value}")
        r = lora_config.r
        lora_alpha = lora_config.lora_alpha
        if target_modules is None:
            target_modules = lora_config.target_modules
    if check_model(model) == "zero3":
        name = next(n for n, p in model.named_parameters() if is_partitioned(p))
        raise TypeError(f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3, whose engine's optimizer was fixed "
                        "at deepspeed.initialize: adapters added now would never train. Create the PeftModel first "
                        "(get_peft_model(model, LoraConfig(...)) before deepspeed.initialize, as accelerate and TRL "
                        "do) and pass it (engine.module): init_lora initialises its adapter in place")
    if budget is not None and method != "filet":
        raise ValueError(f"rank_budget needs scores of single directions that compare across layers (FILet's "
                         f"Fisher energies); method {method!r} computes one subspace per layer from statistics "
                         "that give no such score: use method='filet'")
    if r is None and budget is not None:
        r = max(1, round(budget.total / len(resolve_target_modules(model, target_modules))))
    r = 16 if r is None else r
    positive_int("r", r)
    lora_alpha = r if lora_alpha is None else lora_alpha
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}")
    use_rslora = bool(getattr(lora_config, "use_rslora", False))
    scale = lora_scale(lora_alpha, r, use_rslora)

    with warnings.catch_warnings():
        if getattr(lora_config, "target_parameters", None):  # the config's own warning says what they get
            warnings.filterwarnings("ignore", message=r".*mixture-of-experts weights are fused 3-D parameters")
        names = resolve_target_modules(model, target_modules)
    conv1d = [n for n in names if not isinstance(model.get_submodule(n), nn.Linear)]
    if conv1d and len(conv1d) != len(names):
        raise TypeError("target_modules mixes nn.Linear and Conv1D layers, which one PEFT config cannot express; "
                        f"target them in two calls (Conv1D: {conv1d[:3]}...)")
    # checked before the pass: a config PEFT would refuse must not cost a calibration pass
    config = make_lora_config(names, r, lora_alpha, lora_config, fan_in_fan_out=bool(conv1d), kasa=method == "kasa",
                              heads=trainable_heads(model), method=method)
    names = config.target_modules
    computed_rank, max_rank = r, None
    if budget is not None:  # FILet's factors for the most directions any layer may get, then cut
        max_rank = 4 * -(-budget.total // len(names)) if budget.max_rank is None else budget.max_rank
        # each layer's cap is min(max_rank, its own min(d)), not the smallest layer's
        computed_rank = max(min(max_rank, *layer_dims(model.get_submodule(n))) for n in names)
    plan = make_plan(model, loader, method=method, r=computed_rank, scale=scale, target_modules=names,
                     method_options=method_options, calibration=calibration, resources=resources,
                     statistics=statistics, rank_is_a_cap=budget is not None, base_weights=base_weights)
    report = run_stages(plan)
    if budget is not None:
        report.ranks = allocate_ranks({n: init.scores for n, init in report.layers.items()}, budget.total,
                                      budget.min_rank, max_rank)
        report.layers = {n: truncated(init, report.ranks[n], scale) for n, init in report.layers.items()}
        report.r = r
        config.rank_pattern, config.alpha_pattern = rank_patterns(report.ranks, scale, use_rslora)
    return write_new_adapter(model, report, config, scale, resources.progress, sources=plan.base_weights)


def _init_existing_adapter(peft_model, loader, adapter_name, method, r, lora_alpha, statistics, calibration, resources,
                           method_options, base_weights):
    """:func:`init_lora` for one adapter of an existing ``PeftModel`` (see ``fisher_kernels.adapters.existing``)."""
    config = check_adapter_config(peft_model, adapter_name, method, r, lora_alpha)
    layers = lora_layers_of(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layer in the model")
    scale = lora_scale(config.lora_alpha, config.r, config.use_rslora)
    with peft_model.disable_adapter():
        plan = make_plan(peft_model.get_base_model(), loader, method=method, r=config.r, scale=scale,
                         target_modules=[name + ".base_layer" for name in layers], method_options=method_options,
                         calibration=calibration, resources=resources, statistics=statistics, existing_adapter=True,
                         base_weights=base_weights,
                         forward_module=peft_model if sharding_of(peft_model) else None)  # FSDP's root runs forward
        report = run_stages(plan)
    warn_about_shared_bases(layers, adapter_name, report.residual_base)
    return write_existing_adapter(peft_model, adapter_name, layers, report, scale, resources.progress,
                                  sources=plan.base_weights)
