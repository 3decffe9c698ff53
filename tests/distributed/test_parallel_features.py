"""3D parallelism, sequence parallelism, activation checkpointing and the memory report, at the engine level.

Training through `run_training` (fp32, 1e-5 on losses and gradient norms, clipping active), rows padded to
max_seq_len so the sequence divides over tensor ranks. One 1-rank reference group, one 4-rank group with several runs:
- tensor=2 x pipeline=2, the same with sequence parallelism, and pipeline=2 x data=2 with ZeRO-1 equal the
  single rank (tensor=1, pipeline=1);
- with dropout 0.1, sequence parallelism on/off and activation checkpointing on/off give the same losses
  (recomputation redraws the same dropout masks), pipelined (tensor=2 x pipeline=2) and unpipelined
  (tensor=2 x data=2); recomputation really runs every block twice; dropout does change the losses.
Memory report: the ZeRO 0/1/2/3 figures shrink as each stage shards one more state over data-parallel
ranks and match a hand count of the tiny model; the pipeline, tensor, sequence-parallel and recomputation
variants of the activation formula; the trainer writes <logging.dir>/memory.json; the CLI runs.
"""
import itertools
import json
import os

import pytest
import torch

from megatron.testing.configs import TINY
from megatron.testing.distributed import run_distributed

BASE = ["data.pad_to_max_len=true", "optimizer.grad_clip=0.3"]
DROP = ["model.dropout=0.1"]
TP2PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]
TP2DP2 = ["parallel.tensor=2"]
SP = ["parallel.sequence_parallel=true"]
AC = ["parallel.activation_checkpointing=true", "parallel.checkpoint_num_layers=1"]

FOUR_RANK_RUNS = {
    "tp2pp2": TP2PP2,
    "tp2pp2_sp": TP2PP2 + SP,
    "pp2dp2_zero1": ["parallel.pipeline=2", "parallel.zero_stage=1"],
    # Packed rows of varying width: the collator rounds the width up to a multiple of the tensor size.
    "tp2dp2_sp_unpadded": TP2DP2 + SP + ["data.pad_to_max_len=false"],
    "tp2pp2_drop": TP2PP2 + DROP,
    "tp2pp2_drop_sp": TP2PP2 + DROP + SP,
    "tp2pp2_drop_ac": TP2PP2 + DROP + AC,
    "tp2pp2_drop_sp_ac": TP2PP2 + DROP + SP + AC,
    "tp2dp2_drop": TP2DP2 + DROP,
    "tp2dp2_drop_sp_ac": TP2DP2 + DROP + SP + AC,
}


def _losses(rank, world_size, root, runs):
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    out = {}
    for name, overrides in runs.items():
        cfg = tiny_test_config(f"{root}/{world_size}/{name}", "sft", world_size,
                               BASE + [f"data.cache_dir={root}/cache"] + overrides, iters=3)
        # Count transformer-block forward calls: recomputation calls each block twice per micro-batch (a pre-hook:
        # torch's recomputation stops as soon as it has the saved tensors, before the block's forward returns).
        calls = [0]

        def count(module, _inputs):
            calls[0] += type(module).__name__ == "BlockStage"

        handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
        try:
            rows = [r for r in run_training(cfg).history if "loss" in r]
        finally:
            handle.remove()
        out[name + ":block_calls"] = calls[0]
        out[name] = [r["loss"] for r in rows]
        out[name + ":grad_norm"] = [r["grad_norm"] for r in rows]
        if world_size == 1:
            with open(os.path.join(cfg.logging.dir, "memory.json")) as fh:
                out["memory.json"] = json.load(fh)
    return out


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("features"))
    single = run_distributed(_losses, 1, root, {"single": []})[0]
    four = run_distributed(_losses, 4, root, FOUR_RANK_RUNS)
    assert all(r == four[0] for r in four[1:])
    return single, four[0]


@pytest.mark.parametrize("name", ["tp2pp2", "tp2pp2_sp", "pp2dp2_zero1", "tp2dp2_sp_unpadded"])
def test_3d_layouts_match_single_rank(losses, name):
    single, four = losses
    assert len(single["single"]) == 3 and single["single"][0] != single["single"][-1]
    assert four[name] == pytest.approx(single["single"], abs=1e-5, rel=0)
    grad_norm = single["single:grad_norm"]
    assert min(grad_norm) > 0.3  # clipping is active
    assert four[name + ":grad_norm"] == pytest.approx(grad_norm, abs=1e-5, rel=0)


