"""LoRA adapters: files in every common format, plugged into the models' compute slots (docs/ARCHITECTURE.md §3)."""
