"""fisher_kernels: data-aware LoRA initialisation from K-FAC (Fisher) statistics.

``init_lora(model, loader)`` runs one calibration pass, picks the LoRA directions the
data's curvature says matter most, and returns a ready-to-train ``peft.PeftModel``.
"""

from .api import InitReport, compute_initialization, init_lora
from .layers import resolve_target_modules
from .methods import METHODS
from .ops import backends
from .peft_wiring import save_residual_model
from .statistics import KFACStatistics, LayerStatistics, StatisticsRequest, collect_statistics

__version__ = "0.1.0"

__all__ = [
    "init_lora", "compute_initialization", "collect_statistics", "backends", "save_residual_model",
    "resolve_target_modules", "InitReport", "KFACStatistics", "LayerStatistics", "StatisticsRequest", "METHODS",
    "__version__",
]
