"""One calibration pass that accumulates the K-FAC statistics methods ask for.

A forward hook on each target layer updates the input-side sums from the layer input and
registers a tensor hook on the layer output; that tensor hook updates the output-side sums
when the gradient of the summed loss arrives. Parameters never need gradients: the pass
switches ``requires_grad`` off, runs under ``enable_grad`` and puts everything back.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import layer_dims, row_blocks, weight_matrix
from ..sharded import called_module, release_after_pass, sharding_of
from ..ops import cublas, get_ops
from .batches import (IGNORE_INDEX, LOSS_WEIGHTINGS, as_batches, counted_labels, is_causal_lm, prepare_batch,
                      sampled_label_loss, split_batch, summed_model_loss)
from .containers import KFACStatistics, LayerStatistics, StatisticsRequest
from .fingerprint import model_fingerprint, read_together, tensor_hash_on_device
from .model_state import PreservedModelState

logger = logging.getLogger(__name__)


WEIGHT_ROWS = 512  # rows of a bf16/fp16 weight widened to fp32 at a time in the hooks (CPU)


def _tensor_core_gemm(W: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether ``rows`` times the bf16/fp16 weight ``W`` runs as one GEMM in their own dtype with an
    fp32 result (CUDA; on the CPU the weight is widened block by block instead)."""
    return W.is_cuda and W.dtype in (torch.bfloat16, torch.float16) and rows.dtype == W.dtype


class _LayerAccumulator:
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
        self.input_basis = None if request.input_basis is None else request.input_basis.to(device, torch.float32)
        self.output_basis = None if request.output_basis is None else request.output_basis.to(device, torch.float32)
        singular = request.singular_basis
        self.singular_side = None if singular is None else singular.side
        if singular is not None:  # kept in its own (possibly compact) dtype; widened per batch
            vectors = singular.vectors.to(device)
            self.input_basis = vectors if singular.side == "input" else None
            self.output_basis = vectors if singular.side == "output" else None
            self.singular_values = singular.floored_values().to(device, torch.float32)
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


