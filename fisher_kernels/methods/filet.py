"""FILet: PiSSA's candidate directions ranked by Fisher energy.

For the thin SVD ``W = U Σ Vᵀ`` and K-FAC factors ``A`` (input) and ``G`` (output), the
Fisher energy of the unit direction ``u_i v_iᵀ`` is

    e_i = (u_iᵀ G u_i) · (v_iᵀ A v_i).

The ``r`` candidates with the largest energy (``energy="component"``: largest ``σ_i² e_i``)
become the adapter, split PiSSA-style so that ``s · B A = U_S Σ_S V_Sᵀ``, and the base
weight becomes ``W − U_S Σ_S V_Sᵀ``: the model is unchanged at step 0.

Memory. Before the calibration pass each layer is decomposed on its own and only the smaller
side of its SVD is kept (V when ``d_in ≤ d_out``, else U: ``min(d_out, d_in)²`` entries, in the
weight's dtype) with the singular values; the collector recovers the other side's projections
through the weight (``uᵢᵀ g = vᵢᵀ Wᵀ g / σᵢ``, ``vᵢᵀ x = uᵢᵀ W x / σᵢ``, where ``W x`` is the
layer's own output and ``Wᵀ g`` the gradient autograd computes at its input: no extra product
with W), so the hooks hold O(min(d)) numbers per layer besides that basis. When the weight's
dtype is narrower than fp32 (bf16, fp16), the stored basis is rounded to it (and ``W x``, ``Wᵀ g``
are the model's own bf16 results), which perturbs the energies by about that dtype's precision;
the factors of the chosen directions are then taken from the same
decomposition in full precision, so only the choice itself can differ from a float64 reference,
and only between candidates whose energies nearly tie (measured in the tests and the README).
For a model on a GPU that full-precision basis waits in host memory (while less than half the
available RAM is so used) instead of being recomputed after the pass; otherwise, and on the CPU
(where a second copy would defeat the compact one), it is recomputed: the same numbers either way.
"""

from __future__ import annotations

import torch

