"""Every loop and tool builds models here, one way: the policy and its starting weights, the frozen reference,
DeepSpeed (and pipeline) engines, the forward pass to per-sequence statistics, and the precomputed reference."""
