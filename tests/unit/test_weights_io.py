"""weights_io: TP/PP split and merge against the model's own sharding, disk round trips, clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron.config import load_config
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.checkpoint import weights_io as wio


def _cfg(tp=1, pp=1, **model):
    base = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=200,
                ffn_hidden_size=128, max_seq_len=32)
    base.update(model)
    sets = [f"model.{k}={v}" for k, v in base.items()]
    sets += [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", "train.micro_batch_size=1",
             "train.global_batch_size=1"]
    if base.get("value_head"):
        sets.append("objective.name=rm")
    return load_config([], sets, world_size=tp * pp)


def _tp_state(tp_rank: int, tp: int) -> ParallelState:
    """The state of tensor rank `tp_rank` of `tp` (no groups: enough to build the model and read its shards)."""
    return ParallelState(rank=tp_rank, world_size=tp, tp_rank=tp_rank, tp_ranks=list(range(tp)), tp_group=None,
                         pp_rank=0, pp_ranks=[tp_rank], pp_group=None, dp_rank=0, dp_ranks=[tp_rank], dp_group=None,
                         mp_rank=tp_rank, mp_ranks=list(range(tp)), mp_group=None)


def _model_state(cfg, tp_rank: int, tp: int) -> dict:
    torch.manual_seed(7)  # initialisation is TP-invariant: the same model at every tensor size
    return {k: v.detach().clone() for k, v in GPTModel(cfg, _tp_state(tp_rank, tp)).state_dict().items()}


VARIANTS = {
    "llama_gqa": dict(),
    "neox": dict(norm="layernorm", activation="gelu", qkv_bias=True, linear_bias=True, num_kv_heads=4,
                 ffn_hidden_size=256, rotary_pct=0.25, parallel_residual=True),
    "qwen_tied": dict(qkv_bias=True, tie_embeddings=True),
    "reward": dict(value_head=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_split_and_merge_match_model_shards(name):
    full = _model_state(_cfg(1, **VARIANTS[name]), 0, 1)
    cfg2 = _cfg(2, **VARIANTS[name])
    ranks = [_model_state(cfg2, r, 2) for r in range(2)]
    assert set(full) == set(wio.canonical_shapes(cfg2, 1))
    for r, sd in enumerate(ranks):
        wio.check_keys_and_shapes(sd, cfg2, 2, f"rank {r}")
    split = wio.split_tp(full, cfg2, 2)
    for r in range(2):
        for k in full:
            assert torch.equal(split[r][k], ranks[r][k]), (name, r, k)
    merged = wio.merge_tp_shards(ranks, cfg2)
    assert set(merged) == set(full)
    for k in full:
        assert torch.equal(merged[k], full[k]), (name, k)


def test_qkv_and_fc1_rank_layout_explicit():
    cfg = _cfg(2)  # 4 q heads, 2 kv heads, head_dim 16, ffn 128
    hd = 16
    # rows labelled by (kind, head): q heads 0..3, k heads 0..1, v heads 0..1
    full_qkv = torch.cat([torch.full((hd, 64), float(10 + h)) for h in range(4)]
                         + [torch.full((hd, 64), float(20 + h)) for h in range(2)]
                         + [torch.full((hd, 64), float(30 + h)) for h in range(2)])
    fc1 = torch.cat([torch.full((128, 64), 1.0), torch.full((128, 64), 2.0)])
    fc1[:64] += 0.5  # first half of gate belongs to rank 0
    fc1[128:192] += 0.5
    full = {"blocks.0.attention.qkv.weight": full_qkv, "blocks.0.mlp.fc1.weight": fc1}
    r0, r1 = wio.split_tp(full, cfg, 2)
    assert r0["blocks.0.attention.qkv.weight"][::hd, 0].tolist() == [10, 11, 20, 30]
    assert r1["blocks.0.attention.qkv.weight"][::hd, 0].tolist() == [12, 13, 21, 31]
    assert r0["blocks.0.mlp.fc1.weight"][::64, 0].tolist() == [1.5, 2.5]
    assert r1["blocks.0.mlp.fc1.weight"][::64, 0].tolist() == [1.0, 2.0]


def test_vocab_repadding_between_tensor_sizes():
    cfg = _cfg(1, vocab_size=300)
    full = _model_state(cfg, 0, 1)
    assert full["embedding.word_embeddings.weight"].shape[0] == 384
    shards = wio.split_tp(full, _cfg(2, vocab_size=300), 2)
    assert shards[0]["embedding.word_embeddings.weight"].shape[0] == 256  # 512 / 2
    assert torch.equal(shards[1]["lm_head.weight"][384 - 256:], torch.zeros(128, 64))  # new padding rows
    back = wio.merge_tp_shards(shards, cfg)
    for k in full:
        assert torch.equal(back[k], full[k]), k


def test_gqa_tensor_larger_than_kv_heads_is_rejected():
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        wio.split_tp(_model_state(_cfg(1), 0, 1), _cfg(1), 4)


def test_pipeline_split_tied_and_merge():
    assert wio.default_blocks_per_stage(5, 2) == [3, 2]
    assert wio.default_blocks_per_stage(7, 3) == [3, 2, 2]
    bps = [2, 1]
    assert wio.stage_of_key("embedding.word_embeddings.weight", bps) == 0
    assert wio.stage_of_key("blocks.1.mlp.fc2.weight", bps) == 0
    assert wio.stage_of_key("blocks.2.input_norm.weight", bps) == 1
    assert wio.stage_of_key("final_norm.weight", bps) == 1
    assert wio.stage_of_key("lm_head.weight", bps) == 1
    cfg = _cfg(1, num_layers=3, tie_embeddings=True)
    full = _model_state(cfg, 0, 1)
    stages = wio.split_pp(full, bps)
    assert "embedding.word_embeddings.weight" in stages[0] and "embedding.word_embeddings.weight" in stages[1]
    assert "blocks.2.attention.qkv.weight" in stages[1] and "blocks.2.attention.qkv.weight" not in stages[0]
    merged = wio.merge_pp(stages)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)
    stages[1]["embedding.word_embeddings.weight"] = stages[1]["embedding.word_embeddings.weight"] + 1
    with pytest.raises(wio.CheckpointError, match="embedding.word_embeddings.weight"):
        wio.merge_pp(stages)
    untied = wio.split_pp(_model_state(_cfg(1, num_layers=3), 0, 1), bps)
    assert "embedding.word_embeddings.weight" not in untied[1]


def _write(tmp_path, tp, pp, bps=None, **model):
    cfg = _cfg(tp, pp, num_layers=3, **model)
    full = _model_state(_cfg(1, num_layers=3, **model), 0, 1)
    shards = wio.reshard(full, cfg, tp, pp, bps)
    meta = {"step": 5, "consumed_samples": 40}
    if bps:
        meta["blocks_per_stage"] = bps
    wio.write_checkpoint(str(tmp_path / "ck"), "step5", cfg, shards, meta)
    return full, cfg


@pytest.mark.parametrize("tp,pp,bps", [(1, 1, None), (2, 2, [1, 2]), (2, 3, None)])
def test_write_read_round_trip(tmp_path, tp, pp, bps):
    full, cfg = _write(tmp_path, tp, pp, bps, tie_embeddings=True)
    ck = tmp_path / "ck"
    assert (ck / "latest").read_text().strip() == "step5"
    files = sorted(os.listdir(ck / "step5" / "weights"))
    assert files == [f"tp{t:02d}_pp{p:02d}.safetensors" for t in range(tp) for p in range(pp)]
    meta = json.loads((ck / "step5" / "meta.json").read_text())
    assert meta["format"] == 1 and meta["tensor"] == tp and meta["pipeline"] == pp and meta["step"] == 5
    assert meta["blocks_per_stage"] == (bps or wio.default_blocks_per_stage(3, pp))
    for path in (str(ck), str(ck / "step5")):
        back, meta2, cfg2 = wio.read_weights(path)
        assert meta2 == meta and cfg2.parallel.tensor == tp
        assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)


def test_read_infers_pipeline_split_when_meta_lacks_it(tmp_path):
    full, _ = _write(tmp_path, 1, 2, [1, 2])
    path = tmp_path / "ck" / "step5" / "meta.json"
    meta = json.loads(path.read_text())
    del meta["blocks_per_stage"]  # as a training engine that does not record it
    path.write_text(json.dumps(meta))
    back, _, _ = wio.read_weights(str(tmp_path / "ck"))
    assert all(torch.equal(back[k], full[k]) for k in full)


def test_write_weights_stores_fp32(tmp_path):
    cfg = _cfg(1)
    full = {k: v.bfloat16() for k, v in _model_state(cfg, 0, 1).items()}
    wio.write_weights(str(tmp_path), {(0, 0): full}, {"step": 1})
    sd = wio.load_shard(str(tmp_path / "weights" / "tp00_pp00.safetensors"))
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_error_missing_shard_names_path(tmp_path):
    _write(tmp_path, 2, 1)
    path = tmp_path / "ck" / "step5" / "weights" / "tp01_pp00.safetensors"
    path.unlink()
    with pytest.raises(wio.CheckpointError, match="missing file: .*tp01_pp00.safetensors"):
        wio.read_weights(str(tmp_path / "ck"))


def test_error_missing_config(tmp_path):
    _write(tmp_path, 1, 1)
    (tmp_path / "ck" / "step5" / "config.yaml").unlink()
    with pytest.raises(wio.CheckpointError, match="missing file: .*config.yaml"):
        wio.read_weights(str(tmp_path / "ck"))


@pytest.mark.parametrize("content", [b"", b"step99\n", b"\x00\xff\xfe garbage"])
def test_error_corrupt_latest_lists_tags(tmp_path, content):
    _write(tmp_path, 1, 1)
    (tmp_path / "ck" / "latest").write_bytes(content)
    with pytest.raises(wio.CheckpointError) as err:
        wio.read_weights(str(tmp_path / "ck"))
    msg = str(err.value)
    assert "latest" in msg and "step5" in msg and repr(content[:80]) in msg


def test_error_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(wio.CheckpointError, match="not a checkpoint"):
        wio.read_weights(str(tmp_path / "empty"))
    with pytest.raises(wio.CheckpointError, match="does not exist"):
        wio.read_weights(str(tmp_path / "nowhere"))


def test_error_shape_mismatch_names_tensor_and_shapes(tmp_path):
    _write(tmp_path, 2, 1)
    path = str(tmp_path / "ck" / "step5" / "weights" / "tp00_pp00.safetensors")
    sd = wio.load_shard(path)
    sd["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 32)
    wio.write_shard(path, sd)
    with pytest.raises(wio.CheckpointError, match=r"blocks\.1\.mlp\.fc2\.weight.*\(64, 32\).*\(64, 64\)"):
        wio.read_weights(str(tmp_path / "ck"))


def test_error_unexpected_key(tmp_path):
    _write(tmp_path, 1, 1)
    path = str(tmp_path / "ck" / "step5" / "weights" / "tp00_pp00.safetensors")
    sd = wio.load_shard(path)
    sd["blocks.0.bogus"] = torch.zeros(1)
    wio.write_shard(path, sd)
    with pytest.raises(wio.CheckpointError, match="unexpected keys.*blocks.0.bogus"):
        wio.read_weights(str(tmp_path / "ck"))


# ------------------------------------------------------------------------ slice-by-slice reads (issue 11)
from megatron.checkpoint.sharded_read import CheckpointSource  # noqa: E402
from megatron.checkpoint.tensor_files import SafetensorsWriter, TensorFile  # noqa: E402
from megatron.config.derive import pad_vocab  # noqa: E402

SLICE_VARIANTS = {  # vocab 300: padded 384 at tensor 1, 512 at tensors 2 and 4; 8 query / 4 key-value heads
    "llama_gqa": dict(vocab_size=300, num_layers=4, num_attention_heads=8, num_kv_heads=4),
    "neox": dict(VARIANTS["neox"], vocab_size=300, num_layers=4, num_attention_heads=8, num_kv_heads=8),
    "qwen_tied": dict(VARIANTS["qwen_tied"], vocab_size=300, num_layers=4, num_attention_heads=8, num_kv_heads=4),
    "reward": dict(VARIANTS["reward"], vocab_size=300, num_layers=4, num_attention_heads=8, num_kv_heads=4),
}


@pytest.mark.parametrize("name", sorted(SLICE_VARIANTS))
@pytest.mark.parametrize("saved", [(1, 1), (2, 2), (4, 3)])
def test_shard_read_equals_split_of_full(tmp_path, name, saved):
    """Every rank's shard read slice by slice from a checkpoint of any layout equals split_tp of the full model."""
    model = SLICE_VARIANTS[name]
    full = _model_state(_cfg(1, **model), 0, 1)
    cfg_s = _cfg(saved[0], saved[1], **model)
    wio.write_checkpoint(str(tmp_path), "t", cfg_s, wio.reshard(full, cfg_s, *saved), {})
    with CheckpointSource(str(tmp_path)) as src:
        for tp in (1, 2, 4):
            cfg_t = _cfg(tp, **model)
            want = wio.split_tp(full, cfg_t, tp)
            for r in range(tp):
                for key in full:
                    got = src.read_shard(key, cfg_t, tp, r)
                    assert torch.equal(got, want[r][key]), (name, saved, tp, r, key)
                    into = torch.full_like(want[r][key], float("nan"))  # straight into a parameter's memory
                    src.read_shard_into(key, cfg_t, tp, r, into)
                    assert torch.equal(into, want[r][key]), (name, saved, tp, r, key)


