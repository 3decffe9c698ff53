"""Packing changes the layout, never the numbers: per-sequence log-probs and reward scores of a packed
micro-batch equal those of the same examples laid out one sequence per row (fp32, 1e-5)."""
import pytest
import torch

from megatron.data import collate, load_tokenizer, open_dataset
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.testing.configs import tiny_test_config
from megatron.engines.forward import forward_stats


@pytest.mark.parametrize("objective", ["sft", "dpo", "kto", "rm"])
def test_packed_equals_unpacked(tmp_path, objective):
    cfg = tiny_test_config(str(tmp_path), objective, overrides=["model.max_seq_len=128"])
    tok = load_tokenizer(cfg.data.tokenizer)
    ds = open_dataset(cfg, tok, "train", log=None, progress=False)
    examples = [ds[i] for i in range(6)]
    packed = collate(examples, pack=True, max_seq_len=cfg.model.max_seq_len)
    unpacked = collate(examples, pack=False, max_seq_len=cfg.model.max_seq_len)
    # The layouts really differ: several sequences share a packed row.
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    assert int(packed["segment_ids"].max()) > 1
    torch.manual_seed(0)
    model = GPTModel(cfg, ParallelState.single()).eval()
    with torch.no_grad():
        a = forward_stats(model, packed, ParallelState.single(), cfg.model.value_head)
        b = forward_stats(model, unpacked, ParallelState.single(), cfg.model.value_head)
    assert torch.equal(a.token_count, b.token_count) and bool((a.token_count > 0).all())
    if cfg.model.value_head:
        torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(a.logp_sum, b.logp_sum, atol=1e-5, rtol=0)
        assert float(a.logp_sum.abs().min()) > 1.0  # real sums over real tokens, not zeros
