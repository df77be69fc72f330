"""K-FAC statistics: what methods request, the calibration pass that collects it, the cache."""

from .collector import collect_statistics, full_statistics_requests
from .containers import (KFACStatistics, LayerStatistics, SingularBasis, StatisticsRequest, load_statistics,
                         save_statistics)
from .fingerprint import model_fingerprint

__all__ = ["collect_statistics", "full_statistics_requests", "load_statistics", "save_statistics",
           "model_fingerprint", "KFACStatistics", "LayerStatistics", "SingularBasis", "StatisticsRequest"]
