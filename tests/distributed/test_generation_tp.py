"""Generation across layouts on gloo ranks: tensor 2 samples exactly what tensor 1 samples (padded vocabulary,
greedy, temperature, top-k, top-p, min-p), and ZeRO-3 data-parallel ranks with different prompt counts generate
what one process generates (parameters gathered once per call: uneven work would deadlock on per-token gathers)."""
from __future__ import annotations

import pytest
import torch

from megatron.config import load_config
from megatron.generation import SamplingParams, generate
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.testing.distributed import run_distributed

BASE = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_kv_heads=2",
        "model.vocab_size=200", "model.max_seq_len=64", "model.attention=sdpa", "train.micro_batch_size=2",
        "train.global_batch_size=4"]
PROMPTS = [[1, 5, 9, 13, 2, 7], [4], [8, 3, 3, 9, 1, 1, 2, 6, 5, 4, 10], [6, 6]]
PARAMS = {
    "top_p": SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=5),
    "greedy": SamplingParams(temperature=0.0, max_new_tokens=10),
    "temperature_min_p": SamplingParams(n=2, temperature=0.9, min_p=0.02, max_new_tokens=10, seed=6),
    "top_k": SamplingParams(n=2, temperature=1.2, top_k=30, max_new_tokens=10, seed=7),
}


def _model(cfg, ps):
    torch.manual_seed(0)  # TP-invariant init: the same model at tensor 1 and 2
    model = GPTModel(cfg, ps)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in model.parameters():  # replicated shift per parameter, then this rank's slice
            p.add_(0.1)
    return model.eval()


def _as_lists(out):
    return [[(c.token_ids, c.logprobs, c.finish_reason) for c in r] for r in out]


def _tp_worker(rank, world, overrides):
    from megatron.mpu import initialize_parallel
    cfg = load_config([], BASE + overrides, world_size=world)
    ps = initialize_parallel(cfg.parallel.tensor, 1)
    model = _model(cfg, ps)
    return {name: _as_lists(generate(model, cfg, ps, PROMPTS, p, batch_size=3)) for name, p in PARAMS.items()}


def test_tensor2_samples_what_tensor1_samples():
    cfg = load_config([], BASE, world_size=1)
    single = {name: _as_lists(generate(_model(cfg, ParallelState.single()), cfg, ParallelState.single(), PROMPTS, p))
              for name, p in PARAMS.items()}
    ranks = run_distributed(_tp_worker, 2, ["parallel.tensor=2"], timeout=300)
    assert cfg.derived.padded_vocab_size == 256  # shard 1 of tensor 2 holds 56 padded ids
    for name in PARAMS:
        assert ranks[0][name] == ranks[1][name], name  # TP peers agree exactly
        for one, two in zip(single[name], ranks[0][name]):
            for (ids1, lp1, fin1), (ids2, lp2, fin2) in zip(one, two):
                assert ids1 == ids2 and fin1 == fin2, name
                assert lp1 == pytest.approx(lp2, abs=1e-5), name
    assert all(len({tuple(c[0]) for c in r}) == 2 for r in single["top_p"])  # n=2 samples differ


def _zero3_worker(rank, world):
    import deepspeed
    from megatron.engines.build import freeze_as_reference
    from megatron.mpu import initialize_parallel
    cfg = load_config([], BASE + ["parallel.zero_stage=3"], world_size=world)
    ps = initialize_parallel(1, 1)
    engine = freeze_as_reference(cfg, ps, _model(cfg, ps), torch.device("cpu"), deepspeed)
    assert any(hasattr(p, "ds_id") for p in engine.module.parameters())
    mine = [0, 1, 2] if rank == 0 else [3]  # uneven: rank 1 finishes its decoding long before rank 0
    out = generate(engine, cfg, ps, [PROMPTS[i] for i in mine], PARAMS["top_p"], prompt_indices=mine)
    # the engine still works afterwards (parameters re-partitioned, hooks intact)
    ids = torch.tensor([PROMPTS[0]])
    logits = engine(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids))
    return dict(zip(mine, _as_lists(out))), logits.detach().numpy()  # no tensors across processes


def test_zero3_data_parallel_generation():
    cfg = load_config([], BASE, world_size=1)
    ps = ParallelState.single()
    model = _model(cfg, ps)
    single = _as_lists(generate(model, cfg, ps, PROMPTS, PARAMS["top_p"]))
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids))
    ranks = run_distributed(_zero3_worker, 2, timeout=300)
    got = {**ranks[0][0], **ranks[1][0]}
    for i in range(len(PROMPTS)):
        for (ids1, lp1, fin1), (ids2, lp2, fin2) in zip(single[i], got[i]):
            assert ids1 == ids2 and fin1 == fin2
            assert lp1 == pytest.approx(lp2, abs=1e-5)
    for _, after in ranks:
        assert torch.allclose(torch.from_numpy(after), logits, atol=1e-5)
