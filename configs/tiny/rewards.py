"""The task of the tiny online RL demos (configs/tiny/grpo.yml, rloo.yml, ppo.yml): its reward function, with
TRL's signature, and its prompt file (`python configs/tiny/rewards.py` rewrites configs/tiny/rl_prompts.jsonl,
deterministically).

The tiny SFT model (configs/tiny/sft.yml) continues "count up from 7:" with three to six numbers, as its data taught
it. The demos ask for exactly three, the record's `answer` holding the right three (" 7 8 9"): `three_numbers`
rewards the form (exactly three whitespace-separated integers, which the SFT model produces about one time in
eight), the built-in `exact_match` the right numbers. RL moves where the answer ends within a minute; the counting
itself is what SFT taught (a longer SFT run counts better, and exact_match rises with it).
"""
from __future__ import annotations

import json
import os
import random
from typing import List

PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rl_prompts.jsonl")


def three_numbers(completions: List[str], **columns) -> List[float]:
    """1.0 when the completion is exactly three integers separated by whitespace, else 0.0."""
    out = []
    for text in completions:
        words = text.split()
        out.append(float(len(words) == 3 and all(w.isdigit() for w in words)))
    return out


def make_prompts(path: str = PROMPTS, n: int = 64, seed: int = 7) -> None:
    """Write `n` records {prompt: "count up|down from N:", answer: " N N±1 N±2"} to `path` (JSONL)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            up = rng.random() < 0.5
            start = rng.randint(0, 90) if up else rng.randint(9, 99)
            words = [str(start + k if up else start - k) for k in range(3)]
            fh.write(json.dumps({"prompt": f"count {'up' if up else 'down'} from {start}:",
                                 "answer": " " + " ".join(words)}) + "\n")


if __name__ == "__main__":
    make_prompts()
    print(PROMPTS)
