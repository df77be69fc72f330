"""Eigensolvers for many layers' matrices at once."""

from .eigh import eigh_extreme

__all__ = ["eigh_extreme"]
