"""build_data_iterator end to end: cache reuse, ranks, resume, packing-independent semantics, references."""
from __future__ import annotations

import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from megatron.config import ConfigError
from megatron.data import (BadRecordError, DataError, HFTokenizer, build_data_iterator, dataset_stats, iterate_all,
                           open_dataset, reference_sequence_count, read_meta, sequence_ids_of_batch,
                           write_reference_logps)
from megatron.objectives import resolve_objective
from tests.unit.test_data_common import TINY, TOKENIZER, make_cfg

FILES = {"sft": "sft_valid.jsonl", "pairwise": "pairwise_valid.jsonl", "unpaired": "unpaired_valid.jsonl"}


class CountingTokenizer(HFTokenizer):
    """The real tokenizer, counting encode calls (to see whether anything is re-tokenised)."""

    def __init__(self, path):
        super().__init__(path)
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


@pytest.fixture(scope="module")
def tok():
    return CountingTokenizer(TOKENIZER)


def cfg_for(tmp_path, kind, *extra, mbs=2, gbs=8):
    return make_cfg(tmp_path, f"data.train_path={TINY}/{FILES[kind]}", f"train.micro_batch_size={mbs}",
                    f"train.global_batch_size={gbs}", *extra, kind=kind)


def quiet(**kw):
    return dict(progress=False, log=None, **kw)


