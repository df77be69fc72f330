"""Snapshot and restore of everything a calibration pass may disturb."""

from __future__ import annotations

from torch import nn


class PreservedModelState:
    """Context manager: on exit, restores ``requires_grad`` and ``.grad`` of every parameter,
    ``training`` of every module, and removes the hook handles registered through ``add_hook``.

    Restoration happens on success and on any exception (``KeyboardInterrupt`` included).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list = []

    def add_hook(self, handle) -> None:
        self.handles.append(handle)

    def __enter__(self) -> "PreservedModelState":
        self._requires_grad = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self._training = [(m, m.training) for m in self.model.modules()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for p, requires_grad, grad in self._requires_grad:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in self._training:
            m.training = training
