#!/usr/bin/env python
"""Add scores to a JSONL of completions (tools/generate.py output) or pairs, with a reward model or an LLM judge.

    python tools/score.py CONFIG.yml [MORE.yml ...] [--set key=value ...]             # 1 process
    python deepy.py tools/score.py CONFIG.yml [MORE.yml ...] [--set key=value ...]    # N ranks

The `score:` section: `input`, `output`, and exactly one scorer:
  score.model        a reward model of ours (objective rm, value head): the score of prompt + response, encoded
                     with the reward model's own tokenizer, chat template and EOS rule (as its training data was)
  score.judge_model  an LM of ours that answers `score.judge_template` (YAML: template with {prompt} and
                     {response}, grade_regex, min_grade/max_grade; default megatron/frontier/judge_template.yml)
                     through the generation engine (judge_max_new_tokens, judge_temperature, judge_seed); answers
                     without a parseable grade are counted, reported with the answer, and scored null
Completions get `completions[i].score`, pairs `score_chosen` and `score_rejected`: a finite number, or null when
the response could not be scored (the report says why). Checkpoints of any tensor/pipeline layout load re-sharded
to `parallel.tensor`; the other ranks are data-parallel and split the responses.

Writes score.output (atomically), the report JSON (score.report, default <output>.report.json), prints the
report table and, last, one JSON line: records, responses, scored, unscored, judge_parsed, judge_unparseable,
bad_records, mean, output, report. Exit code 0, or 2 with a one-line error for a config/checkpoint problem.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def main(argv=None) -> int:
    from megatron.frontier.score_run import run_score
    from megatron.training.worker_main import run_worker

    return run_worker(__doc__, run_score, argv, errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
