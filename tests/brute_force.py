"""Statistics by explicit loops over tokens, one unpadded sample at a time: the test oracle.

Independent of the package: its own hooks, its own summed loss, its own per-token sums,
all in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D


def summed_sample_loss(kind: str, logits: torch.Tensor, sample: dict) -> torch.Tensor:
    if kind in ("llama", "gpt2"):
        return F.cross_entropy(logits[0, :-1].double(), sample["labels"][0, 1:], reduction="sum")
    return F.cross_entropy(logits.double(), sample["labels"], reduction="sum")


def label_count(kind: str, sample: dict) -> int:
    """Positions of one unpadded sample that enter the loss."""
    return sample["labels"].shape[1] - 1 if kind in ("llama", "gpt2") else sample["labels"].numel()


def brute_force_statistics(model, kind: str, samples, names, weighting: str = "token", batch_size: int | None = None):
    """{name: dict(A, G, grad, n)} as float64 means over every token of every sample.

    ``weighting`` says which loss the gradients are of: ``"token"``, the sum of per-token losses;
    ``"sequence"``, each sample's mean loss (Hugging Face's loss at batch size 1), the mean
    gradient then averaged over samples; ``"batch"``, each batch's mean loss over the label
    tokens of its ``batch_size`` consecutive samples, the mean gradient averaged over batches.
    A and G are per-token means in every case (G of the weighted gradients)."""
    counts = [label_count(kind, s) for s in samples]
    if weighting == "token":
        weights, units = [1.0] * len(samples), None
    elif weighting == "sequence":
        weights, units = [1.0 / c for c in counts], len(samples)
    elif weighting == "batch":
        groups = [range(i, min(i + batch_size, len(samples))) for i in range(0, len(samples), batch_size)]
        weights = [1.0 / sum(counts[j] for j in group) for group in groups for _ in group]
        units = len(groups)
    else:
        raise ValueError(weighting)
    modules = dict(model.named_modules())
    sums = {}
    for name in names:
        m = modules[name]
        d_out, d_in = (m.out_features, m.in_features) if not isinstance(m, Conv1D) else m.weight.shape[::-1]
        sums[name] = dict(A=torch.zeros(d_in, d_in, dtype=torch.float64), G=torch.zeros(d_out, d_out, dtype=torch.float64),
                          grad=torch.zeros(d_out, d_in, dtype=torch.float64), n=0)
    for sample, weight in zip(samples, weights):
        captured = {}

        def capture(name):
            def hook(module, args, output):
                output.retain_grad() if output.requires_grad else output.requires_grad_(True)
                captured[name] = (args[0].detach(), output)
            return hook

        handles = [modules[n].register_forward_hook(capture(n)) for n in names]
        try:
            with torch.enable_grad():
                logits = model(**{k: v for k, v in sample.items() if k != "labels"}).logits
                loss = weight * summed_sample_loss(kind, logits, sample)
                outputs = [captured[n][1] for n in names]
                grads = torch.autograd.grad(loss, outputs)
        finally:
            for h in handles:
                h.remove()
        for name, grad in zip(names, grads):
            x = captured[name][0].reshape(-1, captured[name][0].shape[-1]).double()
            g = grad.reshape(-1, grad.shape[-1]).double()
            s = sums[name]
            for t in range(x.shape[0]):  # explicit loop over tokens
                s["A"] += torch.outer(x[t], x[t])
                s["G"] += torch.outer(g[t], g[t])
                s["grad"] += torch.outer(g[t], x[t])
                s["n"] += 1
    return {name: dict(A=s["A"] / s["n"], G=s["G"] / s["n"], grad=s["grad"] / (units or s["n"]), n=s["n"])
            for name, s in sums.items()}


def as_statistics(oracle: dict, *, loss_weighting: str, num_sequences: int, num_batches: int):
    """The oracle's float64 means as a ``KFACStatistics`` a method can be run on (every request's
    fields filled), so a method's own arithmetic can be compared in float64 with a dense derivation."""
    from fisher_kernels.statistics import KFACStatistics, LayerStatistics

    layers = {name: LayerStatistics(num_tokens=o["n"], input_factor=o["A"], output_factor=o["G"],
                                    output_factor_diag=o["G"].diagonal().clone(), gradient=o["grad"])
              for name, o in oracle.items()}
    return KFACStatistics(layers=layers, num_batches=num_batches, num_sequences=num_sequences,
                          loss_weighting=loss_weighting, loss_units=num_sequences)


def max_principal_angle(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Largest principal angle (radians) between the column spaces of X and Y, in float64."""
    Qx, _ = torch.linalg.qr(X.double())
    Qy, _ = torch.linalg.qr(Y.double())
    cosines = torch.linalg.svdvals(Qx.T @ Qy).clamp(max=1.0)
    return float(torch.arccos(cosines.min()))
