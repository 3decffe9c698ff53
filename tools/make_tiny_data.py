#!/usr/bin/env python
"""Write the tiny offline datasets and tokenizer under data/tiny/ (committed; a few hundred KB).

Tasks are small and learnable so a 64-128 hidden model's loss falls within a minute on CPU:
  "count up from 7:"   -> " 7 8 9 10"        "count down from 12:" -> " 12 11 10"
  "reverse: a b c"     -> " c b a"
Preference data (chosen / desirable = the right answer) has wrong answers a 2-layer model learns to
recognise from a few thousand examples (`wrong_answer`): half a loop (" 7 7 7 7"), half the answer to a task
of the other kind (letters for a count, numbers for a reversal). With slips (`corrupt`: one item changed,
two swapped or one dropped) the tiny reward model stayed near 0.65 held-out accuracy and KTO barely moved
(0.68 after 100 steps with a fifth of slips); with this mix the shipped RM and KTO demos learn visibly
(tests/integration/test_demos_learn.py).
Files:
  sft.jsonl / sft_valid.jsonl            prompt/response
  pairwise.jsonl / pairwise_valid.jsonl  prompt/chosen/rejected (chosen right, rejected a wrong answer)
  unpaired.jsonl / unpaired_valid.jsonl  prompt/completion/label (label = completion is right; half are)
  sft_chat.jsonl                         messages (system/user/assistant, some multi-turn)
  pairwise_chat.jsonl                    chosen/rejected full conversations (implicit prompt)
  prompts.jsonl / prompts_heldout.jsonl  prompt/answer (prompts for generation: the frontier loop, online RL;
                                         drawn from their own seed after the tokenizer, so adding them changed
                                         nothing else)
  eval/tiny_mc.jsonl                     prompt/choices/label: a multiple-choice task for tools/evaluate.py
  tokenizer/                             byte-level BPE (512 ids), <|pad|> <|bos|> <|eos|> <|im_start|>
                                         <|im_end|>, BOS added by the tokenizer, chatml-like template
The tokenizer is kept when it exists (its ids are in every cache and checkpoint made with it); it is
trained from these texts only when missing or with --retrain-tokenizer.
Usage: python tools/make_tiny_data.py [--out data/tiny] [--seed 0] [--retrain-tokenizer]
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List, Tuple

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
# chatml-like; a turn ends with EOS so a rendered response already ends with it
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYSTEM = "You are a careful assistant."


def make_task(rng: random.Random) -> Tuple[str, List[str]]:
    """(prompt, answer words) of one random task."""
    task = rng.choice(("up", "down", "reverse"))
    if task == "up":
        start, k = rng.randint(0, 90), rng.randint(3, 6)
        return f"count up from {start}:", [str(start + i) for i in range(k)]
    if task == "down":
        start, k = rng.randint(9, 99), rng.randint(3, 6)
        return f"count down from {start}:", [str(start - i) for i in range(k)]
    words = rng.sample(LETTERS, rng.randint(3, 6))
    return "reverse: " + " ".join(words), words[::-1]


def corrupt(rng: random.Random, words: List[str]) -> List[str]:
    """A slip: a wrong answer close to `words` (one item changed, two swapped, or one dropped)."""
    out = list(words)
    how = rng.choice(("change", "swap", "drop"))
    i = rng.randrange(len(out))
    if how == "change":
        out[i] = str(int(out[i]) + rng.choice((-3, -2, 2, 3, 5))) if out[i].isdigit() else rng.choice(
            [c for c in LETTERS if c != out[i]])
    elif how == "swap":
        j = (i + 1) % len(out)
        out[i], out[j] = out[j], out[i]
    else:
        del out[i]
    return out if out != words else out[::-1] + ["0"]


def wrong_answer(rng: random.Random, words: List[str]) -> List[str]:
    """A wrong answer to the task whose right answer is `words`, one of two kinds with equal chance:
    loop      the first item repeated as often as the answer is long (a generation stuck in a loop)
    off_task  the right answer of a random task of the other kind (letters for a count, numbers for a reversal)
    """
    if rng.random() < 0.5:
        return [words[0]] * len(words)
    while True:
        _, other = make_task(rng)
        if other[0].isdigit() != words[0].isdigit():
            return other


def answer(words: List[str]) -> str:
    """Response text: the words after a leading space (so prompt and response tokenise apart)."""
    return " " + " ".join(words)


def sft_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` prompt/response records."""
    return [dict(prompt=p, response=answer(w)) for p, w in (make_task(rng) for _ in range(n))]