def _nbytes(shape) -> int:
    n = 4
    for d in shape:
        n *= d
    return n


def _stage_keys(cfg, tp, pp, p):
    bps = wio.default_blocks_per_stage(cfg.model.num_layers, pp)
    return [k for k in wio.canonical_shapes(cfg, tp) if p in wio.stages_of_key(k, bps, False)]


def test_tp2_pp2_checkpoint_read_on_tensor_1_and_reverse_touches_only_needed_bytes(tmp_path):
    """Loading a tensor 2 x pipeline 2 checkpoint at tensor 1 reads each byte of the model once; a stage of
    tensor 1 x pipeline 2 opens only its stage's files; a rank of tensor 2 x pipeline 2 loading a tensor 1
    checkpoint reads exactly its own quarter (vocabulary padding rows past the saved ones are not read)."""
    model = dict(vocab_size=300, num_layers=4)
    cfg1, cfg2 = _cfg(1, **model), _cfg(2, 2, **model)
    full = _model_state(cfg1, 0, 1)
    model_bytes = sum(_nbytes(s) for s in wio.canonical_shapes(cfg1, 1).values())
    wio.write_checkpoint(str(tmp_path / "tp2pp2"), "t", cfg2, wio.reshard(full, cfg2, 2, 2), {})
    wio.write_checkpoint(str(tmp_path / "tp1"), "t", cfg1, wio.reshard(full, cfg1, 1, 1), {})

    with CheckpointSource(str(tmp_path / "tp2pp2")) as src:  # tensor 1, pipeline 1: the whole model, once
        got = {k: src.read_shard(k, cfg1, 1, 0) for k in full}
        assert all(torch.equal(got[k], full[k]) for k in full)
        assert src.bytes_read == model_bytes and src.files_opened() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with CheckpointSource(str(tmp_path / "tp2pp2")) as src:  # tensor 1 x pipeline 2, stage 1: its files only
        keys = _stage_keys(cfg1, 1, 2, 1)
        for k in keys:
            assert torch.equal(src.read_shard(k, cfg1, 1, 0), full[k])
        assert src.files_opened() == [(0, 1), (1, 1)]
        assert src.bytes_read == sum(_nbytes(wio.canonical_shapes(cfg1, 1)[k]) for k in keys)

    h, vt = 64, pad_vocab(300, 2) // 2  # 256 vocabulary rows per rank at tensor 2; the tensor-1 file has 384
    for t, p in [(0, 0), (1, 0), (0, 1), (1, 1)]:  # the reverse: each rank of tensor 2 x pipeline 2
        keys = _stage_keys(cfg2, 2, 2, p)
        shapes = wio.canonical_shapes(cfg2, 2)
        with CheckpointSource(str(tmp_path / "tp1")) as src:
            want = wio.split_tp(full, cfg2, 2)[t]
            for k in keys:
                assert torch.equal(src.read_shard(k, cfg2, 2, t), want[k])
            zero_rows = max(0, (t + 1) * vt - max(t * vt, pad_vocab(300, 1)))
            vocab_keys = [k for k in keys if k in wio.VOCAB_KEYS]
            expected = sum(_nbytes(shapes[k]) for k in keys) - len(vocab_keys) * zero_rows * h * 4
            assert src.bytes_read == expected, (t, p)
            assert 0.2 < expected / model_bytes < 0.3  # about a quarter of the model


