"""Statistics update ops and the backend registry.

The registry is decided once, at import: it records which backends can run here and why
the others cannot. ``get_ops(backend)`` returns the namespace of update functions for a
backend name (``"auto"`` picks the best available one).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

from . import reference

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("cuda", "triton", "torch")

_REFERENCE_OPS = SimpleNamespace(
    name="torch",
    masked_syrk_=reference.masked_syrk_,
    masked_column_sumsq_=reference.masked_column_sumsq_,
    masked_projected_energy_=reference.masked_projected_energy_,
    masked_outer_=reference.masked_outer_,
)


def _probe_backends() -> dict[str, tuple[SimpleNamespace | None, str]]:
    registry: dict[str, tuple[SimpleNamespace | None, str]] = {
        "cuda": (None, "no fused CUDA kernels are built into this version"),
        "triton": (None, "no Triton kernels are shipped in this version"),
        "torch": (_REFERENCE_OPS, "pure PyTorch reference, always available"),
    }
    for name, (ops, reason) in registry.items():
        if ops is None:
            logger.debug("fisher_kernels backend %r unavailable: %s", name, reason)
    return registry


_REGISTRY = _probe_backends()


def backends() -> dict[str, dict[str, object]]:
    """Which statistics backends are available here and, for the others, why not.

    Returns ``{name: {"available": bool, "reason": str}}`` for ``cuda``, ``triton`` and
    ``torch``; ``auto`` resolves to the first available in that order.
    """
    return {
        name: {"available": ops is not None, "reason": reason}
        for name, (ops, reason) in _REGISTRY.items()
    }


def get_ops(backend: str = "auto") -> SimpleNamespace:
    """The update functions of ``backend`` (``"auto" | "cuda" | "triton" | "torch"``)."""
    if backend == "auto":
        for name in BACKEND_NAMES:
            ops, _ = _REGISTRY[name]
            if ops is not None:
                return ops
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}; got {backend!r}")
    ops, reason = _REGISTRY[backend]
    if ops is None:
        raise ValueError(f"backend {backend!r} is not available here: {reason}")
    return ops
