"""Tensor parallelism on 2 gloo ranks: the tp=2 model built from the same seed is the tp=1 model sharded,
gives the same (gathered) logits and matching gradient slices for every preset, sequence parallelism changes
nothing, and DeepSpeed's PipelineModule built from `layer_specs` computes the same outputs."""
import torch
import torch.distributed as dist

from megatron.model import GPTModel, tp_partition
from megatron.mpu import ParallelState, initialize_parallel, shard_tensor
from megatron.testing.distributed import run_distributed

from tests.unit.test_model_presets import build_cfg, packed_batch

CASES = [
    ("llama", []),
    ("neox", []),
    ("qwen2", ["model.tie_embeddings=true"]),
    ("llama", ["model.value_head=true", "objective.name=rm", "model.dropout=0.1"]),
]
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=5e-5)  # gradients sum O(B*S*V) terms in a different order


def _build(cfg, ps, seed=1234):
    torch.manual_seed(seed)
    return GPTModel(cfg, ps)


def _run(model, batch, weight, seed=99):
    """Forward + backward of sum(out * weight) with the dropout RNG reset; returns (out, {name: grad})."""
    torch.manual_seed(seed)
    out = model(*batch)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _gather_vocab(shard, ps):
    parts = [torch.empty_like(shard) for _ in range(ps.tp_size)]
    dist.all_gather(parts, shard.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def _shard(full, name, cfg, ps):
    dim, chunks = tp_partition(name, cfg)
    return full if dim is None else shard_tensor(full, ps.tp_rank, ps.tp_size, dim, chunks)


def _check_tp(rank, world_size):
    ps = initialize_parallel(tensor=2, pipeline=1)
    batch = packed_batch(0)
    for preset, extra in CASES:
        cfg1 = build_cfg(preset, *extra)
        ref = _build(cfg1, ParallelState.single()).train()
        g = torch.Generator().manual_seed(5)
        weight = torch.randn((2, 16) if cfg1.model.value_head else (2, 16, cfg1.derived.padded_vocab_size),
                             generator=g)
        out1, grads1 = _run(ref, batch, weight)
        full1 = ref.state_dict()
        for sp in ("false", "true"):
            cfg2 = build_cfg(preset, *extra, f"parallel.sequence_parallel={sp}", tensor=2)
            model = _build(cfg2, ps).train()
            h = model.embedding(batch)[0]
            assert h.shape == (2, 8 if sp == "true" else 16, 64)  # the sequence shard under SP
            state = model.state_dict()
            assert list(state) == list(full1)
            for name, value in state.items():  # TP-invariant init: rank's tensors are the tp=1 slices
                assert torch.equal(value, _shard(full1[name], name, cfg2, ps)), (preset, sp, name)
            my_weight = weight if cfg1.model.value_head else shard_tensor(weight, ps.tp_rank, 2, dim=2)
            out2, grads2 = _run(model, batch, my_weight)
            got = out2 if cfg1.model.value_head else _gather_vocab(out2, ps)
            torch.testing.assert_close(got, out1, **TOL, msg=lambda m: f"{preset} {extra} sp={sp}: {m}")
            for name, grad in grads2.items():
                torch.testing.assert_close(grad, _shard(grads1[name], name, cfg2, ps), **GRAD_TOL,
                                           msg=lambda m: f"{preset} {extra} sp={sp} grad {name}: {m}")
    return True


def _check_pipeline_module(rank, world_size):
    """DeepSpeed's PipelineModule (1 stage, tp=2) from layer_specs: same outputs and canonical weights."""
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megatron.model import CHECKPOINTABLE_LAYERS, activation_checkpoint_func, canonical_prefix, layer_specs

    deepspeed.init_distributed(dist_backend="gloo")
    ps = initialize_parallel(tensor=2, pipeline=1)
    batch = packed_batch(1)
    for preset, extra in (("neox", ["model.tie_embeddings=true"]), ("llama", [])):
        cfg = build_cfg(preset, *extra, "parallel.sequence_parallel=true", tensor=2)
        model = GPTModel(cfg, ps, layer_seed=77).train()
        pipe = PipelineModule(layers=layer_specs(cfg, ps), num_stages=1,
                              topology=PipeModelDataParallelTopology(num_pp=1, num_mp=2, num_dp=1),
                              partition_method="parameters", seed_layers=True, base_seed=77,
                              seed_fn=torch.manual_seed,
                              activation_checkpoint_interval=1, activation_checkpoint_func=activation_checkpoint_func,
                              checkpointable_layers=list(CHECKPOINTABLE_LAYERS)).train()
        pipe.set_checkpoint_interval(1)  # (re)computes which layer chunks are checkpointed, as the engine does
        calls = []
        for module in pipe.modules():
            if type(module).__name__ == "BlockStage":
                module.register_forward_pre_hook(lambda mod, inp: calls.append(1))
        canonical = model.state_dict()
        for key, value in pipe.state_dict().items():
            head, rest = key.split(".", 1)
            name = ("embedding." + rest.split(".", 1)[1]) if head == "tied_modules" else \
                canonical_prefix(int(head), cfg) + rest
            assert torch.equal(value, canonical[name]), name
        w = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(rank))
        out_model, grads = _run(model, batch, w)
        out_pipe = pipe(batch)
        torch.testing.assert_close(out_pipe, out_model, rtol=0, atol=0)
        (out_pipe * w).sum().backward()
        assert len(calls) == 2 * cfg.model.num_layers  # each block recomputed once in backward
        for key, p in pipe.named_parameters():
            head, rest = key.split(".", 1)
            name = ("embedding." + rest.split(".", 1)[1]) if head == "tied_modules" else \
                canonical_prefix(int(head), cfg) + rest
            torch.testing.assert_close(p.grad, grads[name], **GRAD_TOL)
    return True


def test_tp2_matches_tp1_for_every_preset_with_and_without_sequence_parallel():
    assert run_distributed(_check_tp, 2) == [True, True]


def test_deepspeed_pipeline_module_from_layer_specs():
    assert run_distributed(_check_pipeline_module, 2) == [True, True]