class _StatisticsHooks:
    def __init__(self, model: nn.Module, requests: dict[str, StatisticsRequest], ops, device):
        modules = dict(model.named_modules())
        unknown = [name for name in requests if name not in modules]
        if unknown:
            raise ValueError(f"requests name layers the model does not have: {unknown[:5]}")
        self.ops = ops
        self.layers = {name: _LayerAccumulator(name, modules[name], req, device) for name, req in requests.items()}
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
            if self.deferred is not None:
                return None
            try:
                return hook(*args)
            except Exception as err:
                if not self.defer_errors:
                    raise
                self.deferred = err
                return None

        return run

    def take_deferred(self) -> Exception | None:
        error, self.deferred = self.deferred, None
        return error

    def _input_tap(self, layer: _LayerAccumulator):
        """A forward pre-hook that routes the layer's input through :class:`_InputGradientTap`, so
        that its backward projects the gradient at the input (``Wᵀ g``) onto the basis ``V``. Inputs
        without a gradient (the first layers of a frozen model) are left alone; the gradient hook
        then computes ``Wᵀ g`` itself."""
        def hook(module, args):
            if self.paused or self.repeating or not args or not torch.is_grad_enabled() or not args[0].requires_grad:
                return None
            mask, _ = self._row_mask(layer, args[0])

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

    def read_token_counts(self, counts: list[int]) -> None:
        """Every layer's counted tokens from the deferred counts read at the end of the pass."""
        for layer in self.layers.values():
            layer.num_tokens += sum(counts[i] for i in layer.counted_refs)
            layer.counted_refs = []

    def _row_mask(self, layer: _LayerAccumulator, x: torch.Tensor) -> tuple[torch.Tensor | None, int]:
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

    def _owns_input_factor(self, layer: _LayerAccumulator, x: torch.Tensor) -> bool:
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

    def _forward_hook(self, layer: _LayerAccumulator):
        def hook(module, args, output):
            if self.paused:
                return
            if self.repeating:  # the backward must run through the same blocks (FSDP gathers in each)
                if layer.request.needs_output_gradient and not output.requires_grad:
                    output.requires_grad_(True)
                return
            layer.calls += 1
            x = args[0].detach()
            mask, counted = self._row_mask(layer, x)
            rows = x.reshape(-1, layer.d_in)
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

    def _gradient_hook(self, layer: _LayerAccumulator, rows: torch.Tensor | None, mask, tapped: bool = False):
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
        the default ``torch.distributed`` group (once, at the end of the pass)."""
        import torch.distributed as dist

        accumulators = self._distinct_accumulators()
        for t in accumulators:
            dist.all_reduce(t)
        device = accumulators[0].device if accumulators else torch.device("cpu")
        layers = list(self.layers.values())
        counts = torch.tensor([layer.num_tokens for layer in layers] + [layer.calls for layer in layers] + counters,
                              dtype=torch.float64, device=device)
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
                if t is None:
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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def collect_statistics(
    model: nn.Module,
    loader,
    requests: dict[str, StatisticsRequest],
    *,
    loss_fn=None,
    token_mask: str = "attention",
    fisher: str = "empirical",
    num_batches: int | None = None,
    backend: str = "auto",
    progress: bool = True,
    seed: int = 0,
    loss_weighting: str = "token",
    micro_batch_size: int | None = None,
    distributed: bool | None = None,
    fingerprint: bool = True,
) -> KFACStatistics:
    """Run one calibration pass over ``loader`` and return the requested statistics.

    Args:
        model: any ``nn.Module``; Hugging Face models take dict batches.
        loader: iterable of batches: dicts of tensors with ``labels`` (unless ``loss_fn`` is
            given or ``fisher="true"``), or ``(inputs, targets)`` pairs with ``loss_fn``.
        requests: ``{layer name: StatisticsRequest}``.
        loss_fn: ``(outputs, targets) -> loss`` returning the **sum** of per-token (or
            per-sample) losses, e.g. ``nn.CrossEntropyLoss(reduction="sum")``. Without it the
            loss is recomputed as a sum from ``outputs.logits`` and ``labels``, checked on the
            first batch against the model's own (mean) loss.
        token_mask: ``"attention"`` counts tokens with ``attention_mask == 1`` (all tokens
            without a mask); ``"labels"`` counts positions that contribute to the loss.
        fisher: ``"empirical"`` (labels from the data) or ``"true"`` (labels sampled from the
            model's predictive distribution, seeded by ``seed``).
        num_batches: stop after this many batches.
        backend: statistics backend, see :func:`fisher_kernels.backends`.
        loss_weighting: how the back-propagated loss weights positions: ``"token"`` (default:
            the sum over counted labels, so statistics do not depend on batching), ``"sequence"``
            (sum over sequences of each one's mean loss, LoRA-DA's reference) or ``"batch"``
            (each batch's mean loss, LoRA-GA's reference). With ``"sequence"``/``"batch"`` the
            mean gradient is divided by the number of sequences/batches instead of tokens; the
            other statistics stay per token. A custom ``loss_fn`` always counts as ``"token"``.
        micro_batch_size: run each batch as forward+backward passes of at most this many
            sequences (same statistics, fewer activations held at once: the calibration pass
            costs about what one micro-batch's forward+backward does).

    Under ``torch.distributed`` (each rank iterating its own shard of the data), the sums and
    token counts are all-reduced once at the end, so every rank returns the statistics of the
    union of the data, as one process over all of it would. ``distributed=False`` keeps the pass
    local to this process even inside a process group (``None``: whether a group is initialised).
    ``fingerprint=False`` skips hashing the model's weights at the end (then the statistics cannot
    be checked against a model later, e.g. after ``save``).

    The model is run in eval mode (dropout off) and is left exactly as found: hooks removed,
    ``requires_grad``, ``.grad`` and train/eval mode of every module restored, also when the
    pass raises. Errors name the batch that caused them.
    """
    if fisher not in ("empirical", "true"):
        raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
    if token_mask not in ("attention", "labels"):
        raise ValueError(f"token_mask must be 'attention' or 'labels', got {token_mask!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError("gradient checkpointing is on: its recomputed forward passes would be counted twice; "
                         "call model.gradient_checkpointing_disable() for the calibration pass")
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
                                         or micro_batch_size < 1):
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")
    if not isinstance(requests, Mapping) or not all(isinstance(r, (StatisticsRequest, type(None)))
                                                    for r in requests.values()):
        raise TypeError("requests must be a dict {layer name: StatisticsRequest(...)}, e.g. "
                        f"full_statistics_requests(model); got {type(requests).__name__}")
    if loader is not None and not hasattr(loader, "__iter__"):
        raise TypeError(f"loader must be an iterable of batches (a DataLoader, a list of dicts, ...), got "
                        f"{type(loader).__name__}")
    requests = {name: req for name, req in requests.items() if req is not None and not req.is_empty}
    needs_gradients = any(req.needs_output_gradient for req in requests.values())
    device = _model_device(model)
    ops = get_ops(backend, device)
    causal = is_causal_lm(model)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    generator = torch.Generator().manual_seed(seed)
    stats = KFACStatistics(fisher=fisher, token_mask=token_mask,
                           loss_weighting="token" if loss_fn is not None else loss_weighting)

    loader = as_batches(loader, model)
    _refuse_padded_shards(loader)
    batches = loader if num_batches is None else itertools.islice(loader, num_batches)
    prepare_options = dict(token_mask=token_mask, needs_labels=loss_fn is None and fisher == "empirical",
                           causal=causal, encoder_decoder=encoder_decoder)
    total = num_batches
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    with PreservedModelState(model) as guard, torch.enable_grad():
        hooks = _StatisticsHooks(model, requests, ops, device)
        hooks.register(guard)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        bar = tqdm(batches, total=total, desc="fisher_kernels: calibration", unit="batch", disable=not progress)
        batch_iter = iter(bar)
        distributed = _distributed() if distributed is None else bool(distributed) and _distributed()
        try:
            first_batch = _run_pass(batch_iter, hooks, stats, model, device, prepare_options, loss_fn, fisher,
                                    generator, micro_batch_size, loss_weighting, needs_gradients,
                                    lockstep=_Lockstep(hooks) if distributed and hooks.sharded else None)
        except BaseException as err:
            if distributed:  # the other ranks are told before this rank raises, so none of them waits forever
                _exchange_pass_status(hooks, f"{type(err).__name__}: {err}", 0)
            raise
        finally:
            bar.close()
            release_after_pass(model)
        if distributed:
            _exchange_pass_status(hooks, None, first_batch)
            stats.num_batches, stats.num_sequences, stats.loss_units = hooks.all_reduce(
                [stats.num_batches, stats.num_sequences, stats.loss_units])
        if stats.num_batches == 0:
            raise ValueError("the calibration loader yielded no batch")
        stats.layers = hooks.finalize(stats.loss_units, per_token=loss_weighting == "token" or loss_fn is not None)
    stats.fingerprint = model_fingerprint(model, list(stats.layers)) if fingerprint else None
    return stats


class _BatchHashes:
    """Fingerprints of the pass's batches (exact values, hashed on their device by
    :func:`tensor_hash_on_device`), read back with the pass's other deferred counts at its end."""

    def __init__(self, counts: DeferredCounts):
        self.counts = counts
        self.batches: list[list[tuple[str, int | None]]] = []

    def add(self, prepared) -> None:
        parts: list[tuple[str, int | None]] = []

        def feed(value):
            if isinstance(value, torch.Tensor):
                parts.append((f"{tuple(value.shape)}:{value.dtype}:", self.counts.add(tensor_hash_on_device(value))))
            elif isinstance(value, Mapping):
                for key in sorted(value):
                    parts.append((str(key), None))
                    feed(value[key])
            elif isinstance(value, (list, tuple)):
                for item in value:
                    feed(item)

        feed((prepared.args, prepared.kwargs, prepared.targets))
        self.batches.append(parts)

    def fingerprints(self, counts: list[int]) -> list[int]:
        """A 63-bit hash per batch, never 0."""
        out = []
        for parts in self.batches:
            digest = hashlib.blake2b(digest_size=8)
            for text, index in parts:
                digest.update((text if index is None else f"{text}{counts[index] & (2**64 - 1)}").encode())
            out.append((int.from_bytes(digest.digest(), "little") >> 1) or 1)
        return out


