"""The ``peft.LoraConfig`` an initialisation creates: the user's config, checked before any work.
"""

from __future__ import annotations



import copy
import warnings






def make_lora_config(target_names: list[str], r: int, lora_alpha: float, lora_config=None, fan_in_fan_out=False,
                     kasa: bool = False, heads: list[str] | tuple = (), method: str = ""):
    """The ``LoraConfig`` of the adapters (a copy of ``lora_config`` when given), checked before
    any work is done. Its ``target_modules`` become the explicit list of layers to initialise:
    ``target_names`` less what the config's ``exclude_modules``, ``modules_to_save`` and
    ``layers_to_transform``/``layers_pattern`` leave out, as PEFT would.

    ``fan_in_fan_out`` must be True for GPT-2 ``Conv1D`` targets. ``kasa``: the adapters are PEFT's
    KaSA variant (``lora_config.kasa_config`` if set, else ``KasaConfig()``). ``heads``: task heads
    trained in full when the config names neither ``modules_to_save`` nor a ``task_type`` (as
    PEFT's classification task types do).
    """
    from peft import LoraConfig

    if lora_config is not None and lora_config.init_lora_weights is not True:
        raise ValueError(f"lora_config.init_lora_weights={lora_config.init_lora_weights!r} asks PEFT for another "
                         f"initialisation, which method={method!r} would overwrite: leave it at its default (True)"
                         + (f", or use method={lora_config.init_lora_weights!r}"
                            if lora_config.init_lora_weights in ("pissa", "milora", "gaussian") else ""))
    config = LoraConfig(r=r, lora_alpha=lora_alpha) if lora_config is None else copy.deepcopy(lora_config)
    if heads and config.modules_to_save is None and config.task_type is None:
        config.modules_to_save = list(heads)
    if kasa:
        try:
            from peft import KasaConfig
        except ImportError:
            import peft

            raise ImportError(f"method='kasa' uses PEFT's KaSA adapter (KasaConfig), which peft {peft.__version__} "
                              "lacks: upgrade peft") from None
        if fan_in_fan_out:
            raise ValueError("method='kasa' needs nn.Linear targets: PEFT's KaSA does not support Conv1D "
                             "(fan_in_fan_out) layers")
        config.kasa_config = getattr(config, "kasa_config", None) or KasaConfig()
    elif getattr(config, "kasa_config", None) is not None:
        raise ValueError("lora_config.kasa_config is set, which makes PEFT truncate the base weights: use "
                         "method='kasa', or a LoraConfig without kasa_config")
    if getattr(config, "use_dora", False):
        raise ValueError("lora_config.use_dora=True is not supported: DoRA rescales the adapter, "
                         "which would break the initialisation")
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ValueError("lora_config.rank_pattern / alpha_pattern are not supported yet: use one r and lora_alpha")
    if getattr(config, "target_parameters", None):
        warnings.warn(
            f"lora_config.target_parameters={list(config.target_parameters)}: PEFT adapts these parameters (fused "
            "3-D mixture-of-experts weights) with its default initialisation (lora_A Kaiming-uniform, lora_B "
            f"zero); method={method!r} initialises only the nn.Linear/Conv1D target layers", UserWarning, stacklevel=3)
    config.target_modules = _selected_by_config(list(target_names), config)
    config.init_lora_weights = True
    config.fan_in_fan_out = fan_in_fan_out
    return config


def _selected_by_config(names: list[str], config) -> list[str]:
    """``names`` less the layers the config's ``exclude_modules``, ``modules_to_save`` and
    ``layers_to_transform``/``layers_pattern`` leave out (PEFT's own matching, applied to the
    names' suffixes so that its layer-index rules take effect)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = copy.deepcopy(config)
    probe.target_modules = sorted({name.split(".")[-1] for name in names})
    kept = [name for name in names if check_target_module_exists(probe, name)]
    if not kept:
        raise ValueError(f"no target layer is left after the LoraConfig's exclude_modules={config.exclude_modules!r}, "
                         f"modules_to_save={config.modules_to_save!r}, layers_to_transform={config.layers_to_transform!r}"
                         f" (targets before: {names[:4]}{'...' if len(names) > 4 else ''})")
    return kept
