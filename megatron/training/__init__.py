"""DeepSpeed engine, training loop, checkpoints and metrics (see docs/ARCHITECTURE.md)."""
