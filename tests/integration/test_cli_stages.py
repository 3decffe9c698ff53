"""Real runs (1 gloo rank): a resumed run's metrics.jsonl has each step once and the resumed step equals the
uninterrupted one; DPO loading an SFT run starts a new stage by default; the same SFT run continued from
another directory resumes in full; the end-of-run summary is printed."""
import json
import math
import os

import pytest

from megatron.testing.distributed import run_distributed


def _runs(rank, world_size, root):
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    out = {}
    sft_ck = f"{root}/sft_ck"
    sft = [f"checkpoint.save={sft_ck}", "checkpoint.interval=2"]
    first = run_training(tiny_test_config(f"{root}/sft", "sft", world_size, sft, iters=3))
    out["first"] = {r["step"]: r["loss"] for r in first.history}
    # As if the process died after logging step 3 but before its checkpoint became visible.
    with open(os.path.join(sft_ck, "latest"), "w") as fh:
        fh.write("step_0000002")
    resumed = run_training(tiny_test_config(f"{root}/sft", "sft", world_size, sft, iters=4))
    out["resumed"] = {r["step"]: r["loss"] for r in resumed.history}
    # DPO from the SFT run: no load_optimizer given -> a new stage (step 0; policy == reference at step 1).
    dpo = run_training(tiny_test_config(f"{root}/dpo", "dpo", world_size,
                                        [f"checkpoint.load={sft_ck}", f"checkpoint.save={root}/dpo_ck"], iters=2))
    out["dpo"] = [(r["step"], r["loss"]) for r in dpo.history]
    # The same SFT run (objective and data) continued into another directory: a full resume from step 4.
    cont = run_training(tiny_test_config(f"{root}/sft2", "sft", world_size,
                                         [f"checkpoint.load={sft_ck}", f"checkpoint.save={root}/sft2_ck"], iters=5))
    out["continued"] = [r["step"] for r in cont.history]
    return out


@pytest.mark.slow
def test_resume_stages_and_summary(tmp_path, capfd):
    out = run_distributed(_runs, 1, str(tmp_path))[0]
    assert sorted(out["first"]) == [1, 2, 3] and sorted(out["resumed"]) == [3, 4]
    # Exact resume from step 2 (model, optimizer, RNG loaded weights-only, data position): the same step 3.
    assert out["resumed"][3] == pytest.approx(out["first"][3], abs=1e-6)
    with open(tmp_path / "sft" / "logs" / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh]
    assert steps == [1, 2, 3, 4]  # step 3 of the interrupted run was dropped, not repeated
    assert [s for s, _ in out["dpo"]] == [1, 2]
    assert out["dpo"][0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert out["continued"] == [5]
    err = capfd.readouterr().err
    assert "run summary: step 4 of 4" in err and "run summary: step 2 of 2" in err
    assert f"checkpoint: {tmp_path}/dpo_ck/step_0000002" in err
    assert f"python tools/ckpts/convert_megatron_to_hf.py --ckpt {tmp_path}/dpo_ck --out {tmp_path}/dpo/logs/hf" in err
