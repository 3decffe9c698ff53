"""The trainer's own DPO step (DeepSpeed engine, forward_stats through the model's head + log-prob op, live
reference) with model.kernels eager and fused: the same losses and log-probs step after step, packed rows."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import bench_dpo as B  # noqa: E402

# a vocabulary that is not a multiple of 128: the head has padding rows the log-probs must ignore
TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2", "--vocab-size", "300",
        "--prompt-len", "4", "12", "--response-len", "4", "20", "--batch-pairs", "4", "--warmup", "1",
        "--steps", "2", "--lr", "1e-2", "--beta", "0.5", "--timeout", "600"]


@pytest.mark.slow  # two training subprocesses (DeepSpeed start-up)
@pytest.mark.parametrize("variant", ["ours-packed-live"])
def test_eager_and_fused_kernels_train_alike(variant):
    runs = {k: B.run_variant(variant, B.parse_args(TINY + ["--kernels", k])) for k in ("eager", "fused")}
    for k, r in runs.items():
        assert "error" not in r, f"{k}: {r}"
    eager, fused = runs["eager"], runs["fused"]
    assert len(eager["losses"]) == 3 and abs(eager["losses"][-1] - eager["losses"][0]) > 1e-3  # it trained
    assert fused["losses"] == pytest.approx(eager["losses"], abs=1e-5)
    assert fused["first_logps_chosen"] == pytest.approx(eager["first_logps_chosen"], abs=1e-4)
