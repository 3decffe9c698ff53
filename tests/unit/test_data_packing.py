"""Packing and collation: the batch contract, examples never split, padding packed vs unpacked."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from megatron.data import (Example, ExampleDataset, SequenceData, batch_padding_fraction,
                           best_fit_decreasing, collate, kl_partners, load_tokenizer, padding_fraction)
from megatron.data.packing import balanced_bins
from tests.unit.test_data_common import TINY, TOKENIZER, run_preprocess, settings_for

KINDS = {"sft": 1, "pairwise": 2, "unpaired": 2}


def make_examples(kind, n, rng, lo=3, hi=40, with_ref=False):
    out, ds_index = [], 0
    for e in range(n):
        seqs = []
        for _ in range(KINDS[kind]):
            length = rng.randint(lo, hi)
            ids = np.array([rng.randint(3, 400) for _ in range(length)], dtype=np.int64)
            seqs.append(SequenceData(ids, rng.randint(0, length - 1), ds_index,
                                     ref_logp=-float(ds_index) if with_ref else None))
            ds_index += 1
        out.append(Example(e, kind, seqs, label=float(e % 2) if kind == "unpaired" else math.nan,
                           margin=0.25 * e if kind == "pairwise" else math.nan))
    return out


def check_contract(batch, examples, pack, max_seq_len):
    """Independent re-derivation of every contract field from the examples."""
    seqs = [s for ex in examples for s in ex.sequences]
    B, S = batch["input_ids"].shape
    assert S <= max_seq_len
    for key in ("input_ids", "labels", "position_ids", "segment_ids", "seq_id"):
        assert batch[key].dtype == torch.long and batch[key].shape == (B, S)
    assert batch["loss_mask"].dtype == torch.float32 and batch["seq_last_pos"].shape == (len(seqs),)
    ids, seg, sid = batch["input_ids"], batch["segment_ids"], batch["seq_id"]
    row_of = {}
    for k, s in enumerate(seqs):
        where = (sid == k).nonzero()
        rows = set(where[:, 0].tolist())
        assert len(rows) == 1  # a sequence is contiguous in one row
        b = rows.pop()
        cols = where[:, 1]
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + len(s.ids)))
        t0, n, p = int(cols[0]), len(s.ids), s.prompt_len
        assert ids[b, t0:t0 + n].tolist() == s.ids.tolist()
        assert batch["position_ids"][b, t0:t0 + n].tolist() == list(range(n))  # restart at 0
        assert batch["labels"][b, t0:t0 + n].tolist() == s.ids[1:].tolist() + [0]
        mask = [1.0 if (j + 1 >= p and j + 1 < n) else 0.0 for j in range(n)]
        assert batch["loss_mask"][b, t0:t0 + n].tolist() == mask
        assert int(batch["seq_last_pos"][k]) == b * S + t0 + n - 1
        assert len(set(seg[b, t0:t0 + n].tolist())) == 1
        row_of[k] = b
    # padding: zeros everywhere outside sequences
    pad = sid == -1
    assert (ids[pad] == 0).all() and (seg[pad] == 0).all() and (batch["loss_mask"][pad] == 0).all()
    assert (batch["labels"][pad] == 0).all() and (batch["position_ids"][pad] == 0).all()
    for b in range(B):  # segment ids 1..k in order, then padding
        used = seg[b][seg[b] > 0].tolist()
        assert used == sorted(used) and sorted(set(used)) == list(range(1, len(set(used)) + 1))
        assert not (seg[b, :len(used)] == 0).any()
    k = 0
    for ex in examples:  # an example is never split across rows
        assert len({row_of[k + i] for i in range(len(ex.sequences))}) == (1 if pack else len(ex.sequences))
        k += len(ex.sequences)
    if not pack:
        assert B == len(seqs) and all(row_of[k] == k for k in range(len(seqs)))
    assert batch["dataset_seq_index"].tolist() == [s.dataset_index for s in seqs]
    return row_of


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("pack", [False, True])
def test_collate_contract(kind, pack):
    rng = random.Random(sorted(KINDS).index(kind) * 2 + int(pack))
    for trial in range(5):
        examples = make_examples(kind, rng.randint(1, 7), rng, with_ref=trial % 2 == 0)
        batch = collate(examples, pack=pack, max_seq_len=96)
        row_of = check_contract(batch, examples, pack, 96)
        n = len(examples)
        if kind == "pairwise":
            assert batch["chosen_idx"].tolist() == [2 * p for p in range(n)]
            assert batch["rejected_idx"].tolist() == [2 * p + 1 for p in range(n)]
            assert batch["margin"].tolist() == [0.25 * p for p in range(n)]
            if pack:
                assert all(row_of[2 * p] == row_of[2 * p + 1] for p in range(n))
        if kind == "unpaired":
            assert batch["target_idx"].tolist() == [2 * e for e in range(n)]
            assert batch["kl_idx"].tolist() == [2 * e + 1 for e in range(n)]
            assert batch["kto_label"].tolist() == [float(e % 2) for e in range(n)]
        if trial % 2 == 0:
            assert batch["ref_logps"].tolist() == [-float(i) for i in range(len(batch["seq_last_pos"]))]
        else:
            assert "ref_logps" not in batch


def test_packed_rows_are_full_and_fewer():
    rng = random.Random(3)
    examples = make_examples("sft", 16, rng, lo=5, hi=60)
    packed, unpacked = collate(examples, True, 128), collate(examples, False, 128)
    total = sum(ex.num_tokens for ex in examples)
    assert packed["input_ids"].shape[0] == len(best_fit_decreasing([ex.num_tokens for ex in examples], 128))
    assert packed["input_ids"].shape[0] >= math.ceil(total / 128)
    assert batch_padding_fraction(packed) < batch_padding_fraction(unpacked)
    fixed = collate(examples, True, 128, pad_to_max_len=True)
    assert fixed["input_ids"].shape[1] == 128


def test_padding_fraction_lower_packed_on_varied_lengths():
    rng = random.Random(0)
    lengths = [[rng.randint(4, 120)] for _ in range(256)]
    unpacked = padding_fraction(lengths, 8, 256, pack=False)
    packed = padding_fraction(lengths, 8, 256, pack=True)
    assert 0 <= packed < unpacked < 1
    # the function agrees with the collator's batches
    examples = make_examples("sft", 8, random.Random(1), lo=4, hi=120)
    lens = [[len(s.ids) for s in ex.sequences] for ex in examples]
    for pack in (False, True):
        assert padding_fraction(lens, 8, 256, pack) == pytest.approx(batch_padding_fraction(collate(examples, pack, 256)))


def test_best_fit_decreasing_properties():
    rng = random.Random(5)
    for _ in range(50):
        lengths = [rng.randint(1, 100) for _ in range(rng.randint(1, 30))]
        for fn in (best_fit_decreasing, balanced_bins):
            bins = fn(lengths, 100)
            assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
            assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
        assert len(balanced_bins(lengths, 100)) == len(best_fit_decreasing(lengths, 100))
        assert max(sum(lengths[i] for i in b) for b in balanced_bins(lengths, 100)) <= \
            max(sum(lengths[i] for i in b) for b in best_fit_decreasing(lengths, 100))
    assert best_fit_decreasing([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError):
        best_fit_decreasing([101], 100)


def test_example_longer_than_row_is_refused():
    ex = make_examples("pairwise", 1, random.Random(0), lo=40, hi=40)
    with pytest.raises(ValueError, match="max_seq_len"):
        collate(ex, True, 64)


def test_kto_kl_sequences(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    _, indexed = run_preprocess(f"{TINY}/unpaired_valid.jsonl", tmp_path / "u", tok, settings_for(tmp_path))
    ds = ExampleDataset(indexed, 128, kl_seed=7)
    n = len(ds)
    partner = kl_partners(n, 7)
    assert (partner != np.arange(n)).all() and sorted(partner.tolist()) == list(range(n))
    assert not np.array_equal(partner, kl_partners(n, 8)) and np.array_equal(partner, kl_partners(n, 7))
    for e in (0, 5, n - 1):
        ex = ds[e]
        target, kl = ex.sequences
        other_ids, other_plen = indexed.sequence(int(partner[e]))
        assert kl.ids.tolist() == target.ids[:target.prompt_len].tolist() + other_ids[other_plen:].tolist()
        assert kl.prompt_len == target.prompt_len and kl.dataset_index == n + e and target.dataset_index == e
        assert ex.label == indexed.label(e)
    batch = collate([ds[0]], pack=True, max_seq_len=128)  # batch size 1 has its KL term
    assert batch["input_ids"].shape[0] == 1 and batch["kl_idx"].tolist() == [1]
    assert kl_partners(1, 0).tolist() == [0]
