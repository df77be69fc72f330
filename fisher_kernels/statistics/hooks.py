"""The hooks of the calibration pass: one accumulator per target layer.

A forward hook on each target layer updates the input-side sums from the layer input and
registers a tensor hook on the layer output; that tensor hook updates the output-side sums
when the gradient of the summed loss arrives. Token counts are kept on the device
(:class:`DeferredCounts`) and read once, at the end of the pass.
"""

from __future__ import annotations


import math

import torch
from torch import nn

from ..layers import layer_dims, row_blocks, weight_matrix
from ..distributed.sharded import sharding_of
from ..ops import cublas
from .containers import LayerStatistics, StatisticsRequest
from .fingerprint import read_together
from .model_state import PreservedModelState


WEIGHT_ROWS = 512  # rows of a bf16/fp16 weight widened to fp32 at a time in the hooks (CPU)


def _tensor_core_gemm(W: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether ``rows`` times the bf16/fp16 weight ``W`` runs as one GEMM in their own dtype with an
    fp32 result (CUDA; on the CPU the weight is widened block by block instead)."""
    return W.is_cuda and W.dtype in (torch.bfloat16, torch.float16) and rows.dtype == W.dtype


class LayerAccumulator:
    """Running fp32 sums of one layer (un-normalised)."""

    def __init__(self, name: str, module: nn.Module, request: StatisticsRequest, device):
        self.name, self.module, self.request = name, module, request
        d_out, d_in = layer_dims(module)
        self.d_in, self.d_out = d_in, d_out
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731
        self.num_tokens = 0  # rows counted without a mask; masked rows: counted_refs, read at the end
        self.counted_refs: list[int] = []  # indices into the pass's deferred counts
        self.input_factor = zeros(d_in, d_in) if request.input_factor else None
        self.output_factor = zeros(d_out, d_out) if request.output_factor else None
        self.output_factor_diag = zeros(d_out) if request.output_factor_diag else None
        self.gradient = zeros(d_out, d_in) if request.gradient else None
        self.input_basis = None if request.input_basis is None else _on(request.input_basis, device, torch.float32)
        self.output_basis = None if request.output_basis is None else _on(request.output_basis, device, torch.float32)
        singular = request.singular_basis
        self.singular_side = None if singular is None else singular.side
        if singular is not None:  # kept in its own (possibly compact) dtype; widened per batch
            vectors = _on(singular.vectors, device)
            self.input_basis = vectors if singular.side == "input" else None
            self.output_basis = vectors if singular.side == "output" else None
            self.singular_values = _on(singular.floored_values(), device, torch.float32)
        energy_sizes = (request.input_energy_size, request.output_energy_size)
        self.input_projected_energy = None if energy_sizes[0] is None else zeros(energy_sizes[0])
        self.output_projected_energy = None if energy_sizes[1] is None else zeros(energy_sizes[1])
        self.shared_with: str | None = None
        self.sharing_decided = False
        self.side = "encoder"  # which token mask its rows follow; see token_side
        self.calls = 0  # forward calls seen (0 after the pass: the layer never ran)

    def weight_times_input(self, rows: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``W x`` for every row (N, d_out): the layer's own output less its bias (no GEMM), in the
        output's dtype when the layer has no bias (a bf16 model's own rounding of ``W x``), in fp32
        when it has one. Recomputed only where the output is not the layer's (another width): in fp32,
        reading W in fp32 blocks of ``WEIGHT_ROWS`` rows (no fp32 copy of the whole weight)."""
        bias = getattr(self.module, "bias", None)
        if output.shape[-1] == self.d_out:
            z = output.detach().reshape(-1, self.d_out)
            if bias is None:
                return z
            return z - bias.detach() if z.dtype in (torch.float32, torch.float64) else z.float() - bias.detach().float()
        W = weight_matrix(self.module).detach()
        if _tensor_core_gemm(W, rows):  # bf16/fp16 products are exact in fp32: the same sums, on tensor cores
            return cublas.mm_fp32(rows, W.T)
        x = rows.float()
        z = torch.empty(x.shape[0], self.d_out, dtype=torch.float32, device=x.device)
        for block in row_blocks(self.d_out, WEIGHT_ROWS):
            torch.mm(x, W[block].float().T, out=z[:, block])
        return z

    def weight_transpose_times_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """``Wᵀ g`` for every row (N, d_in) in fp32, reading W in fp32 blocks of ``WEIGHT_ROWS`` rows."""
        W = weight_matrix(self.module).detach()
        if _tensor_core_gemm(W, g):
            return cublas.mm_fp32(g, W)
        g = g.float()
        if W.dtype in (torch.float32, torch.float64):
            return g @ W.to(g.dtype)
        h = torch.zeros(g.shape[0], self.d_in, dtype=torch.float32, device=g.device)
        for block in row_blocks(self.d_out, WEIGHT_ROWS):
            h.addmm_(g[:, block], W[block].float())
        return h

    def divide_by_singular_values_squared(self, energy: torch.Tensor) -> None:
        """``Σ (wᵀ z)²`` with ``w`` the other side's unnormalised vector (``W v`` or ``Wᵀ u``)
        becomes the energy of the unit vector ``w / σ`` (σ floored, see ``SingularBasis.floored_values``)."""
        energy.div_(self.singular_values.square())


def _on(tensor: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """``tensor`` on ``device``; a ``meta`` tensor (another rank's basis) or a ``meta`` device keeps
    only the shape."""
    if tensor.is_meta or torch.device(device).type == "meta":
        return torch.empty(tensor.shape, dtype=dtype or tensor.dtype, device="meta")
    return tensor.to(device, dtype) if dtype is not None else tensor.to(device)


class _InputGradientTap(torch.autograd.Function):
    """The identity on a layer's input, whose backward hands the gradient arriving there (``Wᵀ g``
    of this layer alone, computed by autograd's own backward of the layer) to ``receive``: the
    projection of ``Wᵀ g`` then costs no GEMM of the layer's size."""

    @staticmethod
    def forward(ctx, x, receive):
        ctx.receive = receive
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.receive(grad)
        return grad, None


def _tapped(x: torch.Tensor) -> bool:
    return type(x.grad_fn) is _InputGradientTap._backward_cls


class DeferredCounts:
    """Integers the pass needs on the host only at its end (tokens per mask and batch, loss units,
    batch hashes), kept as 0-dim tensors where they were computed and read back together: one host
    synchronisation per pass instead of several per batch (each read stalls the host until the
    device has drained its queue)."""

    def __init__(self):
        self._values: list[torch.Tensor | int] = []

    def add(self, value: torch.Tensor | int) -> int:
        """Keep ``value``; returns its index in :meth:`read`'s list."""
        self._values.append(value)
        return len(self._values) - 1

    def read(self) -> list[int]:
        """Every value kept, as ints (one read per device holding any)."""
        return read_together(self._values)


_CROSS_ATTENTION = ("encoder_attn", "EncDecAttention", "crossattention")


_KEY_VALUE = ("k_proj", "v_proj", "k", "v", "key", "value")


def token_side(name: str) -> str:
    """``"decoder"`` for layers of an encoder-decoder model's decoder that read decoder positions,
    ``"encoder"`` otherwise (cross-attention keys and values read the encoder's output)."""
    parts = name.split(".")
    in_decoder = any(part.startswith("decoder") for part in parts)
    reads_encoder = any(part in _CROSS_ATTENTION for part in parts) and parts[-1] in _KEY_VALUE
    return "decoder" if in_decoder and not reads_encoder else "encoder"


class StatisticsHooks:
    """The pass's hooks and every layer's accumulator. ``owners`` (``{layer: rank}``, a sharded
    model's split pass): each layer's accumulators and bases live on its owner only, the others
    holding their shapes on ``meta``; the kernels go through
    :class:`~fisher_kernels.distributed.owners.OwnerOps`, and every rank runs every hook, a repeated
    micro-batch with a zero mask (see :mod:`fisher_kernels.distributed.owners`)."""

    def __init__(self, model: nn.Module, requests: dict[str, StatisticsRequest], ops, device,
                 owners: dict[str, int] | None = None, rank: int = 0):
        modules = dict(model.named_modules())
        unknown = [name for name in requests if name not in modules]
        if unknown:
            raise ValueError(f"requests name layers the model does not have: {unknown[:5]}")
        self.owners, self.rank, self.device = owners, rank, device
        self.layers = {name: LayerAccumulator(name, modules[name], req, device if self.owns(name) else "meta")
                       for name, req in requests.items()}
        self.ops = ops if owners is None else self._owner_ops(ops)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            for name, layer in self.layers.items():
                layer.side = token_side(name)
        self.token_mask: torch.Tensor | None = None
        self.decoder_token_mask: torch.Tensor | None = None
        self.batch_index = 0
        self._inputs_this_batch: dict[int, tuple[torch.Tensor, str]] = {}
        self._counted_rows: dict[int, int] = {}
        self._float_masks: dict[int, torch.Tensor] = {}
        self.deferred_counts = DeferredCounts()
        self.paused = False  # a forward that must not count (the model's own loss check)
        self.repeating = False  # a lockstep rank's repeated micro-batch: not counted, same autograd graph
        self.sharded = sharding_of(model, inside_fsdp=True) is not None
        self.defer_errors = False  # set for a lockstep pass, see _guarded
        self.deferred: Exception | None = None

    def owns(self, name: str) -> bool:
        """Whether this rank holds the layer's accumulators (every layer, unless ``owners`` says otherwise)."""
        return self.owners is None or self.owners[name] == self.rank

    def _owner_ops(self, ops):
        from ..distributed.owners import OwnerOps

        owner_of = {}
        for name, layer in self.layers.items():
            for t in (layer.input_factor, layer.output_factor, layer.output_factor_diag, layer.gradient,
                      layer.input_projected_energy, layer.output_projected_energy, layer.input_basis,
                      layer.output_basis):
                if t is not None:
                    owner_of[id(t)] = self.owners[name]
        return OwnerOps(ops, self.rank, lambda t: owner_of[id(t)], lambda: self.deferred is not None)

    def register(self, guard: PreservedModelState) -> None:
        for layer in self.layers.values():
            if layer.singular_side == "input" and not layer.request.input_factor:
                guard.add_hook(layer.module.register_forward_pre_hook(self._guarded(self._input_tap(layer))))
            # prepended: before a sharded model's own post-forward hook frees the gathered weight (ZeRO-3)
            guard.add_hook(layer.module.register_forward_hook(self._guarded(self._forward_hook(layer)),
                                                              prepend=self.sharded))

    def _guarded(self, hook):
        """``hook``, whose error is kept for the lockstep's next exchange when ``defer_errors`` is
        set (a sharded model: raising inside a forward or backward would leave the other ranks
        waiting in a gather), else raised at once. After an error the hooks do nothing until it
        has been taken."""
        def run(*args):
            if self.deferred is not None and self.owners is None:
                return None
            try:
                return hook(*args)
            except Exception as err:
                if not self.defer_errors:
                    raise
                self.deferred = self.deferred or err  # with owners, the hooks go on taking part
                return None

        return run

    def take_deferred(self) -> Exception | None:
        error, self.deferred = self.deferred, None
        return error

    def _input_tap(self, layer: LayerAccumulator):
        """A forward pre-hook that routes the layer's input through :class:`_InputGradientTap`, so
        that its backward projects the gradient at the input (``Wᵀ g``) onto the basis ``V``. Inputs
        without a gradient (the first layers of a frozen model) are left alone; the gradient hook
        then computes ``Wᵀ g`` itself."""
        def hook(module, args):
            if (self.paused or (self.repeating and self.owners is None) or not args or not torch.is_grad_enabled()
                    or not args[0].requires_grad):
                return None
            mask = self._repeat_mask(args[0]) if self.repeating else self._row_mask(layer, args[0])[0]

            @self._guarded
            def receive(grad):
                self.ops.masked_projected_energy_(layer.output_projected_energy, grad.reshape(-1, layer.d_in),
                                                  layer.input_basis, mask)

            return (_InputGradientTap.apply(args[0], receive), *args[1:])

        return hook

    def start_batch(self, token_mask: torch.Tensor | None, index: int,
                    decoder_token_mask: torch.Tensor | None = None) -> None:
        self.token_mask, self.decoder_token_mask, self.batch_index = token_mask, decoder_token_mask, index
        self._inputs_this_batch.clear()
        self._counted_rows = {}  # per mask of this batch: the index of its count in deferred_counts
        self._float_masks = {}  # per mask of this batch: its fp32 0/1 rows, made once for every layer

    def _counted(self, mask: torch.Tensor) -> int:
        """The deferred count of the positions a token mask of this batch counts (summed on the
        device once per batch and mask, read back with everything else at the end of the pass)."""
        key = id(mask)
        if key not in self._counted_rows:
            self._counted_rows[key] = self.deferred_counts.add(mask.sum())
        return self._counted_rows[key]

    def _float_rows(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` flattened to fp32 rows, once per batch and mask (the kernels take 0/1 floats)."""
        key = id(mask)
        if key not in self._float_masks:
            self._float_masks[key] = mask.reshape(-1).to(torch.float32)
        return self._float_masks[key]

    def _repeat_mask(self, x: torch.Tensor) -> torch.Tensor:
        """All-zero fp32 row mask of ``x`` (a repeated micro-batch that must count nothing)."""
        return torch.zeros(math.prod(x.shape[:-1]), dtype=torch.float32, device=x.device)

    def read_token_counts(self, counts: list[int]) -> None:
        """Every layer's counted tokens from the deferred counts read at the end of the pass."""
        for layer in self.layers.values():
            layer.num_tokens += sum(counts[i] for i in layer.counted_refs)
            layer.counted_refs = []

    def _row_mask(self, layer: LayerAccumulator, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """The 0/1 mask of ``x``'s rows, from the token mask of the layer's side (the decoder's for
        an encoder-decoder model's decoder layers). Inputs may keep the (B, T) token layout or
        come flattened to (B·T,) rows (OPT's MLP); a layer with one row per sequence (a pooled
        classification head) counts every row; a layer whose rows match the other side's mask
        (equal-length checks aside) takes that one. Returns the fp32 0/1 mask of the rows (None:
        every row) and what it counts: ``(None, rows)`` for every row, else ``(mask, index)`` with
        ``index`` the mask's count in ``deferred_counts`` (summed on the device, read at the end)."""
        lead = tuple(x.shape[:-1])
        own, other = ((self.decoder_token_mask, self.token_mask) if layer.side == "decoder"
                      else (self.token_mask, self.decoder_token_mask))
        every_row = (None, math.prod(lead))
        if own is None:
            return every_row  # every position of this side counts
        for mask in (own, other):
            if mask is None:
                continue
            if lead == tuple(mask.shape) or (len(lead) == 1 and mask.dim() > 1 and lead[0] == mask.numel()):
                return self._float_rows(mask), self._counted(mask)
        if len(lead) == 1 and lead[0] == own.shape[0]:
            return every_row  # a sequence-level layer (one row per sample)
        raise ValueError(
            f"layer {layer.name!r}: input of shape {tuple(x.shape)} does not match the token mask "
            f"{tuple(own.shape)} of batch {self.batch_index}"
        )

    def _owns_input_factor(self, layer: LayerAccumulator, x: torch.Tensor) -> bool:
        """True when this layer must update its input factor. A layer that receives the very
        same input tensor as an earlier layer in the first batch shares that layer's factor
        (q/k/v, gate/up); later batches must show the same sharing."""
        seen = self._inputs_this_batch.get(id(x))
        owner = seen[1] if seen is not None and seen[0] is x else None
        if not layer.sharing_decided:
            layer.sharing_decided = True
            if owner is not None:
                layer.shared_with, layer.input_factor = owner, self.layers[owner].input_factor
        elif owner != layer.shared_with:
            raise RuntimeError(f"layer {layer.name!r} shared its input with {layer.shared_with!r} in the first "
                               f"batch but with {owner!r} now; input sharing must not change between batches")
        if owner is None:
            self._inputs_this_batch[id(x)] = (x, layer.name)
        return owner is None

    def _forward_hook(self, layer: LayerAccumulator):
        def hook(module, args, output):
            if self.paused:
                return
            if self.repeating and self.owners is None:  # the backward must run through the same blocks (FSDP
                if layer.request.needs_output_gradient and not output.requires_grad:  # gathers in each)
                    output.requires_grad_(True)
                return
            x = args[0].detach()
            rows = x.reshape(-1, layer.d_in)
            if self.repeating:  # with owners: every collective of a counted forward, every row masked out
                mask = self._repeat_mask(x)
            else:
                layer.calls += 1
                mask, counted = self._row_mask(layer, x)
                if mask is None:
                    layer.num_tokens += counted  # every row
                else:
                    layer.counted_refs.append(counted)  # the mask's deferred count
            req = layer.request
            if req.input_factor and self._owns_input_factor(layer, args[0]):
                self.ops.masked_syrk_(layer.input_factor, rows, mask)
            if layer.input_basis is not None:
                self.ops.masked_projected_energy_(layer.input_projected_energy, rows, layer.input_basis, mask)
            elif layer.singular_side == "output":  # V = Wᵀ U / S: project W x onto U
                self.ops.masked_projected_energy_(layer.input_projected_energy, layer.weight_times_input(rows, output),
                                                  layer.output_basis, mask)
            if req.needs_output_gradient:
                if not output.requires_grad:
                    output.requires_grad_(True)
                output.register_hook(self._guarded(self._gradient_hook(layer, rows if req.gradient else None, mask,
                                                                       _tapped(args[0]))))

        return hook

    def _gradient_hook(self, layer: LayerAccumulator, rows: torch.Tensor | None, mask, tapped: bool = False):
        def hook(grad):
            g = grad.detach().reshape(-1, grad.shape[-1])
            if layer.output_factor is not None:
                self.ops.masked_syrk_(layer.output_factor, g, mask)
            if layer.output_factor_diag is not None:
                self.ops.masked_column_sumsq_(layer.output_factor_diag, g, mask)
            if layer.gradient is not None:
                self.ops.masked_outer_(layer.gradient, g, rows, mask)
            if layer.output_basis is not None:
                self.ops.masked_projected_energy_(layer.output_projected_energy, g, layer.output_basis, mask)
            elif layer.singular_side == "input" and not tapped:  # U = W V / S: project Wᵀ g onto V
                self.ops.masked_projected_energy_(layer.output_projected_energy, layer.weight_transpose_times_gradient(g),
                                                  layer.input_basis, mask)

        return hook

    def _distinct_accumulators(self) -> list[torch.Tensor]:
        seen, tensors = set(), []
        for layer in self.layers.values():
            for t in (layer.input_factor, layer.output_factor, layer.output_factor_diag, layer.gradient,
                      layer.input_projected_energy, layer.output_projected_energy):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
        return tensors

    def adopt_sharing(self, per_rank: list[dict[str, str | None]]) -> None:
        """Make this rank's input-factor sharing the one the ranks that saw data decided (a rank
        with an empty shard never saw which layers read the same input), so that every rank
        holds the same distinct accumulators. Ranks that disagree are an error."""
        for name, layer in self.layers.items():
            decisions = {sharing[name] for sharing in per_rank if name in sharing}
            if len(decisions) > 1:
                raise RuntimeError(f"layer {name!r}: the ranks saw different input sharing ({sorted(map(str, decisions))})")
            if not decisions or layer.sharing_decided:
                continue
            owner = decisions.pop()
            layer.sharing_decided = True
            if owner is not None:  # this rank's own factor is all zeros: alias the owner's
                layer.shared_with, layer.input_factor = owner, self.layers[owner].input_factor

    def all_reduce(self, counters: list[int]) -> list[int]:
        """Sum every accumulator, every layer's token count and ``counters`` over the ranks of
        the default ``torch.distributed`` group (once, at the end of the pass; with ``owners`` the
        accumulators were summed on their owners batch by batch, so only the counts are)."""
        import torch.distributed as dist

        if self.owners is None:
            for t in self._distinct_accumulators():
                dist.all_reduce(t)
        layers = list(self.layers.values())
        counts = torch.tensor([layer.num_tokens for layer in layers] + [layer.calls for layer in layers] + counters,
                              dtype=torch.float64, device=self.device)  # a rank may own no accumulator
        dist.all_reduce(counts)
        counts = [int(c) for c in counts.tolist()]
        for i, layer in enumerate(layers):
            layer.num_tokens, layer.calls = counts[i], counts[len(layers) + i]
        return counts[2 * len(layers):]

    def finalize(self, loss_units: int, per_token: bool = True) -> dict[str, LayerStatistics]:
        """Normalised statistics per layer: sums divided by the layer's counted tokens (the mean
        gradient by ``loss_units``, sequences or batches, unless ``per_token``)."""
        for name, layer in self.layers.items():
            if layer.calls == 0:
                raise ValueError(f"layer {name!r} never ran in the model's forward pass, so there is nothing to measure: "
                                 "leave it out of target_modules (or add it to exclude_modules)")
            if layer.num_tokens == 0:
                raise ValueError(f"layer {name!r} saw no counted token: every token of every batch was masked")
        if loss_units == 0 and any(layer.request.needs_output_gradient for layer in self.layers.values()):
            raise ValueError("no position of any calibration batch contributes to the loss (every label is -100, "
                             "or no batch has a label): there is no gradient to measure curvature from")
        gradient_units = None if per_token else loss_units
        out, normalised, symmetrised = {}, {}, set()
        for name, layer in self.layers.items():
            if not self.owns(name):  # another rank's layer: its counts and sharing only
                out[name] = LayerStatistics(num_tokens=layer.num_tokens, input_factor_shared_with=layer.shared_with)
                continue
            n = float(layer.num_tokens)
            if layer.request.needs_output_gradient and not any(
                    t is not None and bool(t.any()) for t in (layer.output_factor, layer.output_factor_diag,
                                                              layer.gradient, layer.output_projected_energy)):
                raise ValueError(f"layer {name!r}: the loss has no gradient at this layer's output (all-zero "
                                 "statistics): the layer does not influence the counted loss positions")
            if layer.singular_side == "input":
                layer.divide_by_singular_values_squared(layer.output_projected_energy)
            elif layer.singular_side == "output":
                layer.divide_by_singular_values_squared(layer.input_projected_energy)

            def mean(t):
                if t is None or t.is_meta:  # meta: a factor shared with another owner's layer, joined later
                    return None
                if id(t) not in normalised:  # shared input factors are divided once
                    normalised[id(t)] = t.div_(n)
                return normalised[id(t)]

            stats = LayerStatistics(
                num_tokens=layer.num_tokens,
                input_factor=mean(layer.input_factor),
                output_factor=mean(layer.output_factor),
                output_factor_diag=mean(layer.output_factor_diag),
                gradient=None if layer.gradient is None else (
                    mean(layer.gradient) if gradient_units is None else layer.gradient.div_(gradient_units)),
                input_projected_energy=mean(layer.input_projected_energy),
                output_projected_energy=mean(layer.output_projected_energy),
                input_factor_shared_with=layer.shared_with,
            )
            for key, t in stats.tensors().items():
                if not torch.isfinite(t).all():
                    raise ValueError(f"layer {name!r}: statistic {key!r} is not finite")
            for key in ("input_factor", "output_factor"):  # one triangle may be all a kernel computes
                t = getattr(stats, key)
                if t is not None and id(t) not in symmetrised:
                    symmetrised.add(id(t))
                    symmetrize_from_upper_(t)
            out[name] = stats
        return out


def symmetrize_from_upper_(matrix: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Copy the upper triangle of a square matrix onto its lower triangle, in place, one block
    of rows at a time (temporaries of ``block × d``, never a second ``d × d`` matrix)."""
    d = matrix.shape[0]
    for start in range(0, d, block):
        stop = min(start + block, d)
        diagonal = matrix[start:stop, start:stop]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
        if stop < d:
            matrix[stop:, start:stop].copy_(matrix[start:stop, stop:].T)
    return matrix
