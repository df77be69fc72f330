"""What an initialisation did: the result every stage adds to, returned by ``compute_initialization``
and attached to the model by ``init_lora`` (``peft_model.fisher_kernels_report``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .._version import __version__
from ..files import write_text_atomically
from ..methods import LayerInit


@dataclass
class InitReport:
    """What an initialisation did and how long each stage took (seconds).

    ``layers`` maps layer names to their ``LayerInit``: the factors, the low-rank base update
    ``(P, Q)`` with ``W' = W − P Q``, the selected directions and their scores. It holds no
    full-size tensor.
    """

    method: str
    r: int
    scale: float
    target_modules: list[str]
    timings: dict[str, float] = field(default_factory=dict)  # decomposition, statistics, initialization, peft, total
    stats_bytes: int = 0                   # most statistics bytes held at once
    stats_bytes_per_group: list[int] = field(default_factory=list)  # one entry per calibration pass
    residual_base: bool = False            # the base weights became W − s·B₀A₀ (plain-LoRA conversion possible)
    prepared_bytes: int = 0                # most bytes of per-layer bases (FILet's singular vectors) held at once
    memory_plan: str = ""                  # how the layers were split into calibration passes, and why
    num_batches: int = 0
    num_tokens: dict[str, int] = field(default_factory=dict)
    layers: dict[str, LayerInit] = field(default_factory=dict)
    initial_adapter: dict = field(default_factory=dict, repr=False)  # {layer: (lora_A0, lora_B0)}, residual methods
    options: dict = field(default_factory=dict)  # the method options and pass settings it was called with
    ranks: dict[str, int] = field(default_factory=dict)  # per-layer ranks when a rank budget was allocated
    split_ranks: int = 1  # torch.distributed ranks that shared the per-layer work (1: this process did all)
    # quantized (bitsandbytes) layers whose base was re-quantized: {layer: {"initialised": ‖Q(W − s·B₀A₀) + s·B₀A₀
    # − W‖ / ‖W‖, "loaded": ‖Q(W) − W‖ / ‖W‖}}, W the full-precision checkpoint's weight with base_weights (else the
    # unpacked quantized weight itself, whose "loaded" error is then 0)
    quantization_errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready summary: method, options, timings, token counts, and per layer the
        selected directions and every candidate's score (FILet's Fisher energies), so that an
        adapter can say how it was made (``save``) and be plotted (``fisher-kernels plot``)."""
        def plain(value):
            if isinstance(value, torch.Tensor):
                return value.detach().cpu().tolist()
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)

        return {
            "package": "fisher_kernels", "version": __version__, "method": self.method, "r": self.r,
            "scale": self.scale, "options": plain(self.options), "timings": plain(self.timings),
            "num_batches": self.num_batches, "residual_base": self.residual_base, "memory_plan": self.memory_plan,
            "stats_bytes": self.stats_bytes, "quantization_errors": self.quantization_errors,
            "layers": {name: {"num_tokens": self.num_tokens.get(name),
                              "rank": None if init.lora_A is None else int(init.lora_A.shape[0]),
                              "selected": plain(init.selected), "scores": plain(init.scores)}
                       for name, init in self.layers.items()},
        }

    def save(self, path) -> None:
        """Write :meth:`to_dict` as JSON (e.g. beside a saved adapter), whole or not at all."""
        write_text_atomically(path, json.dumps(self.to_dict(), indent=1))