@pytest.mark.parametrize("name,base", [("tp2pp2_drop_sp", "tp2pp2_drop"), ("tp2pp2_drop_ac", "tp2pp2_drop"),
                                       ("tp2pp2_drop_sp_ac", "tp2pp2_drop"), ("tp2dp2_drop_sp_ac", "tp2dp2_drop")])
def test_sequence_parallel_and_recomputation_keep_dropout_losses(losses, name, base):
    _, four = losses
    assert four[name] == pytest.approx(four[base], abs=1e-5, rel=0)
    assert four[name + ":grad_norm"] == pytest.approx(four[base + ":grad_norm"], abs=1e-5, rel=0)


@pytest.mark.parametrize("name,base", [("tp2pp2_drop_ac", "tp2pp2_drop"), ("tp2dp2_drop_sp_ac", "tp2dp2_drop")])
def test_recomputation_really_recomputes(losses, name, base):
    _, four = losses
    assert four[base + ":block_calls"] > 0
    assert four[name + ":block_calls"] == 2 * four[base + ":block_calls"]


def test_dropout_is_active(losses):
    single, four = losses
    assert abs(four["tp2pp2_drop"][0] - four["tp2pp2"][0]) > 1e-4
    assert abs(four["tp2dp2_drop"][0] - single["single"][0]) > 1e-4


def test_pipeline_partition_methods():
    from megatron.config import ConfigError
    from megatron.engines.pipeline_partition import blocks_per_stage, spec_parameter_counts, stage_boundaries

    def split(layers, pp, method):
        return blocks_per_stage(_cfg(pp, [f"model.num_layers={layers}", f"parallel.pipeline={pp}",
                                          f"parallel.pipeline_partition={method}"]))

    assert split(5, 2, "uniform") == [3, 2] and split(4, 2, "1,3") == [1, 3]
    assert stage_boundaries([1, 3]) == [0, 2, 7]  # embedding + 1 block | 3 blocks + final norm + head
    counts = spec_parameter_counts(_cfg(1))
    assert counts == [EMBED, BLOCK, BLOCK, H, EMBED]
    # 'parameters' minimises the largest stage (brute force over all splits), embedding and head included.
    for layers, pp, vocab in ((2, 2, 512), (8, 4, 512), (6, 3, 1024), (7, 3, 2048)):
        cfg = _cfg(pp, [f"model.num_layers={layers}", f"parallel.pipeline={pp}", f"model.vocab_size={vocab}"])
        w = spec_parameter_counts(cfg)

        def heaviest(bps):
            parts = stage_boundaries(list(bps))
            return max(sum(w[parts[i]:parts[i + 1]]) for i in range(pp))

        splits = [c for c in itertools.product(range(1, layers + 1), repeat=pp) if sum(c) == layers]
        assert heaviest(blocks_per_stage(cfg)) == min(heaviest(c) for c in splits), (layers, pp, vocab)
    for bad in ("1,2", "0,4", "2,x", "type:BlockStage"):
        with pytest.raises(ConfigError, match="pipeline_partition"):
            split(4, 2, bad)


# ----------------------------------------------------------------------------------------- memory report
H, L, V, S, B = 64, 2, 512, 64, 2  # the tiny test model: hidden, layers, padded vocab, tokens, rows
EMBED = V * H
BLOCK = H + (4 + 2 * 2) * 16 * H + H * H + H + 2 * 172 * H + H * 172  # norm, qkv (GQA 4/2 heads), dense, norm, fc1, fc2
PARAMS = 2 * EMBED + L * BLOCK + H  # embedding, blocks, final norm, untied head


def _cfg(world_size, overrides=()):
    from megatron.testing.configs import tiny_test_config
    return tiny_test_config("/tmp/unused", "sft", world_size, ["train.global_batch_size=8"] + list(overrides))


