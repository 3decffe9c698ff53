"""tools/iterate.py end to end on configs/tiny/loop.yml (fewer prompts and steps): the loop is killed (SIGKILL of
its whole process group) while round 1 is under way and started again with the same command: it resumes at the
unfinished phase without redoing a finished one (state file timestamps and output mtimes unchanged); after 2
rounds the reward model's mean score of round 2's samples exceeds round 0's; a third start does nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron.testing.configs import DATA, REPO

pytestmark = pytest.mark.slow
KILL_AFTER = "round_1/generate"  # the loop is killed once this phase is recorded as finished
PROMPTS, HELDOUT, N = 24, 8, 4  # prompts per round, held-out prompts, samples per prompt (generation.n)


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO
    return env


def _head(src, dst, n):
    with open(src, encoding="utf-8") as fh:
        lines = fh.readlines()[:n]
    with open(dst, "w", encoding="utf-8") as fh:
        fh.writelines(lines)
    return str(dst)


def _state(loop_dir):
    path = os.path.join(loop_dir, "loop_state.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)["phases"]
    except (json.JSONDecodeError, KeyError):
        return {}  # caught between write and rename: read again


def _mtimes(loop_dir):
    """mtime of every file under the loop dir except the ones the loop rewrites on every start (state, lock)."""
    out = {}
    for root, _, files in os.walk(loop_dir):
        for f in files:
            path = os.path.join(root, f)
            if f not in ("loop_state.json", "loop.lock"):
                out[os.path.relpath(path, loop_dir)] = os.stat(path).st_mtime_ns
    return out


@pytest.mark.timeout(1800)  # about 3 minutes on a quiet 2-core machine; far longer on a busy one
def test_two_rounds_kill_resume_and_rerun(tmp_path):
    loop_dir = str(tmp_path / "loop")
    prompts = _head(os.path.join(DATA, "prompts.jsonl"), tmp_path / "prompts.jsonl", PROMPTS)
    heldout = _head(os.path.join(DATA, "prompts_heldout.jsonl"), tmp_path / "heldout.jsonl", HELDOUT)
    # configs/tiny/loop.yml with fewer prompts, tokens and steps: its fragments given whole (a --set replaces a
    # mapping), 8 examples per step, truncated samples kept (the short starting policy often runs to the limit)
    rpo = "objective: {name: rpo, loss_type: bwd_kl, beta: 0.1, eta: 1.0}"
    cmd = [sys.executable, "tools/iterate.py", "configs/tiny/loop.yml", "--set", f"logging.dir={loop_dir}",
           f"loop.prompts={prompts}", f"loop.heldout_prompts={heldout}", f"generation.n={N}",
           "generation.max_new_tokens=12", "train.micro_batch_size=8", "train.global_batch_size=8",
           "loop.start_policy={data: {train_path: data/tiny/sft.jsonl}, train: {iters: 30}, "
           "optimizer: {lr: 3.0e-3, min_lr: 3.0e-4}}",
           "loop.start_reward={objective: {name: rm}, data: {train_path: data/tiny/pairwise.jsonl}, "
           "train: {iters: 30}}",
           "loop.sft={train: {iters: 12}, optimizer: {lr: 2.0e-3}}",
           f"loop.preference={{{rpo}, train: {{iters: 12}}, optimizer: {{lr: 2.0e-3}}}}",
           "loop.filter={min_chars: 1, near_dup_threshold: 0.9}"]
    t0 = time.time()
    first = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        while first.poll() is None and _state(loop_dir).get(KILL_AFTER, {}).get("status") != "done":
            time.sleep(0.2)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the loop and the phase it launched, mid-flight
        out = first.communicate()[0]
    assert first.returncode == -signal.SIGKILL, out[-3000:]
    killed = _state(loop_dir)
    finished = {name: rec for name, rec in killed.items() if rec["status"] == "done"}
    unfinished = [name for name, rec in killed.items() if rec["status"] != "done"]
    assert KILL_AFTER in finished and "round_0/preference" in finished
    assert all(rec["attempts"] == 1 for rec in killed.values())
    before = _mtimes(loop_dir)

    second = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    state = _state(loop_dir)
    for name, rec in finished.items():  # nothing finished was redone
        assert state[name]["status"] == "done" and state[name]["attempts"] == 1
        assert state[name]["finished"] == rec["finished"], name
        assert f"[iterate] {name}:" not in second.stdout
    after = _mtimes(loop_dir)
    changed = sorted(p for p, m in before.items() if after.get(p) != m)
    # no file of a finished phase was written again (the cut-off phase's and the round summaries were)
    assert not [p for p in changed if p.startswith(("prompts.jsonl", "start/", "round_0/", "round_1/generate/"))
                or p == os.path.join("round_1", "generated.jsonl")], changed
    for name in unfinished:  # resumed at the unfinished phase: it ran again
        assert state[name]["status"] == "done" and state[name]["attempts"] == 2
    assert all(rec["status"] == "done" for rec in state.values())

    with open(os.path.join(loop_dir, "rounds.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["round"] for r in rows] == [0, 1, 2]
    print("rounds:", [(r["round"], r["reward/mean"], r["win_rate"], r["count/kept"], r["count/pairs"])
                      for r in rows], f"{time.time() - t0:.0f} s")
    assert rows[2]["reward/mean"] > rows[0]["reward/mean"]
    for r in rows:
        assert r["count/samples"] == PROMPTS * N and r["reward/median"] is not None and r["reward/p90"] >= r["reward/median"]
        assert r["count/after_top_fraction"] == r["count/kept"] <= r["count/after_truncated"] <= r["count/samples"]
        assert 0 < r["count/sft"] <= PROMPTS
    assert rows[0]["win_rate"] is None and all(0.0 <= r["win_rate"] <= 1.0 for r in rows[1:])
    assert rows[1]["policy"].endswith(os.path.join("round_0", "preference", "checkpoints"))
    with open(os.path.join(loop_dir, "rounds.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    state_mtime = os.stat(os.path.join(loop_dir, "loop_state.json")).st_mtime_ns
    third = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "nothing to do" in third.stdout
    assert _mtimes(loop_dir) == after  # nothing rewritten, rounds.jsonl included
    assert os.stat(os.path.join(loop_dir, "loop_state.json")).st_mtime_ns == state_mtime