def test_legacy_pt_shards_still_read(tmp_path):
    cfg = _cfg(2, **dict(vocab_size=300))
    full = _model_state(_cfg(1, vocab_size=300), 0, 1)
    tag = tmp_path / "ck" / "old"
    wio.write_checkpoint(str(tmp_path / "ck"), "old", cfg, wio.reshard(full, cfg, 2, 1), {})
    for t in range(2):  # rewrite as the torch .pt files checkpoints held before safetensors
        path = tag / "weights" / f"tp{t:02d}_pp00.safetensors"
        torch.save(wio.load_shard(str(path)), str(path)[:-len(".safetensors")] + ".pt")
        path.unlink()
    back, _, _ = wio.read_weights(str(tmp_path / "ck"))
    assert all(torch.equal(back[k], full[k]) for k in full)
    with CheckpointSource(str(tag)) as src:
        want = wio.split_tp(full, _cfg(1, vocab_size=300), 1)[0]
        for key in ("blocks.1.mlp.fc2.weight", "embedding.word_embeddings.weight"):
            assert torch.equal(src.read_shard(key, _cfg(1, vocab_size=300), 1, 0), want[key])
            into = torch.empty_like(want[key])
            src.read_shard_into(key, _cfg(1, vocab_size=300), 1, 0, into)
            assert torch.equal(into, want[key])


