"""The backend registry: which statistics backends can run here (decided once, at import) and, for
``backend="auto"``, the measured choice per device (:mod:`.autotune`)."""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace

import torch

from . import reference
from .autotune import AutoOps

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("cuda", "triton", "cublas", "torch")
PIN_VARIABLE = "FISHER_KERNELS_BACKEND"  # pins backend="auto" to one backend
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
        masked_syrk_=_on_accumulator_device(triton_gram.masked_syrk_),
        masked_outer_=_on_accumulator_device(triton_gram.masked_outer_),
        masked_column_sumsq_=_on_accumulator_device(triton_column_sumsq.masked_column_sumsq_),
        masked_projected_energy_=_on_accumulator_device(triton_projected_energy.masked_projected_energy_),
    )


def _on_accumulator_device(op):
    """Launch under the accumulator's CUDA device (Triton launches on the current device, so
    tensors on ``cuda:1`` would otherwise be read from the wrong GPU)."""

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    @functools.wraps(op)
    def run(acc, *args):
        if not acc.is_cuda:
            if not interpreted:
                raise ValueError(f"backend 'triton' needs CUDA tensors, got an accumulator on {acc.device} "
                                 "(use backend='auto' or 'torch' there; TRITON_INTERPRET=1 runs it on CPU for tests)")
            return op(acc, *args)
        with torch.cuda.device(acc.device):
            return op(acc, *args)

    return run


def _load_cuda() -> SimpleNamespace:
    from . import cuda_extension

    return _namespace("cuda", cuda_extension.load())


def _load_cublas() -> SimpleNamespace:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    from . import cublas

    return _namespace("cublas", cublas)


def _probe_backends() -> dict[str, tuple[SimpleNamespace | None, str]]:
    registry: dict[str, tuple[SimpleNamespace | None, str]] = {}
    for name, loader in (("cuda", _load_cuda), ("triton", _load_triton), ("cublas", _load_cublas)):
        try:
            registry[name] = (loader(), "available")
        except Exception as err:  # ImportError, missing device, failed build: fall back quietly
            reason = f"{type(err).__name__}: {err}"
            logger.debug("fisher_kernels backend %r unavailable: %s", name, reason)
            registry[name] = (None, reason)
    registry["torch"] = (_namespace("torch", reference), "pure PyTorch reference, always available")
    return registry


_REGISTRY = _probe_backends()


_AUTO: dict[torch.device, AutoOps] = {}


def backends() -> dict[str, dict[str, object]]:
    """Which statistics backends are available here and, for the others, why not.

    Returns ``{name: {"available": bool, "reason": str}}`` for ``cuda``, ``triton``, ``cublas``
    and ``torch``, and for ``"auto"`` also ``"chosen"``: what it chose so far on each CUDA
    device, per op, input dtype and size bucket: the backend, each correct backend's speed
    relative to the PyTorch reference, and the backends rejected by the correctness probe and
    why. CPU tensors always use the PyTorch reference.
    """
    out: dict[str, dict[str, object]] = {
        name: {"available": ops is not None, "reason": reason} for name, (ops, reason) in _REGISTRY.items()}
    out["auto"] = {"available": True,
                   "reason": "CUDA tensors: per op, dtype and size the fastest backend that passed a correctness "
                             "probe; CPU tensors: torch" + (f"; pinned to {os.environ[PIN_VARIABLE]!r} by "
                                                            f"${PIN_VARIABLE}" if os.environ.get(PIN_VARIABLE) else ""),
                   "chosen": {str(device): auto.report() for device, auto in _AUTO.items()}}
    return out


def _auto(device: torch.device) -> SimpleNamespace:
    pinned = os.environ.get(PIN_VARIABLE)
    if pinned:
        return get_ops(pinned, device)
    if device.type != "cuda":
        return _REGISTRY["torch"][0]
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _AUTO:
        available = {name: _REGISTRY[name][0] for name in BACKEND_NAMES if _REGISTRY[name][0] is not None}
        _AUTO[device] = AutoOps(device, available)
    return _AUTO[device]


def get_ops(backend: str = "auto", device: torch.device | str | None = None) -> SimpleNamespace:
    """The update functions of ``backend`` (``"auto" | "cuda" | "triton" | "cublas" | "torch"``)
    for tensors on ``device``. ``"auto"``: on a CUDA device the fastest backend that passed a
    correctness probe, per op, dtype and size (see :mod:`fisher_kernels.ops.autotune`); on
    other devices the PyTorch reference; ``$FISHER_KERNELS_BACKEND`` pins it."""
    if backend == "auto":
        return _auto(torch.device(device) if device is not None else torch.device("cpu"))
    if backend not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(map(repr, BACKEND_NAMES))}; got {backend!r}")
    ops, reason = _REGISTRY[backend]
    if ops is None:
        raise ValueError(f"backend {backend!r} is not available here: {reason}")
    return ops
