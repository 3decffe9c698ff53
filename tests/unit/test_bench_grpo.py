"""Smoke test of tools/bench_grpo.py on a tiny shape: both sides (ours, and TRL's GRPOTrainer when trl imports) run
in their own subprocess on the same prompts, weights and lengths, and report consistent numbers."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import bench_grpo as B  # noqa: E402

TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--vocab-size", "512", "--prompts", "2",
        "--group", "2", "--prompt-len", "6", "--completion-len", "5", "--warmup", "1", "--steps", "1",
        "--timeout", "600"]


def test_prompts_and_tokenizer_agree():
    prompts = B.make_prompts(3, 5, 100, 4)
    assert prompts == B.make_prompts(3, 5, 100, 4) and all(len(p) == 4 for p in prompts)
    tok = B.dpo.word_tokenizer(100)
    for p in prompts:  # TRL tokenises the prompt text with this tokenizer: the same ids as ours
        assert tok(B.dpo.words(p), add_special_tokens=False)["input_ids"] == p


@pytest.mark.slow
def test_both_sides_run_the_same_work():
    args = B.parse_args(TINY)
    ours = B.run_side("ours", args)
    assert "error" not in ours, ours
    assert ours["response_length"] == 5 and ours["completions_per_s"] > 0 and len(ours["step_times_s"]) == 1
    assert len(ours["step_cpu_s"]) == 1 and ours["median_cpu_s"] > 0
    assert len(ours["rewards"]) == 2 and all(0.0 <= r <= 1.0 for r in ours["rewards"])
    import trl  # noqa: F401  (a dev requirement: the TRL side must run wherever the suite runs)
    theirs = B.run_side("trl", args)
    assert "error" not in theirs, theirs
    assert theirs["response_length"] == 5  # min_new_tokens: exactly as many tokens as ours
    assert theirs["completions_per_s"] > 0 and len(theirs["step_times_s"]) == 1 and theirs["median_cpu_s"] > 0