def _run_pass(batch_iter, hooks, stats, model, device, prepare_options, loss_fn, fisher, generator,
              micro_batch_size, loss_weighting, needs_gradients, lockstep: "_Lockstep | None" = None) -> int:
    """The calibration loop: every batch's forward and backward, the hooks accumulating. Sets
    ``stats.data_fingerprint`` (this rank's batches, in order) and returns the fingerprint of this
    rank's first batch (0: none). ``lockstep`` (a sharded model): every rank runs the same number
    of forwards and backwards, see :class:`_Lockstep`."""
    causal, encoder_decoder = prepare_options["causal"], prepare_options["encoder_decoder"]
    counts = hooks.deferred_counts
    hashes = _BatchHashes(counts)
    loss_units: list[int] = []  # indices into counts
    losses: list[tuple[int, torch.Tensor]] = []  # (batch, loss) after the first batch: finiteness checked at the end
    last_part = None  # a lockstep rank with fewer micro-batches repeats it, counting nothing
    for index in itertools.count():
        prepared, parts, error = None, [], None
        try:
            batch = next(batch_iter, _END)
            if batch is not _END:
                prepared = prepare_batch(batch, index, device, **prepare_options)
                if encoder_decoder:
                    _add_decoder_inputs(model, prepared)
                hashes.add(prepared)
                parts = split_batch(prepared, micro_batch_size)
                last_part = parts[-1] if parts else last_part
        except Exception as err:
            error = _located(err, index)
            if lockstep is None:
                raise error
        if lockstep is not None:
            steps = lockstep.agree_on_batch(index, len(parts), error, last_part is not None)
        elif prepared is None:
            break
        else:
            steps = len(parts)
        if steps == 0:
            break
        batch_total = None
        if len(parts) > 1 and loss_weighting == "batch" and loss_fn is None:
            batch_total = counted_labels(prepared, causal=causal, sampled=fisher == "true")
            loss_units.append(counts.add(batch_total.clamp_max(1) if isinstance(batch_total, torch.Tensor)
                                         else min(batch_total, 1)))
        for part_index in range(steps):
            counted = part_index < len(parts)  # else a lockstep rank's repeat, which must not count
            part = parts[part_index] if counted else last_part
            loss, units, error, backward = None, 0, None, False
            try:
                hooks.start_batch(part.token_mask, index, part.decoder_token_mask)
                hooks.repeating = not counted
                loss, units = _summed_loss(model, part, loss_fn, fisher, generator, causal,
                                           index == 0 and part_index == 0 and counted, loss_weighting, batch_total,
                                           hooks)
                if hooks.deferred is not None:  # a hook failed during this forward
                    raise hooks.take_deferred()
                if index == 0 and not torch.isfinite(loss):  # later batches: read at the end of the pass
                    raise ValueError(f"batch {index}: the loss is not finite ({loss.item()})")
                if counted and index > 0:
                    losses.append((index, loss.detach()))
                backward = needs_gradients
                if backward and not loss.requires_grad:
                    if lockstep is None and int(units) == 0 and not (batch_total is not None and int(batch_total)):
                        backward = False  # nothing counted, nothing to differentiate
                    else:
                        raise ValueError(f"batch {index}: the loss does not depend on the model's outputs through "
                                         "autograd (computed under no_grad, or detached), so it has no gradient")
            except Exception as err:
                error = _located(err, index)
                if lockstep is None:
                    raise error
            finally:
                hooks.repeating = False
            if lockstep is not None:
                lockstep.agree(index, error)
            if backward:
                try:
                    (loss if counted else loss * 0).backward()  # a repeat's forward registered no gradient hook
                except Exception as err:
                    raise _located(err, index)
                if lockstep is not None:  # a gradient hook's error, kept until the backward had finished
                    error = hooks.take_deferred()
                    lockstep.agree(index, None if error is None else _located(error, index))
            if counted:
                loss_units.append(counts.add(units))
            del loss
        hooks.start_batch(None, index + 1)  # drop this batch's references
        if prepared is not None:
            stats.num_batches += 1
            stats.num_sequences += prepared.num_sequences
    values = counts.read()  # the pass's one read back to the host
    _check_losses_finite(losses)
    hooks.read_token_counts(values)
    stats.loss_units += sum(values[i] for i in loss_units)
    fingerprints = hashes.fingerprints(values)
    stats.data_fingerprint = hashlib.sha256(b"".join(f.to_bytes(8, "little") for f in fingerprints)).hexdigest()
    return fingerprints[0] if fingerprints else 0