def test_memory_zero_stages_shrink_as_computed_by_hand():
    from megatron.training.memory_report import memory_report

    dp = 4
    want = {0: (4 * PARAMS, 4 * PARAMS, 8 * PARAMS), 1: (4 * PARAMS, 4 * PARAMS, 8 * PARAMS / dp),
            2: (4 * PARAMS, 4 * PARAMS / dp, 8 * PARAMS / dp), 3: (4 * PARAMS / dp, 4 * PARAMS / dp, 8 * PARAMS / dp)}
    totals = []
    for zero, (p, g, o) in want.items():
        rep = memory_report(_cfg(dp, [f"parallel.zero_stage={zero}"]))
        assert rep["model"]["total_parameters"] == PARAMS
        assert len(rep["ranks"]) == dp and all(r["stage"] == 0 for r in rep["ranks"])
        st = rep["stages"][0]
        assert (st["parameters"], st["param_bytes"], st["grad_bytes"], st["optimizer_bytes"]) == (PARAMS, p, g, o)
        totals.append(st["param_bytes"] + st["grad_bytes"] + st["optimizer_bytes"])
    assert totals[0] > totals[1] > totals[2] > totals[3]
    assert totals[0] == 16 * PARAMS and totals[3] == 16 * PARAMS / dp


def test_memory_activations_follow_korthikanti():
    from megatron.training import memory_formulas as mf
    from megatron.training.memory_report import memory_report

    layer_fp32 = S * B * H * (34 + 5 * 4 * S / H) * 2  # sbh(34 + 5as/h) 16-bit bytes, doubled for fp32
    rep = memory_report(_cfg(2, ["parallel.pipeline=2"]))
    s0, s1 = rep["stages"]
    assert (s0["parameters"], s1["parameters"]) == (EMBED + BLOCK, BLOCK + H + EMBED)
    assert s0["activation_bytes_per_micro_batch"] == layer_fp32
    assert s1["activation_bytes_per_micro_batch"] == layer_fp32 + 4 * S * B * V  # + fp32 logits
    assert (s0["micro_batches_in_flight"], s1["micro_batches_in_flight"]) == (2, 1)  # 1F1B, grad_accum 4
    assert s0["activation_bytes"] == 2 * layer_fp32
    # Tensor parallel, + sequence parallel, full recomputation (Korthikanti et al. 2022, eqs. 2-3).
    t, a, h, s, b = 4, 32, 4096, 2048, 1
    assert mf.layer_activation_bytes(s, b, h, a, t, False) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert mf.layer_activation_bytes(s, b, h, a, t, True) == s * b * h * (34 + 5 * a * s / h) / t
    assert mf.layer_activation_bytes(s, b, h, a, 1, False, attention_scores=False) == s * b * h * 34
    full = mf.layer_activation_bytes(s, b, h, a, t, True)
    assert mf.stage_activation_bytes(8, s, b, h, a, t, True, checkpoint_layers=1) == 8 * 2 * s * b * h / t + full
    assert mf.stage_activation_bytes(8, s, b, h, a, t, True, checkpoint_layers=2) == 4 * 2 * s * b * h / t + 2 * full


def test_trainer_writes_memory_report(losses):
    from megatron.training.memory_report import memory_report

    single, _ = losses
    written = dict(single["memory.json"])
    measured = written.pop("measured")  # added at the end of the run: each rank's measured peak beside its estimate
    assert [r["rank"] for r in measured["ranks"]] == [0] and measured["kind"] == "cpu_peak_rss"
    assert measured["ranks"][0]["peak_bytes"] > measured["ranks"][0]["start_bytes"] > 0
    assert measured["ranks"][0]["estimate_bytes"] == written["ranks"][0]["total_bytes"]
    assert written["stages"][0]["param_bytes"] == 4 * PARAMS
    from megatron.testing.configs import tiny_test_config
    assert written == json.loads(json.dumps(memory_report(tiny_test_config("/tmp/unused", "sft", 1, BASE))))


def test_memory_report_cli(tmp_path, capsys):
    from megatron.training.memory_report import main

    out = tmp_path / "mem.json"
    assert main([os.path.join(TINY, "sft.yml"), "--world-size", "8", "--set", "parallel.tensor=2",
                 "--set", "parallel.pipeline=2", "--set", "parallel.zero_stage=1",
                 "--set", "train.global_batch_size=32", "--json", str(out)]) == 0
    assert "pipeline 2 x data 2" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert len(rep["ranks"]) == 8 and [s["blocks"] for s in rep["stages"]] == [1, 1]
    assert main([os.path.join(TINY, "sft.yml"), "--world-size", "8", "--set", "parallel.pipeline=2",
                 "--set", "parallel.pipeline_partition=3,1"]) == 2  # 3 + 1 blocks != num_layers 2