def test_tensor_files_match_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = {"w": torch.randn(6, 10), "b16": torch.randn(5, 3).bfloat16(), "i": torch.arange(4), "s": torch.tensor(2.5)}
    save_file(sd, str(tmp_path / "lib.safetensors"))
    with TensorFile(str(tmp_path / "lib.safetensors")) as f:
        assert all(torch.equal(f.read(k), v) for k, v in sd.items())
        assert torch.equal(f.read("w", 1, 3, 7), sd["w"][:, 3:7]) and torch.equal(f.read("b16", 0, 1, 4), sd["b16"][1:4])
        before = f.bytes_read
        f.read("w", 1, 2, 5)
        assert f.bytes_read - before == 6 * 3 * 4  # the wanted columns only
    specs = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    with SafetensorsWriter(str(tmp_path / "ours.safetensors"), reversed(specs), {"format": "pt"}) as w:
        for k, v in sd.items():  # any order
            w.write(k, v)
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    w = SafetensorsWriter(str(tmp_path / "short.safetensors"), specs)
    w.write("w", sd["w"])
    with pytest.raises(RuntimeError, match="never written.*b16"):
        w.close()
    with pytest.raises(ValueError, match="header says"):
        SafetensorsWriter(str(tmp_path / "x.safetensors"), specs).write("w", torch.zeros(2))