def _check_losses_finite(losses: list[tuple[int, torch.Tensor]]) -> None:
    """The first batch whose loss is not finite, named in a ValueError (read once, after the pass)."""
    if not losses:
        return
    finite = torch.stack([loss.float() for _, loss in losses]).isfinite()
    if bool(finite.all()):
        return
    at = int((~finite).to(torch.int64).argmax())
    index, loss = losses[at]
    raise ValueError(f"batch {index}: the loss is not finite ({loss.item()})")


def _located(err: Exception, index: int) -> Exception:
    """``err`` saying which batch raised it (caused by ``err`` when it is a new exception)."""
    located = _with_batch_index(err, index)
    if located is not err:
        located.__cause__ = err
    return located


class _Lockstep:
    """Keeps the ranks of a sharded model in step during the calibration pass: FSDP2 and ZeRO-3
    gather the weights in every forward and backward, collectives that every rank must join.
    Before each batch the ranks agree on how many forwards it takes (the most micro-batches any
    rank has); a rank with fewer, or whose data has run out, repeats its last micro-batch with the
    hooks counting nothing and its loss times zero, so nothing is counted twice. After each forward,
    and after each backward, the ranks exchange errors (the hooks keep theirs until then instead of
    raising mid-pass), so that a failing rank makes every rank raise instead of leaving the others
    waiting in a gather. An error raised by the model's own code inside a forward or backward still
    ends in the process group's timeout."""

    def __init__(self, hooks: "_StatisticsHooks"):
        import torch.distributed as dist

        self.dist = dist
        hooks.defer_errors = True

    def _exchange(self, status):
        statuses = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(statuses, status)
        return statuses

    def _raise_first(self, statuses, error) -> None:
        if error is not None:
            raise error
        failed = [(rank, status[0]) for rank, status in enumerate(statuses) if status[0] is not None]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(f"rank {rank} failed during the calibration pass, so this rank stops too: {message}")

    def agree_on_batch(self, index: int, parts: int, error: Exception | None, can_repeat: bool) -> int:
        """The number of forwards of batch ``index`` on every rank (0: every rank's data has ended)."""
        statuses = self._exchange((None if error is None else f"{type(error).__name__}: {error}", parts, can_repeat))
        self._raise_first(statuses, error)
        steps = max(status[1] for status in statuses)
        empty = [rank for rank, status in enumerate(statuses) if not status[2]]
        if steps and empty:
            raise ValueError(f"rank {empty[0]} has no calibration batch while others have {steps} micro-batch(es) "
                             f"in batch {index}: with a sharded (FSDP / ZeRO-3) model every rank runs each forward, so each "
                             "rank needs at least one batch of its own")
        return steps

    def agree(self, index: int, error: Exception | None) -> None:
        """Every rank raises if one had an error (after a forward, and after a backward)."""
        statuses = self._exchange((None if error is None else f"{type(error).__name__}: {error}",))
        self._raise_first(statuses, error)


