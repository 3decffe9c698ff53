#!/usr/bin/env python
"""Draw training curves from one or more runs into a PNG.

    python tools/plot_metrics.py RUN_DIR [RUN_DIR ...] -o curves.png

RUN_DIR is a run's `logging.dir` (holding metrics.jsonl) or a metrics.jsonl file. One panel per group of
metrics that some run logged, against the optimizer step: loss (train, eval, NLL), accuracy, rewards
(DPO-family implicit rewards, reward-model scores and margins), KL / reward (KTO's KL, online RL), learning
rate and throughput (tokens/s). Each run draws in its own colour, eval curves dashed with markers.
Exit code 0 with the written path printed, 1 with a one-line error.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

# (panel title, does this metric name belong to it) in drawing order; names are compared without `eval/`.
PANELS: Tuple[Tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: k in ("loss", "nll")),
    ("accuracy", lambda k: "accuracy" in k),
    ("rewards", lambda k: (k.startswith("rewards/") and "accuracy" not in k)
     or k in ("chosen_score", "rejected_score", "margin")),
    ("KL / reward", lambda k: k == "kl" or k.startswith("kl/") or k == "reward" or k.startswith("reward/")),
    ("learning rate", lambda k: k == "lr"),
    ("throughput (tokens/s)", lambda k: k == "tokens_per_s"),
)


_TRAIN_STYLES = ({"linestyle": "-"}, {"linestyle": "-."}, {"linestyle": ":"}, {"linestyle": (0, (6, 2))})
_EVAL_STYLE = {"linestyle": "--", "marker": "o"}  # evaluations are sparse: markers show where they were taken


def metrics_file(run: str) -> str:
    """The metrics.jsonl of `run` (a logging dir or the file itself); ValueError naming the path if absent."""
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise ValueError(f"{run}: no metrics.jsonl (give a run's logging.dir or the metrics.jsonl file)")
    return path


def read_series(path: str, x_key: str = "step") -> Dict[str, Tuple[List[int], List[float]]]:
    """{metric name: (steps, values)} from a metrics.jsonl, rows in file order, NaN/inf values left out.
    x_key: the row field the values are drawn against (tools/iterate.py's rounds.jsonl: `round`)."""
    series: Dict[str, Tuple[List[int], List[float]]] = {}
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            step = row.get(x_key)
            if step is None:
                raise ValueError(f"{path}:{lineno}: row has no '{x_key}'")
            for key, value in row.items():
                if key != x_key and isinstance(value, (int, float)) and math.isfinite(value):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(int(step))
                    values.append(float(value))
    return series


def panel_of(name: str, panels=PANELS) -> Optional[str]:
    """The title of the panel that draws metric `name` (train or `eval/`), or None when none does."""
    bare = name[len("eval/"):] if name.startswith("eval/") else name
    for title, member in panels:
        if member(bare):
            return title
    return None


def _label(run: str) -> str:
    path = os.path.abspath(run)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    return os.path.basename(path.rstrip(os.sep)) or path


def plot_runs(runs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None, x_key: str = "step",
              panels=PANELS) -> Dict[str, int]:
    """Draw every run's metrics into the PNG `out`; returns {panel title: number of lines drawn} (the panels
    present, in order). `labels` name the runs in the legends (default: each run directory's name); x_key and
    panels ((title, member(name)) pairs) let other row files reuse the drawing (tools/iterate.py's rounds)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [_label(r) for r in runs]
    data = [read_series(metrics_file(r), x_key) for r in runs]
    titles = [t for t, _ in panels if any(panel_of(k, panels) == t for series in data for k in series)]
    if not titles:
        raise ValueError(f"nothing to plot: no known metric in {', '.join(runs)}")
    cols = 2 if len(titles) > 1 else 1
    rows = (len(titles) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    counts: Dict[str, int] = {}
    for ax, title in zip(axes.flat, titles):
        keys = sorted({k for series in data for k in series if panel_of(k, panels) == title})
        train_keys = [k for k in keys if not k.startswith("eval/")]
        for i, (label, series) in enumerate(zip(labels, data)):
            for j, key in enumerate(keys):
                if key not in series:
                    continue
                steps, values = series[key]
                # Several runs: a colour per run, a line style per metric; one run: a colour per metric.
                colour = colours[(i if len(runs) > 1 else j) % len(colours)]
                style = _EVAL_STYLE if key.startswith("eval/") else \
                    _TRAIN_STYLES[train_keys.index(key) % len(_TRAIN_STYLES)]
                ax.plot(steps, values, color=colour, markersize=3, linewidth=1.2,
                        label=f"{label}: {key}" if len(runs) > 1 else key, **style)
                counts[title] = counts.get(title, 0) + 1
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(titles):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit code (errors are printed, not raised)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's logging.dir, or a metrics.jsonl file")
    ap.add_argument("-o", "--out", default="metrics.png", help="PNG to write (default metrics.png)")
    ap.add_argument("--labels", nargs="+", help="legend names of the runs, in order (default: directory names)")
    args = ap.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        print(f"error: --labels gives {len(args.labels)} names for {len(args.runs)} runs", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: tools/plot_metrics.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    try:
        counts = plot_runs(args.runs, args.out, args.labels)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({', '.join(f'{t}: {n} lines' for t, n in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
