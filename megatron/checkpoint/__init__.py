"""Canonical weights (`weights_io`: pure tensors, any tensor/pipeline layout) and the checkpoint directory format
(`checkpointing`: atomic saves, exact resume, starting-point rules). Every rank reads and holds only its own
shard: `tensor_files` (safetensors read slice by slice, written tensor by tensor), `tp_slices` (where a rank's
shard lies), `sharded_read` (one rank's view of a checkpoint of any layout), `module_io` (into and out of live
models, ZeRO-3 partitions included), `optimizer_state` and `reshard_resume` (resuming at another layout).
See docs/ARCHITECTURE.md."""
