"""``FisherInitCallback``: data-aware LoRA initialisation inside a ``transformers.Trainer`` run.

    trainer = SFTTrainer(model=model_id_or_model, peft_config=LoraConfig(r=16, ...), train_dataset=...,
                         callbacks=[fisher_kernels.FisherInitCallback(method="filet", num_batches=16)])
    trainer.train()

At ``on_train_begin`` (after the Trainer built its optimizer, before its first step) the
callback initialises the model's LoRA adapter in place from a bounded number of batches of the
trainer's own train dataloader (or of ``loader`` when given), as ``init_lora(peft_model, ...)``
does: the optimizer keeps the same parameter objects. Gradient checkpointing is switched off for
the calibration pass and back on after it. A resumed run (``global_step > 0``) is left alone, and
so is an adapter initialised before (a second ``trainer.train()`` continues from the trained one).
"""

from __future__ import annotations

import itertools
import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


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
        for name in ("r", "lora_alpha", "target_modules", "lora_config"):
            if name in options:
                raise ValueError(f"{name} comes from the model's LoRA adapter (the trainer's peft_config), not from "
                                 "the callback")
        self.loader, self.method, self.num_batches = loader, method, num_batches
        self.adapter_name, self.options, self.report = adapter_name, options, None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from peft import PeftModel

        from .api import init_lora

        if state.global_step > 0:
            return control  # resuming: the adapter already holds trained values
        while not isinstance(model, PeftModel) and hasattr(model, "module"):
            model = model.module  # DDP / accelerate wrappers
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
            init_lora(model, batches, method=self.method, adapter_name=adapter, progress=False, **self.options)
        finally:
            if checkpointing:
                base.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs=getattr(args, "gradient_checkpointing_kwargs", None))
        self.report = model.fisher_kernels_report
        return control