def test_truncated_safetensors_shard_is_a_clear_error(tmp_path):
    cfg = _cfg(1)
    wio.write_checkpoint(str(tmp_path), "t", cfg, {(0, 0): _model_state(cfg, 0, 1)}, {})
    path = tmp_path / "t" / "weights" / "tp00_pp00.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(wio.CheckpointError, match=r"tp00_pp00\.safetensors.*truncated"):
        wio.read_weights(str(tmp_path))


# ------------------------------------------------------------------------------ deferred initialisation
def test_deferred_build_loads_the_same_model_and_seeds_a_fresh_value_head(tmp_path):
    """build_policy with weights builds on the meta device (no init), then equals the model it loaded; a value
    head the checkpoint lacks gets exactly GPTModel's seeded initialisation."""
    from megatron.engines.build import build_policy

    sft = _cfg(1)
    torch.manual_seed(3)
    trained = GPTModel(sft, ParallelState.single())
    wio.write_checkpoint(str(tmp_path), "t", sft, {(0, 0): trained.state_dict()}, {})
    loaded = build_policy(sft, ParallelState.single(), str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))

    rm = _cfg(1, value_head=True)
    torch.manual_seed(rm.train.seed)
    seeded = GPTModel(rm, ParallelState.single(), layer_seed=rm.train.seed)  # what a fresh RM starts from
    model = build_policy(rm, ParallelState.single(), str(tmp_path))
    assert torch.equal(model.value_head.weight, seeded.value_head.weight)
    assert torch.equal(model.value_head.bias, seeded.value_head.bias)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, trained.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("case", ["llama_gqa", "gpt_neox", "llama3_rope_tied"])
