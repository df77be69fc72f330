"""fisher_kernels: data-aware LoRA initialisation from K-FAC (Fisher) statistics.

``init_lora(model, loader)`` runs one calibration pass, picks the LoRA directions the
data's curvature says matter most, and returns a ready-to-train ``peft.PeftModel``.
"""

from .api import init_lora
from .integrations.callback import FisherInitCallback
from .adapters.conversion import save_as_plain_lora, snapshot_adapter
from .layers import resolve_target_modules
from .memory import MemoryEstimate, estimate_memory
from .methods import METHODS
from .ops import backends
from .options import (FiletOptions, GaussianOptions, KaSAOptions, LoraDAOptions, LoraGAOptions, MethodOptions,
                      MiLoRAOptions, PiSSAOptions)
from .adapters.saving import save_residual_model
from .pipeline import InitReport, compute_initialization, plan_layer_groups
from .settings import Calibration, RankBudget, Resources
from .statistics import (KFACStatistics, LayerStatistics, StatisticsRequest, collect_statistics,
                         full_statistics_requests, load_statistics, save_statistics)

from ._version import __version__

__all__ = [
    "init_lora", "compute_initialization", "estimate_memory", "MemoryEstimate", "collect_statistics", "full_statistics_requests", "load_statistics",
    "save_statistics", "save_as_plain_lora", "snapshot_adapter", "plan_layer_groups", "backends", "save_residual_model",
    "resolve_target_modules", "InitReport", "KFACStatistics", "LayerStatistics", "StatisticsRequest", "METHODS",
    "FisherInitCallback", "MethodOptions", "FiletOptions", "LoraDAOptions", "LoraGAOptions", "KaSAOptions",
    "PiSSAOptions", "MiLoRAOptions", "GaussianOptions", "Calibration", "Resources", "RankBudget",
    "__version__",
]