def _exchange_pass_status(hooks, error: str | None, first_batch: int) -> None:
    """The one collective every rank performs after its pass, whatever happened in it: each rank's
    error (if it failed), the fingerprint of its first batch and the input sharing its layers saw.
    A rank that failed raises its own error afterwards; the others raise one that names it. Then
    unsharded data is refused, and ranks that saw no data adopt the others' input sharing, so that
    every rank reduces the same tensors in the same order."""
    import torch.distributed as dist

    sharing = {name: layer.shared_with for name, layer in hooks.layers.items() if layer.sharing_decided}
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, (error, first_batch, sharing))
    if error is not None:
        return
    failed = [(rank, status[0]) for rank, status in enumerate(statuses) if status[0] is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} failed during the calibration pass, so this rank stops too: {message}")
    seen = [status[1] for status in statuses if status[1]]
    if len(set(seen)) < len(seen):
        raise ValueError(
            "two ranks began with the same calibration batch: the loader is not sharded, so each sample would be "
            "counted once per rank. Give each rank its own part of the data: accelerator.prepare(loader), or a "
            "DataLoader with a DistributedSampler")
    hooks.adopt_sharing([status[2] for status in statuses])


def _refuse_padded_shards(loader) -> None:
    """accelerate's ``even_batches=True`` (its default) pads the shorter shards with samples from
    the start of the dataset when the data does not split evenly: those would be counted twice."""
    sampler = getattr(loader, "batch_sampler", None)
    processes = getattr(sampler, "num_processes", 1)
    if not getattr(sampler, "even_batches", False) or processes <= 1 or getattr(sampler, "split_batches", False):
        return
    dataset, batch_size = getattr(loader, "dataset", None), getattr(sampler, "batch_size", None)
    if batch_size is None or not hasattr(dataset, "__len__"):
        return
    if len(dataset) % (batch_size * processes) != 0 and not getattr(sampler, "drop_last", False):
        raise ValueError(
            f"{len(dataset)} calibration samples do not split into {processes} ranks × batches of {batch_size}, and "
            "accelerate's even_batches=True repeats samples to even the shards out, which would count them twice: "
            "prepare the calibration loader with even_batches=False, e.g. Accelerator(dataloader_config="
            "DataLoaderConfiguration(even_batches=False)) (the shards may then differ in length; the statistics are "
            "summed over ranks either way)")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_END = object()


