"""How the model's layer specs are cut into pipeline stages (`parallel.pipeline_partition`).

The model is `L + 3` layer specs (megatron.model.specs): 0 embedding, 1..L blocks, L+1 final norm, L+2 head.
Every method is reduced to *blocks per stage* `[b_0, ..., b_{p-1}]` (sum L, each >= 1); the embedding always
goes to the first stage and the final norm and head to the last, which is the split the checkpoint shards
assume (megatron.checkpoint.weights_io.stage_of_key). The boundaries handed to DeepSpeed are then explicit:

    parts = [0, 1 + b_0, 1 + b_0 + b_1, ..., L + 3]     (stage s builds specs parts[s] .. parts[s+1]-1)

Methods:
  'uniform'     the same number of blocks per stage, the remainder to the first stages (like DeepSpeed's
                'type:BlockStage' and Megatron's uniform split of transformer layers);
  'parameters'  DeepSpeed's 'parameters' method: balance the trainable parameter count per stage
                (`deepspeed.runtime.utils.partition_balanced` on per-spec counts, here computed from the
                canonical shapes instead of building every layer), then read off the blocks per stage;
  'a,b,...'     explicit blocks per stage.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from megatron.config import Config, ConfigError

KEY = "parallel.pipeline_partition"


def spec_parameter_counts(cfg: Config, tp: Optional[int] = None) -> List[int]:
    """Trainable parameters of each of the L + 3 layer specs on one tensor-parallel rank.

    A tied head (TiedLayerSpec of the embedding) counts the embedding again, as DeepSpeed does.
    """
    from megatron.checkpoint.weights_io import canonical_shapes

    tp = cfg.parallel.tensor if tp is None else tp
    L = cfg.model.num_layers
    counts = [0] * (L + 3)
    for key, shape in canonical_shapes(cfg, tp).items():
        n = 1
        for d in shape:
            n *= d
        counts[_spec_index(key, L)] += n
    if cfg.model.tie_embeddings and not cfg.model.value_head:
        counts[L + 2] = counts[0]
    return counts


def _spec_index(key: str, num_layers: int) -> int:
    if key.startswith("embedding."):
        return 0
    if key.startswith("blocks."):
        return 1 + int(key.split(".")[1])
    if key.startswith("final_norm."):
        return num_layers + 1
    return num_layers + 2  # lm_head / value_head


def _uniform(num_layers: int, pp: int) -> List[int]:
    base, rem = divmod(num_layers, pp)
    return [base + (1 if s < rem else 0) for s in range(pp)]


def _balanced(cfg: Config, pp: int) -> List[int]:
    from deepspeed.runtime.utils import partition_balanced

    L = cfg.model.num_layers
    parts = partition_balanced(weights=spec_parameter_counts(cfg), num_parts=pp)
    bps = [sum(1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= L) for s in range(pp)]
    if min(bps) < 1:
        raise ConfigError(f"key '{KEY}': balancing parameters over {pp} stages leaves a stage without "
                          f"transformer blocks (blocks per stage {bps}: the embedding/head dominate); set "
                          f"{KEY}=uniform or an explicit list such as "
                          f"{','.join(str(b) for b in _uniform(L, pp))}")
    return bps


def _explicit(text: str, num_layers: int, pp: int) -> List[int]:
    try:
        bps = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"key '{KEY}': {text!r} is not 'parameters', 'uniform' or a comma-separated list of "
                          f"blocks per stage such as {','.join(str(b) for b in _uniform(num_layers, pp))}") from None
    if len(bps) != pp or sum(bps) != num_layers or min(bps) < 1:
        raise ConfigError(f"key '{KEY}': {text!r} must list {pp} stage sizes (parallel.pipeline), each >= 1, "
                          f"summing to model.num_layers={num_layers}")
    return bps


def blocks_per_stage(cfg: Config) -> List[int]:
    """Transformer blocks on each pipeline stage, from `parallel.pipeline_partition` (see module docstring).

    Raises ConfigError naming the key for an unknown method or an impossible list.
    """
    pp, L = cfg.parallel.pipeline, cfg.model.num_layers
    method = str(cfg.parallel.pipeline_partition).strip().lower()
    if pp > L:
        raise ConfigError(f"parallel.pipeline={pp} exceeds model.num_layers={L}")
    if method == "uniform" or pp == 1:
        return _uniform(L, pp)
    if method == "parameters":
        return _balanced(cfg, pp)
    if method.startswith("type:"):
        raise ConfigError(f"key '{KEY}': DeepSpeed's {method!r} is spelled 'uniform' here (equal blocks per stage)")
    return _explicit(method, L, pp)


def stage_boundaries(bps: List[int]) -> List[int]:
    """Explicit DeepSpeed `parts` over the L + 3 specs for blocks per stage `bps` (len = stages + 1)."""
    parts = [0]
    acc = 1  # the embedding spec precedes the first block
    for b in bps:
        acc += b
        parts.append(acc)
    parts[-1] += 2  # final norm and head go to the last stage
    return parts


def stage_layout(cfg: Config) -> Dict[str, List]:
    """{'blocks_per_stage': [...], 'parts': [...]} for the configured pipeline (for logs and reports)."""
    bps = blocks_per_stage(cfg)
    return {"blocks_per_stage": bps, "parts": stage_boundaries(bps)}
