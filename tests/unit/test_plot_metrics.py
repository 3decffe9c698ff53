"""tools/plot_metrics.py on generated metrics.jsonl files: one panel per metric group present, one line per run
and metric, several runs overlaid, written as a PNG."""
import json
import os
import sys

import pytest

from megatron.testing.configs import REPO

pytest.importorskip("matplotlib", reason="tools/plot_metrics.py needs matplotlib (requirements/dev.txt)")
sys.path.insert(0, os.path.join(REPO, "tools"))
import plot_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(path, rows):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _dpo_rows(scale):
    rows = [{"step": 0, "eval/loss": 0.69, "eval/rewards/accuracy": 0.5, "eval/rewards/margin": 0.0}]
    for s in range(1, 21):
        rows.append({"step": s, "loss": 0.69 - scale * s, "rewards/accuracy": 0.5 + s / 50,
                     "rewards/chosen": scale * s, "rewards/rejected": -scale * s, "rewards/margin": 2 * scale * s,
                     "logps/chosen": -30.0, "lr": 1e-3 * s / 20, "grad_norm": 1.0, "tokens_per_s": 900.0 + s,
                     "samples_per_s": 10.0})
        if s % 10 == 0:
            rows.append({"step": s, "eval/loss": 0.6, "eval/rewards/accuracy": 0.7, "eval/rewards/margin": 0.3})
    return rows


def _png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == PNG_MAGIC
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_two_dpo_runs_overlaid(tmp_path):
    a = _run(tmp_path / "beta_0.1", _dpo_rows(0.01))
    b = _run(tmp_path / "beta_0.5", _dpo_rows(0.02))
    out = str(tmp_path / "plots" / "dpo.png")
    counts = plot_metrics.plot_runs([a, b], out)
    # loss: loss + eval/loss; accuracy: train + eval; rewards: chosen, rejected, margin + eval margin; per run.
    assert counts == {"loss": 4, "accuracy": 4, "rewards": 8, "learning rate": 2, "throughput (tokens/s)": 2}
    # 5 panels on a 2-column grid of 3 rows (figsize 6.5 x 3.6 inches per panel at 100 dpi).
    assert _png_size(out) == (1300, 1080)


def test_kl_and_reward_panel_when_present_and_cli(tmp_path, capsys):
    kto = [{"step": s, "loss": 0.5, "kl": 0.01 * s, "rewards/chosen": 0.1, "lr": 1e-3, "tokens_per_s": 100.0}
           for s in range(1, 6)]
    online = [{"step": s, "loss": 0.1, "reward/mean": s / 5, "kl": 0.02, "lr": 1e-3} for s in range(1, 6)]
    a, b = _run(tmp_path / "kto", kto), _run(tmp_path / "grpo", online)
    out = str(tmp_path / "kl.png")
    assert plot_metrics.main([a, os.path.join(b, "metrics.jsonl"), "-o", out]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}") and "KL / reward: 3 lines" in printed
    assert _png_size(out)[0] == 1300
    counts = plot_metrics.plot_runs([a], out)
    assert counts == {"loss": 1, "rewards": 1, "KL / reward": 1, "learning rate": 1, "throughput (tokens/s)": 1}


def test_bad_input_is_one_line(tmp_path, capsys):
    assert plot_metrics.main([str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no metrics.jsonl" in err and err.count("\n") == 1
    empty = _run(tmp_path / "empty", [{"step": 1, "grad_norm": 1.0}])
    assert plot_metrics.main([empty, "-o", str(tmp_path / "y.png")]) == 1
    assert "nothing to plot" in capsys.readouterr().err