def _with_batch_index(err: Exception, index: int) -> Exception:
    """The same error, saying which calibration batch raised it."""
    if f"batch {index}" in str(err):
        return err
    if type(err) in (ValueError, TypeError, RuntimeError):
        return type(err)(f"batch {index}: {err}")
    err.add_note(f"fisher_kernels: raised while processing calibration batch {index}")
    return err


def _summed_loss(model, prepared, loss_fn, fisher, generator, causal, check, weighting,
                 batch_total=None, hooks=None) -> tuple[torch.Tensor, int]:
    """The batch's calibration loss (weighted per ``weighting``) and its number of loss units."""
    labels = prepared.targets
    try:
        if check and loss_fn is None and fisher == "empirical":
            _check_model_loss(model, prepared, causal, hooks)
        outputs = called_module(model)(*prepared.args, **prepared.kwargs)
    except IndexError as err:  # read the ids only now that the model failed: no cost on the way
        _explain_index_error(model, prepared, err)
        raise
    if fisher == "true":
        return sampled_label_loss(outputs, prepared.output_token_mask, generator, weighting, batch_total)
    if loss_fn is not None:
        loss = loss_fn(outputs, labels)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if check:
            _refuse_mean_loss(loss, outputs, labels, causal)
        return loss, _token_count(prepared)
    loss, _, units = summed_model_loss(outputs, labels, causal=causal, weighting=weighting, batch_total=batch_total)
    return loss, units


