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
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed.sharded import release_after_pass
from ..ops import get_ops
from .batches import IGNORE_INDEX, as_batches, prepare_batch, split_batch
from .hooks import DeferredCounts, StatisticsHooks
from .lockstep import Lockstep, exchange_pass_status, in_process_group, refuse_padded_shards
from ..quantized import keep_gradients_flowing_
from ..settings import Calibration, Resources, grouped
from .losses import LOSS_WEIGHTINGS, batch_loss, check_losses_finite, counted_labels, is_causal_lm
from .containers import KFACStatistics, StatisticsRequest
from .fingerprint import model_fingerprint, tensor_hash_on_device
from .model_state import PreservedModelState

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def collect_statistics(
    model: nn.Module,
    loader,
    requests: dict[str, StatisticsRequest],
    *,
    calibration: Calibration | None = None,
    resources: Resources | None = None,
    loss_weighting: str = "token",
    fingerprint: bool = True,
    **settings,
) -> KFACStatistics:
    """Run one calibration pass over ``loader`` and return the requested statistics.

    Args:
        model: any ``nn.Module``; Hugging Face models take dict batches.
        loader: iterable of batches: dicts of tensors with ``labels`` (unless ``loss_fn`` is
            given or ``fisher="true"``), or ``(inputs, targets)`` pairs with ``loss_fn``.
        requests: ``{layer name: StatisticsRequest}``.
        calibration: :class:`~fisher_kernels.Calibration` (number of batches, ``loss_fn``
            returning the **sum** of per-token or per-sample losses, token mask, empirical or
            true Fisher, label seed, micro-batches). Without ``loss_fn`` the loss is recomputed
            as a sum from ``outputs.logits`` and ``labels``, checked on the first batch against
            the model's own (mean) loss.
        resources: :class:`~fisher_kernels.Resources` (kernels backend, ``distributed``,
            ``progress``; ``max_stats_memory`` is for ``init_lora``).
        **settings: any field of ``Calibration`` or ``Resources`` as a keyword.
        loss_weighting: how the back-propagated loss weights positions: ``"token"`` (default:
            the sum over counted labels, so statistics do not depend on batching), ``"sequence"``
            (sum over sequences of each one's mean loss, LoRA-DA's reference) or ``"batch"``
            (each batch's mean loss, LoRA-GA's reference). With ``"sequence"``/``"batch"`` the
            mean gradient is divided by the number of sequences/batches instead of tokens; the
            other statistics stay per token. A custom ``loss_fn`` always counts as ``"token"``.

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
    calibration, resources, unknown = grouped(settings, calibration, resources)
    if unknown:
        raise TypeError(f"collect_statistics got unexpected keywords {sorted(unknown)}; it takes the fields of "
                        "Calibration and Resources")
    return run_calibration_pass(model, loader, requests, calibration, resources, loss_weighting=loss_weighting,
                                fingerprint=fingerprint)


def run_calibration_pass(model: nn.Module, loader, requests: dict[str, StatisticsRequest], calibration: Calibration,
                         resources: Resources, *, loss_weighting: str = "token", fingerprint: bool = True,
                         forward_module: nn.Module | None = None, owners: dict[str, int] | None = None
                         ) -> KFACStatistics:
    """:func:`collect_statistics` with its settings grouped; ``forward_module`` is what the pass calls
    when it is not ``model`` (a sharded ``PeftModel`` around ``model``: FSDP's root runs the forward).
    ``owners`` (``{layer: rank}``, a sharded model in a process group): each layer's statistics are
    summed on its owner only; the other ranks' entries hold counts and sharing, no tensor (see
    :mod:`fisher_kernels.distributed.owners`)."""
    loss_fn, token_mask, fisher = calibration.loss_fn, calibration.token_mask, calibration.fisher
    num_batches = calibration.num_batches
    micro_batch_size = None if calibration.micro_batch_size == "auto" else calibration.micro_batch_size  # planned by init
    progress, distributed = resources.progress, resources.distributed
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError("gradient checkpointing is on: its recomputed forward passes would be counted twice; "
                         "call model.gradient_checkpointing_disable() for the calibration pass")
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
    ops = get_ops(resources.backend, device)
    causal = is_causal_lm(model)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    generator = torch.Generator().manual_seed(calibration.label_seed)
    stats = KFACStatistics(fisher=fisher, token_mask=token_mask,
                           loss_weighting="token" if loss_fn is not None else loss_weighting)

    loader = as_batches(loader, model)
    refuse_padded_shards(loader)
    batches = loader if num_batches is None else itertools.islice(loader, num_batches)
    prepare_options = dict(token_mask=token_mask, needs_labels=loss_fn is None and fisher == "empirical",
                           causal=causal, encoder_decoder=encoder_decoder)
    total = num_batches
    if total is None and hasattr(loader, "__len__"):
        total = len(loader)
    with PreservedModelState(model) as guard, torch.enable_grad():
        distributed = in_process_group() if distributed is None else bool(distributed) and in_process_group()
        if owners is not None and not distributed:
            raise ValueError("owners: the statistics of a layer are kept by one rank of a process group; there is none")
        hooks = StatisticsHooks(model, requests, ops, device, owners=owners,
                                rank=torch.distributed.get_rank() if owners is not None else 0)
        if owners is not None and not hooks.sharded:
            raise ValueError("owners: only a sharded model's pass keeps its ranks in step, as owners need")
        hooks.register(guard)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        keep_gradients_flowing_(model)  # bitsandbytes 4-bit layers on the CPU
        bar = tqdm(batches, total=total, desc="fisher_kernels: calibration", unit="batch", disable=not progress)
        batch_iter = iter(bar)
        try:
            first_batch = _run_pass(batch_iter, hooks, stats, model, forward_module or model, device, prepare_options,
                                    loss_fn, fisher,
                                    generator, micro_batch_size, loss_weighting, needs_gradients,
                                    lockstep=Lockstep(hooks) if distributed and hooks.sharded else None)
        except BaseException as err:
            if distributed:  # the other ranks are told before this rank raises, so none of them waits forever
                exchange_pass_status(hooks, f"{type(err).__name__}: {err}", 0)
            raise
        finally:
            bar.close()
            release_after_pass(model)
        if distributed:
            exchange_pass_status(hooks, None, first_batch)
            stats.num_batches, stats.num_sequences, stats.loss_units = hooks.all_reduce(
                [stats.num_batches, stats.num_sequences, stats.loss_units])
        if stats.num_batches == 0:
            raise ValueError("the calibration loader yielded no batch")
        if owners is None:
            stats.layers = hooks.finalize(stats.loss_units, per_token=loss_weighting == "token" or loss_fn is not None)
        else:  # a check fails on the layer's owner only: every rank raises
            from ..distributed.split_work import compute_share

            stats.layers = compute_share(lambda: hooks.finalize(
                stats.loss_units, per_token=loss_weighting == "token" or loss_fn is not None), owners,
                torch.distributed.get_rank())
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


def _run_pass(batch_iter, hooks, stats, model, forward, device, prepare_options, loss_fn, fisher, generator,
              micro_batch_size, loss_weighting, needs_gradients, lockstep: "Lockstep | None" = None) -> int:
    """The calibration loop: every batch's forward and backward, the hooks accumulating. Sets
    ``stats.data_fingerprint`` (this rank's batches, in order) and returns the fingerprint of this
    rank's first batch (0: none). ``lockstep`` (a sharded model): every rank runs the same number
    of forwards and backwards, see :class:`Lockstep`."""
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
                loss, units = batch_loss(forward, part, loss_fn, fisher, generator, causal,
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
    check_losses_finite(losses)
    hooks.read_token_counts(values)
    stats.loss_units += sum(values[i] for i in loss_units)
    fingerprints = hashes.fingerprints(values)
    stats.data_fingerprint = hashlib.sha256(b"".join(f.to_bytes(8, "little") for f in fingerprints)).hexdigest()
    return fingerprints[0] if fingerprints else 0


def _located(err: Exception, index: int) -> Exception:
    """``err`` saying which batch raised it (caused by ``err`` when it is a new exception)."""
    located = _with_batch_index(err, index)
    if located is not err:
        located.__cause__ = err
    return located


_END = object()


def _with_batch_index(err: Exception, index: int) -> Exception:
    """The same error, saying which calibration batch raised it."""
    if f"batch {index}" in str(err):
        return err
    if type(err) in (ValueError, TypeError, RuntimeError):
        return type(err)(f"batch {index}: {err}")
    err.add_note(f"fisher_kernels: raised while processing calibration batch {index}")
    return err


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
