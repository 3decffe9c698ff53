"""Smoke test of tools/bench_dpo.py on a tiny shape: each variant runs in its own subprocess through the real
training step; packed and unpacked layouts (and a precomputed reference) of the same pairs must give the same DPO
losses step after step, and the reported numbers must be self-consistent."""
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import bench_dpo as B  # noqa: E402

# lr large enough that the policy moves away from the reference after step 1, so later losses (not ln 2)
# depend on the gradients of every earlier step.
TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--vocab-size", "512",
        "--prompt-len", "4", "12", "--response-len", "4", "20", "--batch-pairs", "4", "--warmup", "1",
        "--steps", "2", "--lr", "1e-2", "--beta", "0.5", "--timeout", "600"]


@pytest.fixture(scope="module")
def results():
    args = B.parse_args(TINY)
    out = {v: B.run_variant(v, args) for v in ("ours-packed-live", "ours-unpacked-live", "ours-packed-precomputed")}
    for v, r in out.items():
        assert "error" not in r, f"{v} failed: {r}"
    return out


def test_make_pairs_is_deterministic_and_in_range():
    a = B.make_pairs(20, 7, 100, (3, 5), (2, 6))
    assert a == B.make_pairs(20, 7, 100, (3, 5), (2, 6))
    assert a != B.make_pairs(20, 8, 100, (3, 5), (2, 6))
    for p in a:
        assert 3 <= len(p["prompt"]) <= 5
        for key in ("chosen", "rejected"):
            assert 2 <= len(p[key]) <= 6 and p[key][-1] == B.EOS_ID
            assert all(B.FIRST_WORD_ID <= t < 100 for t in p[key][:-1])


def test_packed_and_unpacked_compute_the_same_dpo_loss(results):
    packed, unpacked = results["ours-packed-live"], results["ours-unpacked-live"]
    assert len(packed["losses"]) == 3
    assert packed["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert abs(packed["losses"][-1] - math.log(2)) > 1e-3  # training moved the policy: a real comparison
    assert packed["losses"] == pytest.approx(unpacked["losses"], abs=2e-4)
    assert packed["first_logps_chosen"] == pytest.approx(unpacked["first_logps_chosen"], rel=1e-5)


def test_precomputed_reference_matches_live(results):
    live, pre = results["ours-packed-live"], results["ours-packed-precomputed"]
    assert pre["losses"] == pytest.approx(live["losses"], abs=2e-4)


def test_reported_numbers_are_sane(results):
    packed, unpacked = results["ours-packed-live"], results["ours-unpacked-live"]
    for r in results.values():
        assert len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
        assert r["median_step_s"] == pytest.approx(sorted(r["step_times_s"])[1] / 2 + sorted(r["step_times_s"])[0] / 2)
        assert r["pairs_per_s"] == pytest.approx(4 / r["median_step_s"])
        assert r["tokens_per_s"] == pytest.approx(r["real_tokens_per_step"] / r["median_step_s"])
        assert 0.0 <= r["padding_fraction"] < 1.0
        assert r["positions_per_step"] >= r["real_tokens_per_step"] > 0
        assert r["peak_rss_mb"] > r["rss_after_imports_mb"] > 50 and r["peak_delta_mb"] > 0
    # same pairs, so the same real tokens; packing only removes padding
    assert packed["real_tokens_per_step"] == unpacked["real_tokens_per_step"]
    assert packed["padding_fraction"] < unpacked["padding_fraction"]
    assert packed["batch_shapes"][0][0] < unpacked["batch_shapes"][0][0] == 8  # unpacked: one row per sequence


def test_table_and_ratios():
    fake = dict(pairs_per_s=2.0, tokens_per_s=100.0, median_step_s=4.0, median_cpu_s=8.0, padding_fraction=0.1,
                peak_rss_mb=1000.0, peak_delta_mb=500.0, batch_shapes=[[2, 10]])
    rows = [dict(fake, variant="ours-packed-live"),
            dict(fake, variant="trl-live", pairs_per_s=1.0, median_cpu_s=16.0, peak_rss_mb=2000.0, peak_delta_mb=1000.0),
            {"variant": "trl-precomputed", "skipped": "trl not available"}]
    rows[0]["step_times_s"], rows[1]["step_times_s"] = [1.0, 3.0], [4.0, 5.0]
    text = B.format_table(rows)
    assert "ours-packed-live" in text and "trl not available" in text
    assert B.ratios(rows) == [("ours-packed-live", "trl-live", 2.0, 2.0, 4.0, 0.5, 0.5)]


@pytest.mark.slow
def test_trl_sees_the_same_model_and_pairs():
    pytest.importorskip("trl")
    args = B.parse_args(TINY)
    ours, trl = B.run_variant("ours-unpacked-live", args), B.run_variant("trl-live", args)
    assert "error" not in trl, trl
    # same initial weights and token ids: the same mean log-prob of the chosen responses at step 1
    assert trl["first_logps_chosen"] == pytest.approx(ours["first_logps_chosen"], rel=1e-4)
    assert trl["real_tokens_per_step"] == ours["real_tokens_per_step"]
    assert trl["positions_per_step"] == ours["positions_per_step"]  # both pad each sequence to the longest
