"""One line of `<logging.dir>/rounds.jsonl` per round, from that round's files.

    round            0 = the starting policy's samples; r = the policy trained in round r - 1
    policy           its checkpoint
    reward/mean, reward/median, reward/p90, reward/std   of the policy's scored samples of the training prompts
                     under the fixed reward model (or judge)
    heldout/mean     the same over its held-out samples
    win_rate         held-out prompts: for every (prompt, sample index), 1 when this policy's sample outscores the
                     previous policy's, 1/2 on a tie, 0 otherwise (pairs with a null score skipped), averaged;
                     null for round 0 or without held-out prompts
    count/samples, count/unscored, count/after_<rule> (units left after each filter rule, in rule order),
    count/kept, count/sft, count/pairs, and lm_eval/<task>/<metric> when the round was evaluated
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import numpy as np

from .loop_data import GENERATOR, POLICY, _jsonl
from .report import RULES
from .scored import COMPLETIONS
from .scoring import score_stats


def policy_scores(path: str) -> List[Optional[float]]:
    """Scores of the policy's completions in a scored file, in file order (None = unscored)."""
    return [c.get("score") for rec in _jsonl(path, "score.output") for c in rec.get(COMPLETIONS, [])
            if c.get(GENERATOR, POLICY) == POLICY]


def win_rate(current: str, previous: str) -> Optional[float]:
    """Paired win rate of the held-out file `current` against `previous` (see the module docstring)."""
    a, b = _jsonl(current, "heldout"), _jsonl(previous, "heldout")
    if len(a) != len(b):
        raise ValueError(f"{current} has {len(a)} held-out records but {previous} has {len(b)}")
    total, wins = 0, 0.0
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra.get(COMPLETIONS, []), rb.get(COMPLETIONS, [])):
            sa, sb = ca.get("score"), cb.get("score")
            if sa is None or sb is None:
                continue
            total += 1
            wins += 1.0 if sa > sb else 0.5 if sa == sb else 0.0
    return wins / total if total else None


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def round_row(r: int, policy: str, samples: str, heldout: Optional[str], previous_heldout: Optional[str],
              filter_report: Dict[str, Any], selected: Dict[str, int], evaluation: Optional[Dict] = None) -> Dict:
    """The rounds.jsonl line of round `r` (see the module docstring)."""
    scores = policy_scores(samples)
    st = score_stats(scores)
    finite = [s for s in scores if s is not None]
    row: Dict[str, Any] = {"round": r, "policy": policy, "reward/mean": _round(st["mean"]),
                           "reward/median": _round(st["median"]), "reward/p90": _round(st["p90"]),
                           "reward/std": _round(float(np.std(finite)) if finite else None)}
    if heldout:
        row["heldout/mean"] = _round(score_stats(policy_scores(heldout))["mean"])
    row["win_rate"] = _round(win_rate(heldout, previous_heldout)) if heldout and previous_heldout else None
    row["count/samples"] = filter_report["units_read"]
    row["count/unscored"] = sum(s is None for s in scores)
    left = filter_report["units_read"]
    for rule in RULES:
        left -= filter_report["dropped"]["counts"].get(rule, 0)
        row[f"count/after_{rule}"] = left
    row["count/kept"] = filter_report["units_kept"]
    row["count/sft"] = selected.get("sft", 0)
    row["count/pairs"] = selected.get("pairs", 0)
    for task, metrics in (evaluation or {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[f"lm_eval/{task}/{name}"] = _round(value)
    return row


def write_rounds(path: str, rows: List[Dict]) -> None:
    """Rewrite rounds.jsonl with `rows` (sorted by round; atomically)."""
    from .scored import write_jsonl
    write_jsonl(path, sorted(rows, key=lambda row: row["round"]))


def format_rounds(rows: List[Dict]) -> str:
    """A small table of the rounds' headline numbers."""
    cols = ("round", "reward/mean", "reward/median", "reward/p90", "win_rate", "count/kept", "count/sft",
            "count/pairs")
    fmt = (lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["  ".join(f"{c:>13}" for c in cols)]
    lines += ["  ".join(f"{fmt(row.get(c)):>13}" for c in cols) for row in sorted(rows, key=lambda x: x["round"])]
    return "\n".join(lines)

