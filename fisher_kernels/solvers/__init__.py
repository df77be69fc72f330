"""Eigensolvers for many layers' matrices at once.

Every solver answers ``solver(matrices (b, n, n), k, largest) -> (values (b, k), vectors (b, n, k))``.
"""

from .eigh import eigh_extreme
from .lobpcg import LOBPCGResult, lobpcg, lobpcg_extreme

__all__ = ["eigh_extreme", "lobpcg", "lobpcg_extreme", "LOBPCGResult"]
