#!/usr/bin/env python
"""The frontier loop: rounds of generate -> score -> filter -> select -> SFT -> DPO/RPO, resumable.

    python tools/iterate.py CONFIG.yml [MORE.yml ...] [--set key=value ...] [--plan]

Runs `loop.rounds` rounds (the `loop:` section; megatron/frontier/loop.py lists the phases). Each round
generates `generation.n` samples per prompt of `loop.prompts` with the current policy (and `loop.committee`),
scores them with the fixed reward model (`score.model`, or trained first from `loop.start_reward`; or the judge
`score.judge_model`), filters them (`loop.filter`), selects best-of-n SFT records and preference pairs, and
trains SFT then DPO/RPO (`loop.train`, fragments `loop.sft`, `loop.preference`) into the next policy. Every
model phase is `python deepy.py <script> CONFIG... --set ...` with the config's launcher; its log is in its
phase folder under `logging.dir`.

Each round writes its data and checkpoints under <logging.dir>/round_<r>/ and one line of
<logging.dir>/rounds.jsonl (reward/mean, reward/median, reward/p90 of its samples, win_rate against the previous
policy on loop.heldout_prompts, record counts after each filter rule); round 0 is the starting policy. The
curves go to <logging.dir>/rounds.png.

Started again with the same command, the loop skips every finished phase (<logging.dir>/loop_state.json) and
resumes at the first unfinished one; when all are finished it does nothing. --plan prints the phases and their
state without running anything. Exit code 0; 1 when a phase fails (its log's tail is printed); 2 for a config error.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))  # the repository root

from megatron.config.load import add_set_argument  # noqa: E402 (after the path set-up)

# rounds.png panels: (title, which rounds.jsonl keys it draws)
ROUND_PANELS = (
    ("reward of the round's samples", lambda k: k.startswith("reward/") or k == "heldout/mean"),
    ("win rate vs previous policy", lambda k: k == "win_rate"),
    ("records after each filter / selected", lambda k: k.startswith("count/")),
    ("lm-eval", lambda k: k.startswith("lm_eval/")),
)


def plot_rounds(rounds_jsonl: str, png: str) -> None:
    """Draw rounds.jsonl's curves against the round with tools/plot_metrics.py."""
    sys.path.insert(0, _TOOLS)
    from plot_metrics import plot_runs
    plot_runs([rounds_jsonl], png, labels=["loop"], x_key="round", panels=ROUND_PANELS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="YAML files, later ones override earlier ones")
    add_set_argument(p)
    p.add_argument("--plan", action="store_true", help="print the phases and their state, run nothing")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron.config import ConfigError
    from megatron.engines.run_config import load_run_config
    from megatron.frontier.loop import FrontierLoop, LoopError
    from megatron.frontier.loop_report import format_rounds
    from megatron.training.launcher import world_size_for

    try:
        pre = load_run_config(args.configs, args.overrides, validate=False)
        cfg = load_run_config(args.configs, args.overrides, world_size=world_size_for(pre))
        loop = FrontierLoop(cfg, args.configs, args.overrides, plot=plot_rounds,
                            echo=lambda s: print(s, flush=True))
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        print("\n".join(loop.status()))
        return 0
    os.makedirs(loop.dir, exist_ok=True)
    with open(os.path.join(loop.dir, "loop.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"error: another tools/iterate.py is running on {loop.dir} (loop.lock is held)", file=sys.stderr)
            return 1
        try:
            rows = loop.run()
        except (LoopError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, LoopError) else 2
    if rows:
        print(format_rounds(rows))
        print(f"rounds: {os.path.join(loop.dir, 'rounds.jsonl')}  curves: {os.path.join(loop.dir, 'rounds.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