def pairwise_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` prompt/chosen/rejected records; chosen is right, rejected a `wrong_answer`."""
    out = []
    for _ in range(n):
        p, w = make_task(rng)
        out.append(dict(prompt=p, chosen=answer(w), rejected=answer(wrong_answer(rng, w))))
    return out


def unpaired_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` prompt/completion/label records from n // 2 tasks, each once with its right answer (label true)
    and once with a `wrong_answer` (false), shuffled: preference pairs unpaired, as TRL's
    `unpair_preference_dataset` and the UltraFeedback KTO recipe do (half desirable, so the KTO demo's class
    ratio is 1, inside the paper's recommended [1, 4/3])."""
    out = []
    for _ in range(n // 2):
        p, w = make_task(rng)
        out.append(dict(prompt=p, completion=answer(w), label=True))
        out.append(dict(prompt=p, completion=answer(wrong_answer(rng, w)), label=False))
    rng.shuffle(out)
    return out


def chat_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` messages records (optional system turn, one or two user/assistant exchanges)."""
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for _ in range(rng.choice((1, 1, 2))):  # some multi-turn conversations
            p, w = make_task(rng)
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": " ".join(w)}]
        out.append(dict(messages=msgs))
    return out


def pairwise_chat_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` chosen/rejected full conversations sharing the user turn (implicit prompt)."""
    out = []
    for _ in range(n):
        p, w = make_task(rng)
        user = [{"role": "user", "content": p}]
        out.append(dict(chosen=user + [{"role": "assistant", "content": " ".join(w)}],
                        rejected=user + [{"role": "assistant", "content": " ".join(wrong_answer(rng, w))}]))
    return out


def prompt_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` prompt/answer records (prompts to generate from; `answer` for exact-match rewards)."""
    return [dict(prompt=p, answer=" ".join(w)) for p, w in (make_task(rng) for _ in range(n))]


def multiple_choice_records(rng: random.Random, n: int) -> List[Dict]:
    """`n` prompt/choices/label records: the correct answer among three distinct corruptions, shuffled
    (lm-evaluation-harness task data/tiny/eval/tiny_mc.yaml)."""
    out = []
    for _ in range(n):
        p, w = make_task(rng)
        choices = [answer(w)]
        while len(choices) < 4:
            c = answer(corrupt(rng, w))
            if c not in choices:
                choices.append(c)
        rng.shuffle(choices)
        out.append(dict(prompt=p, choices=choices, label=choices.index(answer(w))))
    return out


def write_jsonl(path: str, records: List[Dict]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def texts_of(records: List[Dict]) -> List[str]:
    """Every string in the records (tokenizer training text)."""
    out = []
    for r in records:
        for v in r.values():
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(m["content"] for m in v)
    return out


def train_tokenizer(texts: List[str], out_dir: str, vocab_size: int = 512) -> None:
    """Byte-level BPE over `texts`, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["system", "user", "assistant", SYSTEM], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", additional_special_tokens=SPECIAL[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def main() -> None:
    """Write every file under --out and print the sizes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "tiny")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain-tokenizer", action="store_true",
                    help="train tokenizer/ again from these texts (new ids: every cache and checkpoint changes)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    files = {
        "sft.jsonl": sft_records(rng, 2000), "sft_valid.jsonl": sft_records(rng, 200),
        "pairwise.jsonl": pairwise_records(rng, 1000), "pairwise_valid.jsonl": pairwise_records(rng, 100),
        "unpaired.jsonl": unpaired_records(rng, 1000), "unpaired_valid.jsonl": unpaired_records(rng, 100),
        "sft_chat.jsonl": chat_records(rng, 100), "pairwise_chat.jsonl": pairwise_chat_records(rng, 100),
    }
    texts: List[str] = []
    for name, records in files.items():
        write_jsonl(os.path.join(args.out, name), records)
        texts.extend(texts_of(records))
    tok_dir = os.path.join(args.out, "tokenizer")
    if args.retrain_tokenizer or not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        train_tokenizer(texts, tok_dir)
    prompt_rng = random.Random(args.seed + 1000)  # its own stream: the files above stay as they were
    write_jsonl(os.path.join(args.out, "prompts.jsonl"), prompt_records(prompt_rng, 128))
    write_jsonl(os.path.join(args.out, "prompts_heldout.jsonl"), prompt_records(prompt_rng, 32))
    os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)  # next to its task file eval/tiny_mc.yaml
    write_jsonl(os.path.join(args.out, "eval", "tiny_mc.jsonl"), multiple_choice_records(prompt_rng, 40))
    for name in sorted(os.listdir(args.out)):
        path = os.path.join(args.out, name)
        if os.path.isfile(path):
            print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
