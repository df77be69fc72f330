"""``FisherInitCallback``: data-aware LoRA initialisation inside a ``transformers.Trainer`` run.

    trainer = SFTTrainer(model=model_id_or_model, peft_config=LoraConfig(r=16, ...), train_dataset=...,
                         callbacks=[fisher_kernels.FisherInitCallback(method="filet", num_batches=16)])
    trainer.train()

At ``on_train_begin`` (after the Trainer built its optimizer, before its first step) the
callback initialises the model's LoRA adapter in place from a bounded number of batches of the
trainer's own train dataloader (or of ``loader`` when given), as ``init_lora(peft_model, ...)``
does: the optimizer keeps the same parameter objects. Gradient checkpointing is switched off for
the calibration pass and back on after it. An adapter initialised before is left alone (a second
``trainer.train()`` continues from the trained one).

Methods that write a residual into the base weights (``W' = W − P Q``: FILet, PiSSA, LoRA-GA, ...)
make a checkpoint's adapter meaningless on the original weights, and a checkpoint holds only the
adapter. So every checkpoint also gets ``fisher_kernels_residual.safetensors`` (the low-rank
``P, Q`` of each layer and a checksum of the residual weights), and a resumed run
(``resume_from_checkpoint``) on the original model writes the residual again before its first
step; a resumed run of a residual method whose checkpoint lacks the file is refused with the
reason, never trained on the wrong base.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from ..methods.common import LayerInit
from ..adapters.base_weights import apply_base_updates, revert_base_updates

logger = logging.getLogger(__name__)

RESIDUAL_FILE = "fisher_kernels_residual.safetensors"


def _weight_sums(base, names) -> list[float]:
    """Per layer, the float64 sum of the weight's entries and of their squares: equal (to rounding) for
    the same weights on any device, far apart for weights with or without the residual."""
    sums = []
    for name in names:
        W = base.get_submodule(name).weight.detach()
        sums += [float(W.double().sum()), float(W.double().square().sum())]
    return sums


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b))


class FisherInitCallback(TrainerCallback):
    """Initialise the trained model's LoRA adapter from data when training begins.

    Args:
        loader: calibration batches; by default the first ``num_batches`` batches of the
            trainer's train dataloader.
        method: any ``init_lora`` method (``"filet"``, ``"lora_da"``, ``"lora_ga"``, ``"pissa"``, ...).
        num_batches: batches of the calibration pass (default 16).
        adapter_name: the adapter to initialise (default: the model's active adapter).
        **options: passed to :func:`fisher_kernels.init_lora` (``micro_batch_size``, method
            options such as ``energy`` or ``population_size``).

    After training begins, ``callback.report`` holds the initialisation report.
    """

    def __init__(self, loader=None, method: str = "filet", num_batches: int = 16, adapter_name: str | None = None,
                 **options):
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                        or num_batches < 1):
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        from ..methods import METHODS
        from ..options import method_and_options

        name, _ = method_and_options(method, {})
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
        for name in ("r", "lora_alpha", "target_modules", "lora_config"):
            if name in options:
                raise ValueError(f"{name} comes from the model's LoRA adapter (the trainer's peft_config), not from "
                                 "the callback")
        self.loader, self.method, self.num_batches = loader, method, num_batches
        self.adapter_name, self.options, self.report = adapter_name, options, None
        self._residual: dict[str, torch.Tensor] | None = None  # P, Q per layer: written into every checkpoint

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from peft import PeftModel

        from ..api import init_lora

        while not isinstance(model, PeftModel) and hasattr(model, "module"):
            model = model.module  # DDP / accelerate wrappers
        if state.global_step > 0:  # resuming: the adapter already holds trained values
            self._restore_residual(args, state, model)
            return control
        if not isinstance(model, PeftModel):
            raise TypeError(f"FisherInitCallback needs a PeftModel to initialise (got {type(model).__name__}): "
                            "give the trainer a peft_config, or a model from peft.get_peft_model")
        loader = self.loader if self.loader is not None else train_dataloader
        if loader is None:
            raise ValueError("no calibration data: the trainer has no train dataloader; pass loader=...")
        batches = list(itertools.islice(loader, self.num_batches))  # re-iterable, and the same in every pass
        adapter = self.adapter_name or model.active_adapter
        if adapter in getattr(model, "fisher_kernels_initialized", {}):
            logger.info("FisherInitCallback: adapter %r was initialised before (an earlier train() call): left as "
                        "trained", adapter)
            return control
        base = model.get_base_model()
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
        if checkpointing:
            base.gradient_checkpointing_disable()
        try:
            options = dict(self.options)
            if options.get("resources") is None and "progress" not in options:  # the Trainer's own setting
                options["progress"] = args.disable_tqdm is not True
            init_lora(model, batches, method=self.method, adapter_name=adapter, **options)
        finally:
            if checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=getattr(args, "gradient_checkpointing_kwargs", None))
        self.report = model.fisher_kernels_report
        if self.report.residual_base:
            self._residual = {}
            for name, init in self.report.layers.items():
                if init.base_update is not None:
                    P, Q = init.base_update
                    self._residual[f"{name}::P"] = P.detach().cpu().contiguous()
                    self._residual[f"{name}::Q"] = Q.detach().cpu().contiguous()
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        """Beside each checkpoint's adapter: the residual written into the base weights (if any)."""
        if self._residual is None:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder) or getattr(args, "process_index", 0) != 0:
            return control
        names = list(dict.fromkeys(key.rpartition("::")[0] for key in self._residual))
        base = _unwrapped(model).get_base_model()
        metadata = {"method": str(self.method), "layers": json.dumps(names),
                    "residual_sums": json.dumps(_weight_sums(base, names))}
        save_file(self._residual, os.path.join(folder, RESIDUAL_FILE), metadata=metadata)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """A residual method changed the base weights: the trained adapter alone is wrong on the
        original model, so say how to save what reproduces the trained model."""
        if self._residual is not None:
            warnings.warn(f"FisherInitCallback: {self.method!r} wrote W − s·B₀A₀ into the base weights, so the adapter "
                          "that trainer.save_model() writes is only right on that residual base: save with "
                          "fisher_kernels.save_residual_model(model, adapter_dir, base_dir), or convert it for the "
                          "original model with fisher_kernels.save_as_plain_lora(model, out_dir)", UserWarning,
                          stacklevel=2)
        return control

    def _restore_residual(self, args, state, model) -> None:
        """A resumed run: the base weights become the residual the checkpoint's adapter was trained on."""
        from ..methods import METHODS
        from ..options import method_and_options

        method, options = method_and_options(self.method, dict(self.options))
        candidates = [c for c in (getattr(args, "resume_from_checkpoint", None),
                                  os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
                      if isinstance(c, str)]
        found = next((os.path.join(c, RESIDUAL_FILE) for c in candidates
                      if os.path.isfile(os.path.join(c, RESIDUAL_FILE))), None)
        residual = method in METHODS and (METHODS[method].residual_base or bool(options.get("residual_base")))
        if found is None:
            if residual:
                raise ValueError(
                    f"resuming a run whose adapter {method!r} trained against a residual base (W − s·B₀A₀), but "
                    f"no {RESIDUAL_FILE} was found in {candidates}: the checkpoint's adapter would be trained on the "
                    "original weights. Resume from a checkpoint saved with FisherInitCallback in the callbacks, or "
                    "load the saved residual base model instead of the original one")
            return
        with safe_open(found, framework="pt") as f:
            metadata = f.metadata()
        names = json.loads(metadata["layers"])
        expected = json.loads(metadata["residual_sums"])
        self._residual = load_file(found)  # and into the checkpoints of the resumed run
        base = model.get_base_model()
        if _close(_weight_sums(base, names), expected):
            logger.info("FisherInitCallback: the base weights already hold the residual of %s", found)
            return
        inits = {n: LayerInit(None, None, (self._residual[f"{n}::P"], self._residual[f"{n}::Q"])) for n in names}
        written = apply_base_updates(base, inits)
        if not _close(_weight_sums(base, names), expected):
            revert_base_updates(base, written)
            raise ValueError(f"the model's base weights are neither the original ones nor the residual of {found}: "
                             "resume with the model the run started from")
        logger.info("FisherInitCallback: resumed on the residual base written from %s", found)


def _unwrapped(model):
    while hasattr(model, "module") and not hasattr(model, "get_base_model"):
        model = model.module
    return model