@torch.no_grad()
def _check_model_loss(model, prepared, causal: bool, hooks=None) -> None:
    """The loss recomputed from the logits must match the model's own (given ``labels``) on the
    batch's first sequence, else the model computes another loss and ``loss_fn`` is needed. One
    sequence without autograd and with the hooks paused: the model's own loss (Hugging Face's
    upcasts all the logits to fp32) then costs no memory on the scale of the batch's logits."""
    one = split_batch(prepared, 1)[0]
    if hooks is not None:
        hooks.paused = True
    try:
        outputs = called_module(model)(*one.args, **one.kwargs, labels=one.targets)
    finally:
        if hooks is not None:
            hooks.paused = False
    model_loss = getattr(outputs, "loss", None)
    summed, count, _ = summed_model_loss(outputs, one.targets, causal=causal)
    count = int(count)
    if model_loss is None or count == 0:
        return
    model_loss = model_loss.item()
    if not math.isfinite(model_loss):
        raise ValueError(f"the model's own loss is {model_loss}: its outputs are not finite (check its weights "
                         "and inputs)")
    mean = summed.item() / count
    if not math.isclose(mean, model_loss, rel_tol=2e-2, abs_tol=1e-4):
        raise ValueError(
            f"the summed loss recomputed from logits ({mean:.6g} per token) does not match the model's "
            f"own loss ({model_loss:.6g}); pass loss_fn=(outputs, targets) -> summed loss"
        )


def _explain_index_error(model, prepared, err: IndexError) -> None:
    """An input id outside the model's vocabulary, said as such (the embedding's IndexError says
    'index out of range in self')."""
    ids = prepared.kwargs.get("input_ids")
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(ids, torch.Tensor) or size is None or not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        raise ValueError(f"input ids range from {low} to {high}, outside the model's vocabulary of {size} (a "
                         "tokenizer of another model?)") from err


def _refuse_mean_loss(loss: torch.Tensor, outputs, labels, causal: bool) -> None:
    """A ``loss_fn`` must return a sum; one whose value is the cross-entropy *mean* over the
    batch's labels (checked where the outputs have logits the labels fit) is refused."""
    try:
        with torch.no_grad():
            summed, count, _ = summed_model_loss(outputs, labels, causal=causal)
            count = int(count)
    except (ValueError, TypeError, RuntimeError):
        return  # not a cross-entropy we can recompute: nothing to compare with
    value, summed = float(loss.detach()), float(summed)
    if count > 1 and math.isclose(value, summed / count, rel_tol=1e-3) and not math.isclose(value, summed, rel_tol=1e-3):
        raise ValueError(f"loss_fn returned {value:.6g}, the mean over the batch's {count} labels (their sum is "
                         f"{summed:.6g}): it must return the sum, e.g. nn.CrossEntropyLoss(reduction='sum'), so that "
                         "statistics do not depend on batch sizes")


def _token_count(prepared) -> torch.Tensor | int:
    """Counted tokens of a batch (the loss units of a user's summed ``loss_fn``), on the device."""
    mask = prepared.output_token_mask
    return prepared.num_sequences if mask is None else mask.sum()


def _add_decoder_inputs(model: nn.Module, prepared) -> None:
    """Encoder-decoder models build their decoder inputs from ``labels`` only when labels are
    passed to them, which the pass does not do (it computes the loss itself): derive them the way
    the model does, for every batch."""
    kwargs = prepared.kwargs
    if "decoder_input_ids" in kwargs or "decoder_inputs_embeds" in kwargs:
        return
    labels = prepared.targets
    make = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    config = getattr(model, "config", None)
    start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or (make is None and (start is None or pad is None)):
        raise ValueError("this encoder-decoder model needs decoder inputs: put 'decoder_input_ids' in the batches "
                         "(or token-level 'labels' the model can shift into them)")
    if make is not None:
        kwargs["decoder_input_ids"] = make(labels=labels)
        return
    # what the model's forward does with labels (Whisper, Marian, ...): shift right, start token first
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    kwargs["decoder_input_ids"] = shifted.masked_fill(shifted == IGNORE_INDEX, pad)


def full_statistics_requests(model: nn.Module, target_modules=None) -> dict[str, StatisticsRequest]:
    """Everything any method can consume, for every target layer: full factors A and G,
    diag(G) and the mean gradient. Statistics collected with these can be cached and reused for
    any method and rank (memory: d_in² + d_out² + d_out·d_in floats per layer)."""
    from ..layers import resolve_target_modules

    return {name: StatisticsRequest(input_factor=True, output_factor=True, output_factor_diag=True, gradient=True)
            for name in resolve_target_modules(model, target_modules)}
