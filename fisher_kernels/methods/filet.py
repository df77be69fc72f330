"""FILet: PiSSA's candidate directions ranked by Fisher energy (SPEC §4.1).

For the thin SVD ``W = U Σ Vᵀ`` and K-FAC factors ``A`` (input) and ``G`` (output), the
Fisher energy of the unit direction ``u_i v_iᵀ`` is

    e_i = (u_iᵀ G u_i) · (v_iᵀ A v_i).

The ``r`` candidates with the largest energy (``energy="component"``: largest ``σ_i² e_i``)
become the adapter, split PiSSA-style so that ``s · B A = U_S Σ_S V_Sᵀ``, and the base
weight becomes ``W − U_S Σ_S V_Sᵀ``: the model is unchanged at step 0.
"""

from __future__ import annotations

import torch

from ..statistics import StatisticsRequest
from .common import InitMethod, LayerInit, batched_svd, svd_factors


def fisher_energy(U: torch.Tensor, Vh: torch.Tensor, output_factor: torch.Tensor, input_factor: torch.Tensor) -> torch.Tensor:
    """``e_i = (u_iᵀ G u_i)(v_iᵀ A v_i)`` from full factors; U (d_out, m), Vh (m, d_in) -> (m,)."""
    output_energy = ((output_factor @ U) * U).sum(dim=0)
    input_energy = ((Vh @ input_factor) * Vh).sum(dim=1)
    return output_energy * input_energy


def select_by_energy(energy: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of the ``r`` largest energies; candidates come ordered by singular value, so a
    stable sort breaks ties in favour of the larger singular value."""
    return torch.sort(energy, descending=True, stable=True).indices[:r]


class FILet(InitMethod):
    """FILet initialisation.

    Options:
        energy: ``"direction"`` (default) ranks by ``e_i``; ``"component"`` by ``σ_i² e_i``.
        route: ``"projected"`` (default) decomposes W before the pass and accumulates only
            ``diag(Uᵀ G U)`` and ``diag(Vᵀ A V)`` (O(m) memory per layer); ``"full"``
            accumulates the full factors ``A`` and ``G``. Both give the same energies.
        candidates: keep only the top ``m`` singular triplets as candidates (default: all).
        svd_driver: ``"gram64"`` (default: eigen-decomposition of the smaller Gram matrix in
            float64, as accurate as an fp32 SVD, since FILet may choose small-σ directions),
            ``"gram"`` (fp32, faster) or ``"svd"``; see :func:`fisher_kernels.methods.batched_svd`.
    """

    name = "filet"
    residual_base = True

    def __init__(self, r, scale, *, energy: str = "direction", route: str = "projected", candidates: int | None = None,
                 svd_driver: str = "gram64"):
        super().__init__(r, scale)
        if energy not in ("direction", "component"):
            raise ValueError(f"energy must be 'direction' or 'component', got {energy!r}")
        if route not in ("projected", "full"):
            raise ValueError(f"route must be 'projected' or 'full', got {route!r}")
        if candidates is not None and candidates < r:
            raise ValueError(f"candidates={candidates} must be at least r={r}")
        self.energy, self.route, self.candidates, self.svd_driver = energy, route, candidates, svd_driver

    def prepare(self, weights):
        return batched_svd(weights, top=self.candidates, driver=self.svd_driver)

    def statistics_requests(self, weights, prepared):
        if self.route == "full":
            return {name: StatisticsRequest(input_factor=True, output_factor=True) for name in weights}
        return {
            name: StatisticsRequest(input_basis=Vh.T, output_basis=U)
            for name, (U, S, Vh) in prepared.items()
        }

    def missing_statistics(self, request, layer):
        """Full factors serve the projected route too (e.g. statistics from a cache)."""
        if layer.input_factor is not None and layer.output_factor is not None:
            return []
        return request.missing_in(layer)

    def energies(self, name, stats, prepared) -> torch.Tensor:
        """Fisher energy of every candidate of layer ``name``, per the ``energy`` option."""
        U, S, Vh = prepared[name]
        layer = stats[name]
        if layer.input_projected_energy is not None and layer.output_projected_energy is not None:
            energy = (layer.output_projected_energy * layer.input_projected_energy).to(U.device)
        else:
            energy = fisher_energy(U, Vh, layer.output_factor.to(U.device), layer.input_factor.to(U.device))
        return energy * S.square() if self.energy == "component" else energy

    def initialize(self, weights, stats, prepared):
        out = {}
        for name, W in weights.items():
            U, S, Vh = prepared[name]
            energy = self.energies(name, stats, prepared)
            idx = select_by_energy(energy, self.r)
            lora_A, lora_B = svd_factors(U[:, idx], S[idx], Vh[idx], self.scale)
            out[name] = LayerInit(lora_A, lora_B, W - self.scale * lora_B @ lora_A, selected=idx, scores=energy)
        return out
