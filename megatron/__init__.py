"""A Megatron-style distributed post-training framework (SFT, RM, DPO family, KTO) on DeepSpeed."""
__version__ = "0.1.0"