from ..device_memory import available_memory
from ..statistics import StatisticsRequest
from ..statistics.containers import SingularBasis
from .common import InitMethod, LayerInit, complete_triplets, residual_update, singular_basis, svd_factors


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
            ``diag(Uᵀ G U)`` and ``diag(Vᵀ A V)`` (O(m) memory per layer besides the basis);
            ``"full"`` accumulates the full factors ``A`` and ``G``. Both give the same energies.
        candidates: keep only the top ``m`` singular triplets as candidates (default: all).
        svd_driver: ``"gram64"`` (default: eigen-decomposition of the smaller Gram matrix in
            float64, as accurate as an fp32 SVD, since FILet may choose small-σ directions),
            ``"gram"`` (fp32, faster) or ``"svd"``; see :func:`fisher_kernels.methods.batched_svd`.
        magnitude: what each chosen direction starts with in the adapter: ``"singular"`` (default,
            PiSSA's convention: ``s·B A = U_S Σ_S V_Sᵀ``, so directions chosen among small singular
            values start small) or ``"uniform"`` (every chosen direction starts with the mean of
            the chosen singular values, ``s·B A = σ̄ U_S V_Sᵀ``). Either way the base weight
            becomes ``W − s·B A`` and the model is unchanged at step 0.
    """

    name = "filet"
    residual_base = True

    def __init__(self, r, scale, *, energy: str = "direction", route: str = "projected", candidates: int | None = None,
                 svd_driver: str = "gram64", magnitude: str = "singular"):
        super().__init__(r, scale)
        if energy not in ("direction", "component"):
            raise ValueError(f"energy must be 'direction' or 'component', got {energy!r}")
        if route not in ("projected", "full"):
            raise ValueError(f"route must be 'projected' or 'full', got {route!r}")
        if candidates is not None and candidates < r:
            raise ValueError(f"candidates={candidates} must be at least r={r}")
        if svd_driver not in ("svd", "gram", "gram64"):
            raise ValueError(f"svd_driver must be 'svd', 'gram' or 'gram64', got {svd_driver!r}")
        if magnitude not in ("singular", "uniform"):
            raise ValueError(f"magnitude must be 'singular' or 'uniform', got {magnitude!r}")
        self.energy, self.route, self.candidates, self.svd_driver = energy, route, candidates, svd_driver
        self.prepares = route == "projected"
        self.magnitude = magnitude
        self._exact_on_host: dict[str, torch.Tensor] = {}  # full-precision vectors of compact bases (GPU models)

    needs_data = True

    @property
    def shares_input_factor(self):
        return self.route == "full"

    def _num_candidates(self, d_out, d_in):
        return min(d_out, d_in) if self.candidates is None else min(self.candidates, d_out, d_in)

    def held_bytes(self, d_out, d_in, dtype):
        if self.route == "full":
            return 4 * (d_in * d_in + d_out * d_out)
        return self.basis_bytes(d_out, d_in, dtype) + 2 * 4 * self._num_candidates(d_out, d_in)  # and two energies

    def basis_bytes(self, d_out, d_in, dtype):
        if self.route == "full":
            return 0
        m = self._num_candidates(d_out, d_in)
        return min(d_out, d_in) * m * dtype.itemsize + 4 * m

    def temporary_bytes(self, d_out, d_in, dtype):
        small, m = min(d_out, d_in), self._num_candidates(d_out, d_in)
        decomposition = 4 * 8 * small * small  # float64 Gram matrix, eigenvectors, eigh workspace
        if self.route == "full":  # every candidate's U and V, and G U, Vᵀ A, in fp32
            return decomposition + 4 * 2 * m * (d_out + d_in)
        return decomposition

    def _basis(self, W, dtype=None):
        return singular_basis(W, driver=self.svd_driver, top=self.candidates, dtype=dtype)

    def prepare(self, name, W):
        if self.route != "projected":
            return None
        if W.dtype.itemsize >= 4 or not self._keeps_exact_on_host(W):
            return self._basis(W)
        exact = self._basis(W, dtype=torch.float64)  # rounded once to each dtype, as the recomputation would
        # fp32 on the device, then an asynchronous copy into pinned host memory: the next layer's
        # decomposition is queued without waiting for this copy (initialize_layer's copy back to
        # the device is ordered after it on the same stream)
        host = exact.vectors.to(torch.float32).to("cpu", non_blocking=True)
        if host.nbytes + sum(t.nbytes for t in self._exact_on_host.values()) < available_memory("cpu")[0] / 2:
            self._exact_on_host[name] = host
        return SingularBasis(exact.side, exact.vectors.to(W.dtype), exact.values)

    @staticmethod
    def _keeps_exact_on_host(W) -> bool:
        """Whether a compact basis's full-precision vectors wait in host memory for the layer's
        initialisation (a GPU model's: host RAM is not the device's) instead of being recomputed."""
        return W.is_cuda

    def statistics_request(self, name, prepared):
        if self.route == "full":
            return StatisticsRequest(input_factor=True, output_factor=True)
        return StatisticsRequest(singular_basis=prepared)

    def missing_statistics(self, request, layer):
        """Full factors serve the projected route too (e.g. statistics from a cache)."""
        if layer.input_factor is not None and layer.output_factor is not None:
            return []
        return request.missing_in(layer)

    def energies(self, W, layer, basis) -> torch.Tensor:
        """Fisher energy of every candidate of one layer, per the ``energy`` option."""
        if layer.input_projected_energy is not None and layer.output_projected_energy is not None:
            energy = (layer.output_projected_energy * layer.input_projected_energy).to(basis.values.device)
        else:
            U, _, Vh = complete_triplets(W, basis, torch.arange(basis.num_candidates, device=basis.values.device))
            energy = fisher_energy(U, Vh, layer.output_factor.to(U.device), layer.input_factor.to(U.device))
        return energy * basis.values.square() if self.energy == "component" else energy

    def initialize_layer(self, name, W, stats, compact_basis):
        basis = compact_basis
        exact = self._exact_on_host.pop(name, None)
        if basis is not None and exact is not None and exact.shape == basis.vectors.shape:
            basis = SingularBasis(basis.side, exact.to(W.device), basis.values)
        elif basis is None or basis.vectors.element_size() < 4:  # factors (and full-factor energies) at fp32 or better
            basis = self._basis(W, dtype=torch.promote_types(W.dtype, torch.float32))
        energy = self.energies(W, stats, basis)
        idx = select_by_energy(energy, min(self.r, energy.numel()))  # a rank budget's cap may exceed small layers
        U, S, Vh = complete_triplets(W, basis, idx)
        if self.magnitude == "uniform":
            S = S.mean().expand_as(S).contiguous()
        lora_A, lora_B = svd_factors(U, S, Vh, self.scale)
        return LayerInit(lora_A, lora_B, residual_update(lora_A, lora_B, self.scale), selected=idx, scores=energy)
