"""Writing into PEFT: the LoraConfig, the LoRA layers, the residual base weights (and their rollback), an
existing PeftModel's adapter, saving a residual model and converting a trained adapter to plain LoRA."""
