"""Several processes: sharded weights (FSDP2, DeepSpeed ZeRO-3) and per-layer work split across ranks."""
