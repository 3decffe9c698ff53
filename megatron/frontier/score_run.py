"""tools/score.py's run: read the units, split them over data-parallel ranks, score, gather, write (rank 0).

Every rank reads `score.input` (small JSONL), takes the units i with i % dp_size == dp_rank (tensor-parallel
peers take the same units and compute the same scores), scores them with the reward model (`score.model`) or
the judge (`score.judge_model`), and rank 0 gathers the outcomes, writes `score.output` (atomically) and the
report. A judge's sampling depends on (score.judge_seed, unit index) only, so the scores do not depend on the
number of ranks; nor do a reward model's (one forward per packed row).
"""
from __future__ import annotations

import os
from typing import Dict, List

from megatron.config import ConfigError

from .judge import load_judge_template
from .scored import write_jsonl
from .scoring import ScoreReport, UnitScore, apply_scores, read_units


def check_score_config(cfg) -> None:
    """ConfigError naming the key for a score section that cannot run (before any model is loaded)."""
    sc = cfg.score
    if not sc.input:
        raise ConfigError("key 'score.input' is not set: give a JSONL of completions (tools/generate.py output) or "
                          "pairs (prompt/chosen/rejected)")
    if not os.path.isfile(sc.input):
        raise ConfigError(f"key 'score.input': {sc.input!r} does not exist")
    if not sc.output:
        raise ConfigError("key 'score.output' is not set: give the JSONL file to write the scored records to")
    if bool(sc.model) == bool(sc.judge_model):
        raise ConfigError("section 'score': set exactly one of score.model (a reward model of ours) and "
                          "score.judge_model (an LM of ours grading with score.judge_template)"
                          + (f"; both are set ({sc.model!r}, {sc.judge_model!r})" if sc.model else ""))
    if sc.batch_size < 1:
        raise ConfigError(f"key 'score.batch_size': must be >= 1, got {sc.batch_size}")
    if cfg.parallel.pipeline > 1:
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline}: scoring runs unpipelined; set "
                          "parallel.pipeline=1 (checkpoints of any pipeline layout load re-sharded)")
    if sc.judge_model:
        try:
            load_judge_template(sc.judge_template)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def run_score(cfg) -> Dict:
    """Score `score.input` into `score.output` (+ report); returns the summary dict on rank 0, {} elsewhere."""
    import torch.distributed as dist
    from megatron.generation import SamplingParams
    from megatron.mpu import initialize_parallel
    from megatron.mpu.distributed import init_distributed

    from .score_model import judge_scores, load_scorer, reward_model_scores

    sc = cfg.score
    check_score_config(cfg)
    init_distributed(cfg.parallel.backend)
    world = dist.get_world_size() if dist.is_initialized() else 1
    ps = initialize_parallel(cfg.parallel.tensor, 1)
    report = ScoreReport(input=sc.input, output=sc.output)
    records, units = read_units(sc.input, report)
    mine = list(range(ps.dp_rank, len(units), ps.dp_size))
    if sc.model:
        model, mcfg, tok = load_scorer(cfg, "score.model", sc.model, ps, world, value_head=True)
        report.scorer = f"reward model {sc.model}"
        scores = reward_model_scores(model, mcfg, ps, tok, [units[i] for i in mine], sc.batch_size)
    else:
        template = load_judge_template(sc.judge_template)
        model, mcfg, tok = load_scorer(cfg, "score.judge_model", sc.judge_model, ps, world, value_head=False)
        report.scorer = f"judge {sc.judge_model} (template {template.path})"
        params = SamplingParams(n=1, temperature=sc.judge_temperature, max_new_tokens=sc.judge_max_new_tokens,
                                seed=sc.judge_seed).validate("score")
        scores = judge_scores(model, mcfg, ps, tok, template, [units[i] for i in mine], mine, params, sc.batch_size)
    share = dict(zip(mine, scores)) if ps.tp_rank == 0 else {}
    shares = [share]
    if dist.is_initialized() and world > 1:
        shares = [None] * world
        dist.gather_object(share, shares if ps.rank == 0 else None, dst=0)
    if ps.rank != 0:
        return {}
    outcome: Dict[int, UnitScore] = {}
    for s in shares:
        outcome.update(s)
    ordered: List[UnitScore] = [outcome[i] for i in range(len(units))]
    report.count(units, ordered)
    report.records_written = write_jsonl(sc.output, apply_scores(records, units, ordered))
    report_path = sc.report or sc.output + ".report.json"
    report.write_json(report_path)
    print(report.format(), flush=True)
    st = report.stats
    return {"records": report.records_written, "responses": report.units, "scored": report.scored,
            "unscored": report.unscored.total, "judge_parsed": report.judge_parsed,
            "judge_unparseable": report.judge_unparseable, "bad_records": report.bad.total,
            "mean": st.get("mean"), "output": os.path.abspath(sc.output), "report": os.path.abspath(report_path)}
