"""K-FAC statistics: what methods request, the calibration pass that collects it."""

from .collector import collect_statistics
from .containers import KFACStatistics, LayerStatistics, StatisticsRequest

__all__ = ["collect_statistics", "KFACStatistics", "LayerStatistics", "StatisticsRequest"]
