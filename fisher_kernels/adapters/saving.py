"""Saving a model whose base weights changed: the adapter beside its residual base, all or nothing.
"""

from __future__ import annotations



import copy
import shutil


from .conversion import save_initial_adapter
from ..files import publish_directories, staging_directory, write_text_atomically
from ..distributed.sharded import is_partitioned, is_sharded




def check_output_dirs(adapter_dir, base_dir, source_dir=None) -> None:
    """Refuse, before anything is written, output directories that cannot take the save: a path that
    exists as a file, the same directory twice, or the directory the model was loaded from (its
    weights would be overwritten by the residual ones)."""
    import os

    paths = {"adapter directory": adapter_dir, "base directory": base_dir}
    for what, path in paths.items():
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"the {what} {path} exists and is not a directory: nothing was saved; choose another path")
    if os.path.realpath(adapter_dir) == os.path.realpath(base_dir):
        raise ValueError(f"the adapter and the residual base would both be written to {base_dir}: give two directories")
    if source_dir and os.path.isdir(source_dir):
        source = os.path.realpath(source_dir)
        for what, path in paths.items():
            target = os.path.realpath(path)
            if source == target or source.startswith(target + os.sep):
                raise ValueError(f"the {what} {path} is where the model was loaded from ({source_dir}): saving there "
                                 "would overwrite its weights; choose another output directory")


def save_residual_model(peft_model, adapter_dir: str, base_dir: str) -> None:
    """Save a model whose base weights the method changed: the adapter to ``adapter_dir`` (with
    ``fisher_kernels_report.json``, how it was made) and the residual base model
    (``W' = W − s·B A``) to ``base_dir``.

    Reload with ``PeftModel.from_pretrained(AutoModel...from_pretrained(base_dir), adapter_dir)``.
    To get a plain LoRA adapter for the *original* model instead, use PEFT's conversion path
    (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``, as for PiSSA).
    The model passed in is left as it was. A sharded (FSDP2, ZeRO-3) model is refused: gather its state
    with ``torch.distributed.checkpoint.state_dict.get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True, cpu_offload=True))`` (ZeRO-3:
    ``engine.save_16bit_model``) and save that on one rank.
    """
    import os

    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"save_residual_model saves a PeftModel (from init_lora), got {type(peft_model).__name__}")
    sharded = next((name for name, p in peft_model.named_parameters() if is_sharded(p) or is_partitioned(p)), None)
    if sharded is not None:
        raise TypeError(f"parameter {sharded!r} is sharded (FSDP2 / ZeRO-3): save_residual_model would write one "
                        "rank's part. Gather the whole state and save it on rank 0: FSDP2 with torch.distributed."
                        "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict="
                        "True, cpu_offload=True)), ZeRO-3 with engine.save_16bit_model(...); the adapter alone saves "
                        "as usual (peft_model.save_pretrained)")
    source = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    check_output_dirs(adapter_dir, base_dir, source)
    adapter_tmp, base_tmp = staging_directory(adapter_dir), staging_directory(base_dir)
    try:  # everything is written under temporary names first: a failure leaves the directories as they were
        peft_model.save_pretrained(adapter_tmp)
        report = getattr(peft_model, "fisher_kernels_report", None)
        if report is not None:  # how the adapter was made, beside it
            report.save(os.path.join(adapter_tmp, "fisher_kernels_report.json"))
            if report.initial_adapter:  # what save_as_plain_lora needs after a reload
                save_initial_adapter(report.initial_adapter, adapter_tmp)
        base = copy.deepcopy(peft_model).unload()
        base.save_pretrained(base_tmp)
        _point_adapter_configs_at(adapter_tmp, base_dir)
        publish_directories([(adapter_tmp, adapter_dir), (base_tmp, base_dir)])  # both, or neither
    finally:
        for tmp in (adapter_tmp, base_tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _point_adapter_configs_at(adapter_dir, base_dir) -> None:
    """``base_model_name_or_path`` of every adapter config saved under ``adapter_dir`` names the
    residual base, so that ``AutoPeftModel...from_pretrained(adapter_dir)`` loads the adapter onto the
    weights it was made for, not the original ones (46 logits off on SmolLM2)."""
    import json
    import os

    for folder, _, files in os.walk(str(adapter_dir)):
        if "adapter_config.json" in files:
            path = os.path.join(folder, "adapter_config.json")
            with open(path) as f:
                config = json.load(f)
            config["base_model_name_or_path"] = os.path.abspath(str(base_dir))
            write_text_atomically(path, json.dumps(config, indent=2, sort_keys=True))