def test_cache_is_built_once_and_reused(tok, tmp_path):
    cfg = cfg_for(tmp_path, "sft")
    tok.calls = 0
    first = build_data_iterator(cfg, 0, 1, tok, **quiet())
    assert tok.calls >= 200  # 200 records tokenised (prompt + full text each)
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 1 and not any(e.startswith(".tmp") for e in entries)
    tok.calls = 0
    start = time.perf_counter()
    second = build_data_iterator(cfg, 0, 1, tok, **quiet())
    elapsed = time.perf_counter() - start
    assert tok.calls == 0 and elapsed < 1.0  # nothing re-tokenised, near-zero start-up
    assert second.dataset.prefix == first.dataset.prefix
    assert torch.equal(next(first)["input_ids"], next(second)["input_ids"])
    # a setting that changes the tokens gives a new entry; one that does not (packing) reuses it
    build_data_iterator(cfg_for(tmp_path, "sft", "data.pack=true"), 0, 1, tok, **quiet())
    assert len(os.listdir(tmp_path / "cache")) == 1
    build_data_iterator(cfg_for(tmp_path, "sft", "data.max_prompt_len=20"), 0, 1, tok, **quiet())
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_cache_key_follows_file_content(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    shutil.copy(f"{TINY}/sft_valid.jsonl", path)
    cfg = make_cfg(tmp_path, f"data.train_path={path}")
    a = open_dataset(cfg, tok, **quiet())
    with open(path, "a") as fh:
        fh.write('{"prompt": "count up from 1:", "response": " 1 2"}\n')
    b = open_dataset(cfg, tok, **quiet())
    assert a.prefix != b.prefix and len(b) == len(a) + 1


def test_builder_and_waiting_rank(tmp_path):
    cfg = cfg_for(tmp_path, "pairwise")
    barrier = threading.Barrier(2, timeout=60)
    toks = [CountingTokenizer(TOKENIZER), CountingTokenizer(TOKENIZER)]
    out = [None, None]

    def rank(r):
        out[r] = build_data_iterator(cfg, r, 2, toks[r], is_builder=(r == 0), barrier=barrier.wait, **quiet())

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]  # the waiting rank starts first
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert toks[1].calls == 0 and toks[0].calls > 0
    assert out[0].dataset.prefix == out[1].dataset.prefix
    # the two ranks' micro-batches of a step are the two halves of the global batch
    g = out[0].sampler.global_batch(0)
    got = []
    for it in out:
        for _ in range(it.micro_batches_per_step):
            b = next(it)
            got += (b["dataset_seq_index"][b["chosen_idx"]] // 2).tolist()
    assert got == g


def test_builder_failure_reaches_every_rank(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": " b"}\n{broken\n')
    cfg = make_cfg(tmp_path, f"data.train_path={bad}")
    barrier = threading.Barrier(2, timeout=60)
    errors = [None, None]

    def rank(r):
        try:
            open_dataset(cfg, CountingTokenizer(TOKENIZER), is_builder=(r == 0), barrier=barrier.wait, **quiet())
        except Exception as exc:  # collected for the assertions below
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(errors[0], BadRecordError) and f"{bad}:2" in str(errors[0])
    # the waiting rank's error is a DataError too, so train.py prints it as one line (no traceback)
    assert isinstance(errors[1], DataError) and "builder" in str(errors[1])
    assert not any(p.startswith(".tmp") for p in os.listdir(tmp_path / "cache"))


@pytest.mark.parametrize("kind", sorted(FILES))
def test_packing_does_not_change_micro_batch_semantics(kind, tok, tmp_path):
    its = {pack: build_data_iterator(cfg_for(tmp_path, kind, f"data.pack={str(pack).lower()}", mbs=4, gbs=8),
                                     0, 1, tok, **quiet()) for pack in (False, True)}
    for _ in range(6):
        a, b = next(its[False]), next(its[True])
        assert torch.equal(a["dataset_seq_index"], b["dataset_seq_index"])
        assert a["input_ids"].shape[0] == 4 * (1 if kind == "sft" else 2) >= b["input_ids"].shape[0]
        # the same tokens, labels and loss mask per sequence
        for k in range(len(a["seq_last_pos"])):
            for key in ("input_ids", "labels", "loss_mask", "position_ids"):
                assert torch.equal(a[key][a["seq_id"] == k], b[key][b["seq_id"] == k])
        for key in ("chosen_idx", "rejected_idx", "target_idx", "kl_idx", "kto_label"):
            assert (key in a) == (key in b) and (key not in a or torch.equal(a[key], b[key]))


def test_resume_from_state_dict_gives_the_same_batches(tok, tmp_path):
    cfg = cfg_for(tmp_path, "sft", "data.pack=true", mbs=2, gbs=8)
    it = build_data_iterator(cfg, 1, 2, tok, **quiet())
    for _ in range(3 * it.micro_batches_per_step):  # 3 steps: 24 of 200 samples
        next(it)
    state = it.state_dict()
    assert state == {"consumed_samples": 24} and it.consumed_samples == 24
    expected = [next(it) for _ in range(4)]
    resumed = build_data_iterator(cfg, 1, 2, tok, consumed_samples=state["consumed_samples"], **quiet())
    for exp in expected:
        got = next(resumed)
        assert all(torch.equal(exp[k], got[k]) for k in exp)


def test_valid_split_in_order_and_iterate_all(tok, tmp_path):
    cfg = cfg_for(tmp_path, "sft", f"data.valid_path={TINY}/sft_valid.jsonl")
    it = build_data_iterator(cfg, 0, 1, tok, split="valid", **quiet())
    assert next(it)["dataset_seq_index"].tolist() == [0, 1]
    seen = torch.cat([b["dataset_seq_index"] for b in iterate_all(it.dataset, 7, True, 128)])
    assert seen.tolist() == list(range(len(it.dataset)))


def test_precomputed_reference_logps(tok, tmp_path):
    for kind in ("pairwise", "unpaired"):
        cfg = cfg_for(tmp_path, kind, "train.seed=5")
        ds = open_dataset(cfg, tok, **quiet())
        meta = read_meta(ds.prefix)
        n_ref = reference_sequence_count(meta)
        assert n_ref == (200 if kind == "pairwise" else 2 * 100)
        values = -np.arange(n_ref, dtype=np.float64) / 7.0
        with pytest.raises(ValueError, match="shape"):
            write_reference_logps(ds.prefix, values[:-1], kl_seed=5)
        write_reference_logps(ds.prefix, values, kl_seed=5)
        it = build_data_iterator(cfg, 0, 1, tok, **quiet())
        for _ in range(3):
            b = next(it)
            idx = sequence_ids_of_batch(b)
            assert torch.allclose(b["ref_logps"], torch.tensor(values[idx.numpy()], dtype=torch.float32))
        if kind == "unpaired":
            with pytest.raises(ConfigError, match="train.seed"):
                build_data_iterator(cfg_for(tmp_path, kind, "train.seed=6"), 0, 1, tok, **quiet())


def test_config_errors_name_the_key(tok, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=f"data.train_path.*{missing}"):
        build_data_iterator(make_cfg(tmp_path, f"data.train_path={missing}"), 0, 1, tok, **quiet())
    with pytest.raises(ConfigError, match="data.valid_path"):
        build_data_iterator(cfg_for(tmp_path, "sft"), 0, 1, tok, split="valid", **quiet())
    with pytest.raises(ConfigError, match="data.train_path"):
        build_data_iterator(make_cfg(tmp_path), 0, 1, tok, **quiet())
    with pytest.raises(ConfigError, match="objective 'sft' needs sft data"):
        # The objective's data kind is known once the objective has resolved the config (entry points do this).
        build_data_iterator(resolve_objective(make_cfg(tmp_path, f"data.train_path={TINY}/pairwise_valid.jsonl")),
                            0, 1, tok, **quiet())
    with pytest.raises(ConfigError, match="data.max_prompt_len"):
        build_data_iterator(cfg_for(tmp_path, "sft", "data.max_prompt_len=128"), 0, 1, tok, **quiet())
    with pytest.raises(ConfigError, match="data.kind"):
        build_data_iterator(cfg_for(tmp_path, "sft", "data.kind=pairs"), 0, 1, tok, **quiet())
    with pytest.raises(ConfigError, match="global_batch_size"):
        build_data_iterator(cfg_for(tmp_path, "sft", mbs=2, gbs=6), 0, 2, tok, **quiet())


def test_indexed_input_from_the_tool(tok, tmp_path, capsys):
    from tools.preprocess_data import main
    prefix = str(tmp_path / "idx" / "sft")
    assert main(["--input", f"{TINY}/sft_valid.jsonl", "--output-prefix", prefix, "--tokenizer", TOKENIZER,
                 "--max-seq-len", "128", "--workers", "2", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "records written    200" in report and "padding fraction" in report
    cfg = make_cfg(tmp_path, f"data.train_path={prefix}", "data.format=indexed")
    tok.calls = 0
    it = build_data_iterator(cfg, 0, 1, tok, **quiet())
    assert tok.calls == 0 and len(it.dataset) == 200 and next(it)["input_ids"].shape[0] == 4
    other = tmp_path / "tok2"  # a different tokenizer (content differs) must not read these ids
    shutil.copytree(TOKENIZER, other)
    with open(other / "tokenizer_config.json", "a") as fh:
        fh.write("\n")
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_data_iterator(cfg, 0, 1, HFTokenizer(str(other)), **quiet())
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        build_data_iterator(make_cfg(tmp_path, f"data.train_path={prefix}", max_seq_len=8), 0, 1, tok, **quiet())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": " b"}\n{"prompt": "a"}\n')
    assert main(["--input", str(bad), "--output-prefix", str(tmp_path / "b"), "--tokenizer", TOKENIZER,
                 "--no-progress"]) == 1
    assert f"{bad}:2: missing field: 'response' is absent" in capsys.readouterr().err


def test_dataset_stats_padding(tok, tmp_path):
    ds = open_dataset(cfg_for(tmp_path, "pairwise"), tok, **quiet())
    stats = dataset_stats(ds, micro_batch_size=8)
    assert stats["num_examples"] == 100 and stats["num_sequences"] == 200
    assert stats["num_tokens"] == int(np.asarray(ds.indexed.lengths).sum())
    assert 0 <= stats["padding_fraction_packed"] < stats["padding_fraction_unpacked"]
