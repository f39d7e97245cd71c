"""DeepSpeed config generation: memory model, ZeRO stage/offload/batch selection, presets."""
