"""Shared helpers for the TRL-format tests (no tests here): byte-level BPE tokenizers trained on the fly and
reading back which tokens the loss mask covers.

`qwen_like_tokenizer(dir)`: byte-level BPE (no prefix space, as GPT-2 / Qwen), no BOS, EOS = <|im_end|>, pad
<|endoftext|>, a Qwen-style ChatML template whose turns end "<|im_end|>\\n" (so a rendered conversation ends
with EOS + newline). `scored_text(tok, batch, seq)`: the text of the tokens the loss mask scores in sequence
`seq` of a collated micro-batch (the targets `labels[t]` where `loss_mask[t] == 1`).
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch

from megatron.data import collate, load_tokenizer

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CORPUS = [
    "Hello world, this is a small corpus for a tiny byte-level BPE tokenizer.",
    "The answer is 42. The capital of France is Paris. Count up from 7: 7 8 9 10.",
    "You are a helpful assistant. Please answer the question. Reverse the words: a b c.",
    "Question: what is the capital of France? Answer: Paris. Question: and of Spain? Answer: Madrid.",
    "system user assistant hello world wonderful words answer question",
] * 20


def qwen_like_tokenizer(directory: str):
    """Train and save (once per directory) the Qwen-like tokenizer described above; returns the megatron wrapper."""
    if not os.path.exists(os.path.join(directory, "tokenizer.json")):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       additional_special_tokens=special[1:2])
        fast.chat_template = QWEN_TEMPLATE
        fast.save_pretrained(directory)
    return load_tokenizer(directory)


def one_batch(dataset, indices: List[int], pack: bool = False) -> Dict[str, torch.Tensor]:
    """The micro-batch of dataset examples `indices` (unpacked: one sequence per row, in order)."""
    return collate([dataset[i] for i in indices], pack, dataset.max_seq_len)


def scored_ids(batch: Dict[str, torch.Tensor], seq: int) -> List[int]:
    """Token ids the loss mask scores in sequence `seq` of `batch`, in order."""
    sel = (batch["seq_id"] == seq) & (batch["loss_mask"] > 0)
    return batch["labels"][sel].tolist()


def scored_text(tok, batch: Dict[str, torch.Tensor], seq: int) -> str:
    """Decoded text of the tokens the loss mask scores in sequence `seq` (special tokens kept)."""
    return tok.decode(scored_ids(batch, seq))


def sequence_ids(batch: Dict[str, torch.Tensor], seq: int) -> List[int]:
    """All token ids of sequence `seq` of `batch`, in order."""
    return batch["input_ids"][batch["seq_id"] == seq].tolist()
