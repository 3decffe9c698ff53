"""Online RL plumbing without models: the prompt sampler (resumable, data-parallel, all samples of a prompt on one
rank), prompt files, packing rollouts into micro-batches with per-token fields, and the aggregation units."""
import json

import pytest
import torch

from megatron.config import ConfigError, load_config
from megatron.data import load_tokenizer
from megatron.testing.configs import DATA
from megatron.training.experience import Rollouts, TokenMap, grid_mask, pack_rollouts, rollout_units, to_grid
from megatron.training.rollout import PromptRecord, PromptSampler, load_prompts


def _records(n):
    return [PromptRecord(index=i, prompt=f"p{i}", ids=[1, i + 3]) for i in range(n)]


def test_sampler_shards_and_resumes():
    prompts = _records(10)
    single = PromptSampler(prompts, 4, 0, 1, seed=3)
    ranks = [PromptSampler(prompts, 4, r, 2, seed=3) for r in range(2)]
    seen = []
    for step in range(6):  # crosses two epochs of 10 prompts
        consumed = 4 * step
        whole = [(p.position, p.record.index) for p in single.step(consumed)]
        split = [(p.position, p.record.index) for r in ranks for p in r.step(consumed)]
        assert whole == split  # data-parallel ranks take contiguous slices of the same stream
        assert [p for p, _ in whole] == list(range(consumed, consumed + 4))  # positions key the sampling noise
        seen += [i for _, i in whole]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # epochs are permutations
    # resuming is a pure function of the prompts consumed
    again = PromptSampler(prompts, 4, 1, 2, seed=3)
    assert [p.record.index for p in again.step(12)] == [p.record.index for p in ranks[1].step(12)]
    with pytest.raises(ConfigError, match="multiple of 2"):
        PromptSampler(prompts, 3, 0, 2, seed=3)


def test_load_prompts_fields_and_errors(tmp_path):
    cfg = load_config([], ["model.max_seq_len=16", f"rollout.prompts_path={tmp_path}/p.jsonl"], world_size=1)
    tok = load_tokenizer(f"{DATA}/tokenizer")
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "count up from 7:", "answer": " 7 8 9"}) + "\n"
                    + json.dumps({"prompt": "reverse: a b", "answer": " b a"}) + "\n")
    recs = load_prompts(cfg, tok, None)
    assert [r.columns for r in recs] == [{"answer": " 7 8 9"}, {"answer": " b a"}]
    assert recs[0].ids[0] == tok.bos_id and recs[0].ids[1:] == tok.encode("count up from 7:")
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"p.jsonl:1: the record has no prompt field 'prompt'"):
        load_prompts(cfg, tok, None)
    path.write_text(json.dumps({"prompt": "count up from 7: " * 10}) + "\n")
    with pytest.raises(ConfigError, match="no room to generate"):
        load_prompts(cfg, tok, None)
    path.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(ConfigError, match="different fields"):
        load_prompts(cfg, tok, None)


def _rollouts():
    g = torch.Generator().manual_seed(0)
    prompt_ids = [[1, 5, 6], [1, 5, 6], [1, 7], [1, 7], [1, 8, 9, 10], [1, 8, 9, 10]]
    lengths = [3, 1, 4, 2, 2, 5]
    comp = [[int(x) for x in torch.randint(11, 50, (n,), generator=g)] for n in lengths]
    logps = [[-float(k) - 0.1 * j for j in range(n)] for k, n in enumerate(lengths)]
    return Rollouts(prompt_ids=prompt_ids, completion_ids=comp, behaviour_logps=logps,
                    group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), rewards=torch.arange(6, dtype=torch.float64))


def test_pack_rollouts_places_tokens_and_per_token_fields():
    ro = _rollouts()
    batches = pack_rollouts(ro, minibatches=3, micro_batch_size=1, max_seq_len=16)
    assert [len(m) for m in batches] == [2, 2, 2]
    # completions are dealt to minibatches by index (the same global minibatches at any data-parallel size)
    assert [[int(b["dataset_seq_index"][0]) for b in m] for m in batches] == [[0, 3], [1, 4], [2, 5]]
    T = int(ro.lengths.max())
    grid = to_grid(ro.behaviour_logps, T)
    for b in (b for m in batches for b in m):
        k = int(b["dataset_seq_index"][0])
        ids = ro.prompt_ids[k] + ro.completion_ids[k]
        n, p = len(ids), len(ro.prompt_ids[k])
        assert b["input_ids"][0, :n].tolist() == ids
        # position t scores labels[t] = the next token; the scored ones are exactly the generated tokens
        scored = b["loss_mask"][0].nonzero().flatten().tolist()
        assert scored == list(range(p - 1, n - 1))
        assert b["labels"][0, scored].tolist() == ro.completion_ids[k]
        field = b["_map"].to_batch(grid)
        assert field[0, scored].tolist() == pytest.approx(ro.behaviour_logps[k])
        assert float(field.abs().sum()) == pytest.approx(sum(abs(x) for x in ro.behaviour_logps[k]))
        back = torch.zeros_like(grid)
        b["_map"].to_grid(field, back)
        assert torch.equal(back[k], grid[k]) and float(back.abs().sum()) == pytest.approx(float(grid[k].abs().sum()))


def test_packed_rows_and_dropped_completions():
    ro = _rollouts()
    ro.keep = torch.tensor([True, True, False, False, True, True])
    (mini,) = pack_rollouts(ro, minibatches=1, micro_batch_size=6, max_seq_len=16)
    (b,) = mini
    assert b["input_ids"].shape[0] < 6  # several completions share a row
    units = rollout_units(b)
    mask = grid_mask(ro)
    assert units == {"tokens": float(mask.sum()), "sequences": 4.0, "examples": 4.0}
    assert mask[2].sum() == 0 and mask[3].sum() == 0 and mask[0].sum() == 3
    m = TokenMap.of(b)
    full = torch.arange(6 * 5, dtype=torch.float32).view(6, 5) * mask
    out = torch.zeros_like(full)
    m.to_grid(m.to_batch(full), out)
    assert torch.equal(out, full)  # kept tokens round-trip, dropped ones never appear
