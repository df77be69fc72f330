"""Statistics update ops and the backend registry.

Four in-place updates of fp32 accumulators, each with one signature across backends:

    masked_syrk_(acc, x, mask)                    acc += xᵀ diag(mask) x     (upper triangle at least)
    masked_column_sumsq_(acc, x, mask)            acc += Σ_t mask_t x_t²
    masked_projected_energy_(acc, x, basis, mask) acc += Σ_t mask_t (basisᵀ x_t)²
    masked_outer_(acc, g, x, mask)                acc += gᵀ diag(mask) x

``reference.py`` is the PyTorch definition; ``triton_*.py`` and the CUDA extension (``csrc/``)
must match it. The registry is decided once, at import: which backends can run here and, for
the others, why not. A backend that cannot load falls back quietly (debug log).
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import torch

from . import reference

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("cuda", "triton", "torch")
OP_NAMES = ("masked_syrk_", "masked_column_sumsq_", "masked_projected_energy_", "masked_outer_")


def _namespace(name: str, module) -> SimpleNamespace:
    return SimpleNamespace(name=name, **{op: getattr(module, op) for op in OP_NAMES})


def _load_triton() -> SimpleNamespace:
    import triton  # noqa: F401  (ImportError: not installed)

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpreted):
        raise RuntimeError("no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, for testing)")
    from . import triton_column_sumsq, triton_gram, triton_projected_energy

    return SimpleNamespace(
        name="triton",
        masked_syrk_=triton_gram.masked_syrk_,
        masked_outer_=triton_gram.masked_outer_,
        masked_column_sumsq_=triton_column_sumsq.masked_column_sumsq_,
        masked_projected_energy_=triton_projected_energy.masked_projected_energy_,
    )


def _load_cuda() -> SimpleNamespace:
    from . import cuda_extension

    return _namespace("cuda", cuda_extension.load())


def _probe_backends() -> dict[str, tuple[SimpleNamespace | None, str]]:
    registry: dict[str, tuple[SimpleNamespace | None, str]] = {}
    for name, loader in (("cuda", _load_cuda), ("triton", _load_triton)):
        try:
            registry[name] = (loader(), "available")
        except Exception as err:  # ImportError, missing device, failed build: fall back quietly
            reason = f"{type(err).__name__}: {err}"
            logger.debug("fisher_kernels backend %r unavailable: %s", name, reason)
            registry[name] = (None, reason)
    registry["torch"] = (_namespace("torch", reference), "pure PyTorch reference, always available")
    return registry


_REGISTRY = _probe_backends()


def backends() -> dict[str, dict[str, object]]:
    """Which statistics backends are available here and, for the others, why not.

    Returns ``{name: {"available": bool, "reason": str}}`` for ``cuda``, ``triton`` and
    ``torch``. ``backend="auto"`` takes, for CUDA tensors, the first available of
    cuda > triton > torch, and for CPU tensors the PyTorch reference.
    """
    return {name: {"available": ops is not None, "reason": reason} for name, (ops, reason) in _REGISTRY.items()}


def get_ops(backend: str = "auto", device: torch.device | str | None = None) -> SimpleNamespace:
    """The update functions of ``backend`` (``"auto" | "cuda" | "triton" | "torch"``) for
    tensors on ``device``."""
    if backend == "auto":
        if device is not None and torch.device(device).type == "cuda":
            for name in BACKEND_NAMES:
                if _REGISTRY[name][0] is not None:
                    return _REGISTRY[name][0]
        return _REGISTRY["torch"][0]
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}; got {backend!r}")
    ops, reason = _REGISTRY[backend]
    if ops is None:
        raise ValueError(f"backend {backend!r} is not available here: {reason}")
    return ops
