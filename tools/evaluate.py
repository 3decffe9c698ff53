#!/usr/bin/env python
"""Run lm-evaluation-harness on a checkpoint of ours (exported to a Hugging Face model on the fly).

    python tools/evaluate.py CONFIG.yml [MORE.yml ...] [--set key=value ...]

The `evaluate:` section: `model` (a checkpoint of ours, any layout; default checkpoint.load), `tasks` (default
[tiny_mc]), `task_dir` (a folder of local lm-eval task YAML files; default data/tiny/eval, the shipped tiny
multiple-choice task; `data_files` in them are read relative to the YAML file), `limit` (documents per task),
`batch_size`, `output` (default <logging.dir>/eval.json). Runs in one process on the CPU (or the first GPU).

lm-evaluation-harness is optional: `pip install lm-eval` (requirements/dev.txt has it); without it this tool
exits with code 2 and says so. tools/iterate.py runs it after every round with `loop.evaluate: true`.

Writes `output`: {"model", "hf_dir" (removed after the run), "tasks", "results": {task: {metric: value}},
"samples": {task: [{doc_id, target, loglikelihoods}]}} (loglikelihood tasks), prints one JSON line with
results. Exit code 0, or 2 with a one-line error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository root

from megatron.config.load import add_set_argument  # noqa: E402 (after the path set-up)

DEFAULT_TASK_DIR = os.path.join(REPO, "data", "tiny", "eval")


def materialise_tasks(task_dir: str, out_dir: str) -> None:
    """Copy the task YAML files of `task_dir` into `out_dir` with relative `dataset_kwargs.data_files` made
    absolute (lm-eval hands them to `datasets`, which reads them relative to the working directory)."""
    import yaml

    for name in sorted(os.listdir(task_dir)):
        if not name.endswith((".yaml", ".yml")):
            continue
        with open(os.path.join(task_dir, name), encoding="utf-8") as fh:
            text = fh.read()
        data = yaml.safe_load(text)
        files = (data.get("dataset_kwargs") or {}).get("data_files") if isinstance(data, dict) else None
        if isinstance(files, dict):
            data["dataset_kwargs"]["data_files"] = {
                split: (f if os.path.isabs(f) else os.path.abspath(os.path.join(task_dir, f)))
                for split, f in files.items()}
            text = yaml.safe_dump(data, sort_keys=False)
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as fh:
            fh.write(text)


def _metrics(task_result: Dict) -> Dict[str, float]:
    """{metric: value} of one task's lm-eval result ('acc,none' -> 'acc'; stderr dropped)."""
    out = {}
    for key, value in task_result.items():
        name = key.split(",")[0]
        if "stderr" in name or name == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out[name] = float(value)
    return out


def _samples(samples: List[Dict]) -> List[Dict]:
    """doc id, target and per-choice log-likelihoods of a loglikelihood task's logged samples."""
    out = []
    for s in samples:
        resps = s.get("filtered_resps") or s.get("resps") or []
        lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
        out.append({"doc_id": s.get("doc_id"), "target": s.get("target"), "loglikelihoods": lls})
    return out


def run(cfg) -> Dict:
    """Export `evaluate.model`, run the tasks, write `evaluate.output`; returns what was written."""
    from megatron.config import ConfigError
    from megatron.interop.convert import megatron_to_hf

    ev = cfg.evaluate
    model = ev.model or cfg.checkpoint.load
    if not model:
        raise ConfigError("key 'evaluate.model' is not set (nor checkpoint.load): give a checkpoint of ours")
    task_dir = ev.task_dir or DEFAULT_TASK_DIR
    if not os.path.isdir(task_dir):
        raise ConfigError(f"key 'evaluate.task_dir': {task_dir!r} is not a folder of lm-eval task YAML files")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("tools/evaluate.py needs lm-evaluation-harness: pip install lm-eval") from None
    import torch

    output = ev.output or os.path.join(cfg.logging.dir, "eval.json")
    with tempfile.TemporaryDirectory(prefix="evaluate_") as tmp:
        hf_dir = megatron_to_hf(model, os.path.join(tmp, "hf"))
        tasks_dir = os.path.join(tmp, "tasks")
        os.makedirs(tasks_dir)
        materialise_tasks(task_dir, tasks_dir)
        manager = TaskManager(include_path=tasks_dir)
        missing = [t for t in ev.tasks if t not in manager.all_tasks]
        if missing:
            raise ConfigError(f"key 'evaluate.tasks': unknown task {missing[0]!r} (not in {task_dir} nor lm-eval's "
                              "own tasks)")
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        result = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": hf_dir, "dtype": "float32"},
                                         tasks=list(ev.tasks), task_manager=manager, limit=ev.limit,
                                         batch_size=ev.batch_size, device=device, log_samples=True,
                                         bootstrap_iters=0)
    out = {"model": os.path.abspath(model), "tasks": list(ev.tasks),
           "results": {t: _metrics(r) for t, r in result["results"].items()},
           "samples": {t: _samples(s) for t, s in (result.get("samples") or {}).items()}}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp_out = output + ".tmp"
    with open(tmp_out, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp_out, output)
    out["output"] = os.path.abspath(output)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="YAML files, later ones override earlier ones")
    add_set_argument(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron.checkpoint.checkpointing import CheckpointError
    from megatron.config import ConfigError, load_config
    from megatron.interop.hf_config import ConversionError

    try:
        cfg = load_config(args.configs, args.overrides, world_size=1)
        out = run(cfg)
    except (ConfigError, CheckpointError, ConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"results": out["results"], "output": out["output"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
