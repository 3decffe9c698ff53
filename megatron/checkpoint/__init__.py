"""Canonical weights (`weights_io`: pure tensors, any tensor/pipeline layout) and the checkpoint directory format
(`checkpointing`: atomic saves, exact resume, starting-point rules). See docs/ARCHITECTURE.md."""