def test_hf_safetensors_read_slice_by_slice(tmp_path, case):
    """interop's HFSource serves a tensor rank its shard straight from the HF safetensors file (the streaming
    importer's source; `load_from_source` loads a model from it directly): equal to converting the whole state
    dict (`hf_to_canonical`) and splitting it, and a rank reads only its rows/columns."""
    import copy

    from megatron.checkpoint.module_io import load_from_source
    from megatron.interop.convert import _resolve, hf_to_megatron
    from megatron.interop.hf_config import architecture_of
    from megatron.interop.hf_files import load_hf_state_dict
    from megatron.interop.hf_mapping import hf_to_canonical
    from megatron.interop.hf_stream import HFSource
    from tests.integration.test_hf_logits import make_hf

    hf_dir = str(tmp_path / "hf")
    make_hf(case, hf_dir, seed=2)
    cfg1 = wio.read_config(hf_to_megatron(hf_dir, str(tmp_path / "ck")))
    family, _ = architecture_of(json.load(open(os.path.join(hf_dir, "config.json"))))
    cfg2 = _resolve(copy.deepcopy(cfg1), 2, 1)
    want = wio.split_tp(hf_to_canonical(load_hf_state_dict(hf_dir), cfg1, family), cfg2, 2)
    h, vt = cfg1.model.hidden_size, pad_vocab(cfg1.model.vocab_size, 2) // 2
    for r in range(2):
        with HFSource(hf_dir, cfg2, family) as src:
            shapes = wio.canonical_shapes(cfg2, 2)
            for k in want[r]:
                assert torch.equal(src.read_shard(k, cfg2, 2, r), want[r][k]), (case, r, k)
            zero_rows = max(0, (r + 1) * vt - max(r * vt, cfg1.model.vocab_size))
            vocab_keys = [k for k in want[r] if k in wio.VOCAB_KEYS]
            assert src.bytes_read == sum(_nbytes(shapes[k]) for k in want[r]) - len(vocab_keys) * zero_rows * h * 4
            model = GPTModel(cfg2, _tp_state(r, 2))
            load_from_source(model, src, cfg2, _tp_state(r, 2), where=hf_dir)
            assert all(torch.equal(v, want[r][k]) for k, v in model.state_dict().items()), (case, r)
