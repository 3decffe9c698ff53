"""The frontier loop (tools/iterate.py): rounds of generate -> score -> filter -> select -> SFT -> DPO/RPO, resumable.

Phases, in order (D = logging.dir; `launch` phases are `python deepy.py <script> CONFIG... --set ...` with the
config's launcher; `data` phases run in this process on the library the tools use):

    prompts                 data    D/prompts.jsonl: loop.prompts + loop.heldout_prompts, tagged (loop_data.py)
    start/policy            launch  train.py with loop.start_policy, when no starting policy is given
    start/reward_model      launch  train.py with loop.start_reward (objective rm), when no scorer is given
    round_r/generate        launch  tools/generate.py with the round's policy   -> D/round_r/generated.jsonl
    round_r/generate_c<k>   launch  the same with committee member k (loop.committee)
    round_r/merge           data    pooled, each completion tagged with its generator
    round_r/score           launch  tools/score.py with the fixed reward model (or judge) -> scored.jsonl
    round_r/split           data    samples.jsonl (training prompts) and heldout.jsonl (policy only)
    round_r/filter          data    filtered.jsonl (+ report): loop.filter rules
    round_r/select          data    sft.jsonl (best-of-n) and pairs.jsonl (loop.pairs, loop.min_margin)
    round_r/evaluate        launch  tools/evaluate.py on the round's policy (loop.evaluate)
    round_r/report          data    the round's line of D/rounds.jsonl and the PNG of the curves
    round_r/sft             launch  train.py, objective sft on sft.jsonl, from the round's policy    (r < rounds)
    round_r/preference      launch  train.py on pairs.jsonl (default objective rpo, loss_type bwd_kl) from
                                    the SFT checkpoint; its checkpoint is round r+1's policy      (r < rounds)

A training phase's config: the loop's CONFIG files, then the phase defaults, its fragment (loop.sft,
loop.preference, loop.start_*), the command line's --set, and last the keys the loop owns (data.train_path,
checkpoint.load/save, logging.dir, ...). Every phase dir holds its log (`<phase>.log`).

Resume: D/loop_state.json (loop_state.py) records every finished phase. The same command again skips the
finished phases whose outputs exist and runs the rest in order: a killed loop resumes at the first unfinished
phase (a killed training phase continues from its own last checkpoint, as any training run does); a finished
loop does nothing. A finished phase whose outputs were deleted runs again, and so does every phase after it.
Raising loop.rounds later appends rounds. A training phase whose data came out empty is skipped (the policy
carries over).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from megatron.config import Config, ConfigError

from . import loop_data, loop_report
from .loop_state import STATE_FILE, LoopState

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPY = os.path.join(REPO, "deepy.py")
SCRIPTS = {"train": os.path.join(REPO, "train.py"), "generate": os.path.join(REPO, "tools", "generate.py"),
           "score": os.path.join(REPO, "tools", "score.py"), "evaluate": os.path.join(REPO, "tools", "evaluate.py")}
TRAIN_PHASES = ("sft", "preference")


class LoopError(RuntimeError):
    """A phase failed; the message names it and its log."""


class _Stop(BaseException):
    """SIGTERM while a phase runs: stop it and leave the phase unfinished."""


@dataclass
class Phase:
    """One step of the plan: `run()` does it and returns the info to record; `outputs()` must exist after."""
    name: str
    kind: str  # launch | data
    run: Callable[[], Dict[str, Any]]
    outputs: Callable[[], List[str]]


def flatten_fragment(fragment: Dict[str, Any], key: str, cfg: Optional[Config] = None) -> List[str]:
    """A config fragment (nested mapping, the YAML shape) as `--set a.b=<JSON>` pairs; it descends only through
    the Config's sections, so a mapping-valued key (deepspeed, model.rope_scaling) stays one value.
    ConfigError naming `key.<path>` for a section that is not a mapping."""
    node = cfg or Config()
    out: List[str] = []

    def walk(obj, data: Dict[str, Any], prefix: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"key '{key}{'.' + prefix.rstrip('.') if prefix else ''}' must be a mapping of config "
                              f"sections (the YAML shape, e.g. {{train: {{iters: 20}}}}), got {data!r}")
        for k, v in data.items():
            sub = getattr(obj, k, None) if obj is not None else None
            if sub is not None and dataclasses.is_dataclass(sub):
                walk(sub, v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")

    walk(node, fragment, "")
    return out


class FrontierLoop:
    """Plans and runs the phases of one loop directory (see the module docstring)."""

    def __init__(self, cfg: Config, config_files: Sequence[str], overrides: Sequence[str],
                 plot: Optional[Callable[[str, str], None]] = None, echo: Callable[[str], None] = print):
        """cfg: the loaded loop config; config_files/overrides: as given on the command line (every launch gets
        them); plot(rounds_jsonl, png): draws the curves (tools/iterate.py passes tools/plot_metrics.py's)."""
        self.cfg = cfg
        self.files = [os.path.abspath(f) for f in config_files]
        self.overrides = list(overrides)
        self.plot = plot
        self.echo = echo
        self.dir = os.path.abspath(cfg.logging.dir)
        self.state = LoopState(os.path.join(self.dir, STATE_FILE))
        self.check()

    # ------------------------------------------------------------------ configuration
    @property
    def trains_policy(self) -> bool:
        """Whether the loop trains its starting policy (start/policy)."""
        return not (self.cfg.loop.policy or self.cfg.checkpoint.load)

    @property
    def trains_reward(self) -> bool:
        """Whether the loop trains the fixed reward model (start/reward_model)."""
        return not (self.cfg.score.model or self.cfg.score.judge_model)

    def check(self) -> None:
        """ConfigError naming the key for a loop that cannot run, before anything is launched."""
        lc = self.cfg.loop
        if lc.rounds < 0:
            raise ConfigError(f"key 'loop.rounds': must be >= 0, got {lc.rounds}")
        for key, path in (("loop.prompts", lc.prompts), ("loop.heldout_prompts", lc.heldout_prompts)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"key '{key}': {path!r} does not exist")
        if not lc.prompts:
            raise ConfigError("key 'loop.prompts' is not set: give a JSONL of prompt records (prompt | messages | "
                              "prompt_ids) to generate from every round")
        bad = [t for t in lc.train if t not in TRAIN_PHASES]
        if bad or len(set(lc.train)) != len(lc.train):
            raise ConfigError(f"key 'loop.train': {lc.train!r}: a list of distinct phases among "
                              f"{', '.join(TRAIN_PHASES)} (in the order they run)")
        if self.trains_policy and not lc.start_policy:
            raise ConfigError("no starting policy: set loop.policy (or checkpoint.load) to a checkpoint of ours, or "
                              "loop.start_policy to a config fragment that trains one (e.g. {data: {train_path: "
                              "sft.jsonl}})")
        if self.trains_reward and not lc.start_reward:
            raise ConfigError("no scorer: set score.model (a reward model of ours) or score.judge_model, or "
                              "loop.start_reward to a config fragment that trains the reward model")
        for key, path in (("loop.policy", lc.policy), ("score.model", self.cfg.score.model),
                          ("score.judge_model", self.cfg.score.judge_model)):
            if path and not os.path.exists(path):
                raise ConfigError(f"key '{key}': checkpoint {path!r} does not exist")
        for i, path in enumerate(lc.committee):
            if not os.path.exists(path):
                raise ConfigError(f"key 'loop.committee[{i}]': checkpoint {path!r} does not exist")
        self.filter_settings = loop_data.filter_settings(lc.filter)
        if lc.pairs not in ("best-vs-worst", "all-pairs"):
            raise ConfigError(f"key 'loop.pairs': {lc.pairs!r} is not one of best-vs-worst, all-pairs")
        if lc.evaluate:
            import importlib.util
            if importlib.util.find_spec("lm_eval") is None:
                raise ConfigError("key 'loop.evaluate': tools/evaluate.py needs lm-evaluation-harness: "
                                  "pip install lm-eval (or set loop.evaluate: false)")
        # Every training phase's config must load now, not hours later (placeholders for paths made later).
        from megatron.engines.run_config import load_run_config
        from megatron.training.launcher import world_size_for
        world = world_size_for(self.cfg)
        names = ([("start/policy", "start_policy")] if self.trains_policy else []) + \
                ([("start/reward_model", "start_reward")] if self.trains_reward else []) + \
                [(f"round_0/{t}", t) for t in lc.train]
        for name, which in names:
            sets = self.train_sets(which, "/placeholder/data.jsonl", "/placeholder/ck", self.dir)
            try:
                load_run_config(self.files, sets, world_size=world)
            except ConfigError as exc:
                raise ConfigError(f"phase {name} (loop.{which} fragment): {exc}") from None

    # ------------------------------------------------------------------ paths
    def rdir(self, r: int, *parts: str) -> str:
        """A path under round r's folder."""
        return os.path.join(self.dir, f"round_{r}", *parts)

    def phase_dir(self, name: str) -> str:
        """The folder of phase `name` (its log, and a training phase's checkpoints and metrics)."""
        return os.path.join(self.dir, *name.split("/"))

    def policy(self, r: int) -> str:
        """The checkpoint that generates round r: the start for round 0, else the last checkpoint trained in
        round r - 1 (a skipped training phase carries the policy over)."""
        if r == 0:
            if self.trains_policy:
                return self.state.info("start/policy")["checkpoint"]
            return os.path.abspath(self.cfg.loop.policy or self.cfg.checkpoint.load)
        for which in reversed(self.cfg.loop.train):
            ck = self.state.info(f"round_{r - 1}/{which}").get("checkpoint")
            if ck:
                return ck
        return self.policy(r - 1)

    def scorer_sets(self) -> List[str]:
        """--set pairs naming the fixed scorer."""
        if self.trains_reward:
            return [f"score.model={self.state.info('start/reward_model')['checkpoint']}"]
        return []  # score.model / score.judge_model from the config itself

    # ------------------------------------------------------------------ launches
    def train_sets(self, which: str, data: str, init: Optional[str], out_dir: str) -> List[str]:
        """--set pairs of a training phase: defaults, the fragment, the command line, then the loop's own keys."""
        lc = self.cfg.loop
        fragment = {"start_policy": lc.start_policy, "start_reward": lc.start_reward, "sft": lc.sft,
                    "preference": lc.preference}[which]
        defaults: List[str] = []
        objective = fragment.get("objective", {}) if isinstance(fragment, dict) else {}
        if which == "preference" and "name" not in objective:
            defaults = ["objective.name=rpo", "objective.loss_type=bwd_kl"]
        elif which == "start_reward" and "name" not in objective:
            defaults = ["objective.name=rm"]
        own = [f"checkpoint.save={os.path.join(out_dir, 'checkpoints')}", f"logging.dir={out_dir}"]
        if which in TRAIN_PHASES:
            own = [f"objective.name={'sft' if which == 'sft' else objective.get('name', 'rpo')}",
                   f"data.train_path={data}", "data.valid_path=null", "train.eval_interval=0",
                   f"checkpoint.load={init}"] + own
        return defaults + flatten_fragment(fragment, f"loop.{which}") + self.overrides + own

    def launch(self, name: str, script: str, sets: List[str], python_only: bool = False) -> None:
        """Run `deepy.py script CONFIG... --set sets` (or the script alone), log to the phase dir; LoopError on
        failure naming the log and showing its tail."""
        out = self.phase_dir(name)
        os.makedirs(out, exist_ok=True)
        log = os.path.join(out, name.split("/")[-1] + ".log")
        head = [sys.executable, SCRIPTS[script]] if python_only else [sys.executable, DEEPY, SCRIPTS[script]]
        cmd = head + self.files + (["--set", *sets] if sets else [])
        self.state.phases[name]["command"] = cmd
        self.state.save()
        self.echo(f"[iterate] {name}: {' '.join(os.path.relpath(c) if c.startswith(REPO) else c for c in cmd[1:4])} "
                  f"... (log: {log})")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        with open(log, "w", encoding="utf-8") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            try:
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                raise
        if rc != 0:
            with open(log, encoding="utf-8", errors="replace") as fh:
                tail = fh.readlines()[-25:]
            raise LoopError(f"phase {name} failed (exit code {rc}); its log {log} ends with:\n" + "".join(tail))

    # ------------------------------------------------------------------ phases
    def plan(self) -> List[Phase]:
        """Every phase of `loop.rounds` rounds, in order."""
        lc = self.cfg.loop
        prompts = os.path.join(self.dir, "prompts.jsonl")
        phases = [Phase("prompts", "data", lambda: loop_data.write_prompts(lc.prompts, lc.heldout_prompts, prompts),
                        lambda: [prompts])]
        if self.trains_policy:
            phases.append(self._train_phase("start/policy", "start_policy", None, None))
        if self.trains_reward:
            phases.append(self._train_phase("start/reward_model", "start_reward", None, None))
        for r in range(lc.rounds + 1):
            phases += self._round(r, prompts)
        return phases

    def _train_phase(self, name: str, which: str, data: Optional[str], init: Optional[Callable[[], str]]) -> Phase:
        out = self.phase_dir(name)

        def run() -> Dict[str, Any]:
            if data is not None:
                with open(data, encoding="utf-8") as fh:
                    n = sum(1 for line in fh if line.strip())
                if n == 0:
                    self.echo(f"[iterate] {name}: {data} holds no records; skipped (the policy carries over)")
                    return {"skipped": f"no records in {data}"}
            self.launch(name, "train", self.train_sets(which, data or "", init() if init else None, out))
            return {"checkpoint": os.path.join(out, "checkpoints")}

        def outputs() -> List[str]:
            ck = self.state.info(name).get("checkpoint")
            return [os.path.join(ck, "latest")] if ck else []
        return Phase(name, "launch", run, outputs)

    def _round(self, r: int, prompts: str) -> List[Phase]:
        lc = self.cfg.loop
        rd = lambda *p: self.rdir(r, *p)  # noqa: E731
        gens = [("policy", rd("generated.jsonl"), lambda: self.policy(r))]
        gens += [(f"committee_{k}", rd(f"generated_c{k}.jsonl"), (lambda path=path: os.path.abspath(path)))
                 for k, path in enumerate(lc.committee)]
        phases = []
        for gname, out, ckpt in gens:
            name = f"round_{r}/generate" + ("" if gname == "policy" else f"_c{gname.split('_')[1]}")

            def gen(name=name, out=out, ckpt=ckpt):
                self.launch(name, "generate", self.overrides + [
                    f"checkpoint.load={ckpt()}", f"generation.input={prompts}", f"generation.output={out}",
                    f"logging.dir={self.phase_dir(name)}"])
                return {"checkpoint": ckpt()}
            phases.append(Phase(name, "launch", gen, lambda out=out: [out]))
        merged, scored = rd("generated_all.jsonl"), rd("scored.jsonl")
        phases.append(Phase(f"round_{r}/merge", "data",
                            lambda: loop_data.merge_generations([(g, o) for g, o, _ in gens], merged),
                            lambda: [merged]))

        def score():
            name = f"round_{r}/score"
            self.launch(name, "score", self.overrides + self.scorer_sets() + [
                f"score.input={merged}", f"score.output={scored}", f"logging.dir={self.phase_dir(name)}"])
            with open(scored + ".report.json", encoding="utf-8") as fh:
                rep = json.load(fh)
            return {"scored": rep["scored"], "unscored": rep["unscored"]["counts"], "stats": rep["stats"]}
        phases.append(Phase(f"round_{r}/score", "launch", score, lambda: [scored]))
        samples, heldout = rd("samples.jsonl"), rd("heldout.jsonl")
        phases.append(Phase(f"round_{r}/split", "data", lambda: loop_data.split_scored(scored, samples, heldout),
                            lambda: [samples, heldout]))
        filtered = rd("filtered.jsonl")
        phases.append(Phase(f"round_{r}/filter", "data",
                            lambda: {"report": loop_data.filter_round(samples, filtered, self.filter_settings)},
                            lambda: [filtered]))
        sft, pairs = rd("sft.jsonl"), rd("pairs.jsonl")
        phases.append(Phase(f"round_{r}/select", "data",
                            lambda: loop_data.select_round(filtered, sft, pairs, lc.pairs, lc.min_margin),
                            lambda: [sft, pairs]))
        evaluation = rd("eval.json")
        if lc.evaluate:
            def evaluate():
                name = f"round_{r}/evaluate"
                self.launch(name, "evaluate", self.overrides + [
                    f"evaluate.model={self.policy(r)}", f"evaluate.output={evaluation}",
                    f"logging.dir={self.phase_dir(name)}"], python_only=True)
                return {}
            phases.append(Phase(f"round_{r}/evaluate", "launch", evaluate, lambda: [evaluation]))
        phases.append(Phase(f"round_{r}/report", "data", lambda: self._report(r), lambda: []))
        if r < lc.rounds:
            prev: Callable[[], str] = lambda: self.policy(r)  # noqa: E731
            for which in lc.train:
                data = sft if which == "sft" else pairs
                phases.append(self._train_phase(f"round_{r}/{which}", which, data, prev))
                prev = (lambda which=which, prev=prev: self.state.info(f"round_{r}/{which}").get("checkpoint")
                        or prev())
        return phases

    def _report(self, r: int) -> Dict[str, Any]:
        lc = self.cfg.loop
        evaluation = None
        if lc.evaluate and os.path.isfile(self.rdir(r, "eval.json")):
            with open(self.rdir(r, "eval.json"), encoding="utf-8") as fh:
                evaluation = json.load(fh).get("results", {})
        row = loop_report.round_row(
            r, self.policy(r), self.rdir(r, "samples.jsonl"),
            self.rdir(r, "heldout.jsonl") if lc.heldout_prompts else None,
            self.rdir(r - 1, "heldout.jsonl") if lc.heldout_prompts and r > 0 else None,
            self.state.info(f"round_{r}/filter")["report"], self.state.info(f"round_{r}/select"), evaluation)
        self.state.phases[f"round_{r}/report"]["info"] = {"row": row}  # write_rounds reads every row from the state
        self.write_rounds()
        return {"row": row}

    def rows(self) -> List[Dict[str, Any]]:
        """The rows of every round reported so far."""
        return [rec["info"]["row"] for name, rec in self.state.phases.items()
                if name.endswith("/report") and rec.get("info", {}).get("row")]

    def write_rounds(self) -> None:
        """Rewrite D/rounds.jsonl from the state and redraw D/rounds.png."""
        path = os.path.join(self.dir, "rounds.jsonl")
        loop_report.write_rounds(path, self.rows())
        if self.plot is not None:
            try:
                self.plot(path, os.path.join(self.dir, "rounds.png"))
            except Exception as exc:  # noqa: BLE001  (a missing matplotlib must not stop the loop)
                self.echo(f"[iterate] warning: could not draw {os.path.join(self.dir, 'rounds.png')}: {exc}")

    # ------------------------------------------------------------------ running
    def run(self) -> List[Dict[str, Any]]:
        """Run every unfinished phase in order; returns the rows of rounds.jsonl."""
        plan = self.plan()
        redo = False
        ran = 0

        def stop(*_):
            raise _Stop()
        old = signal.signal(signal.SIGTERM, stop)
        try:
            for phase in plan:
                if self.state.done(phase.name) and not redo:
                    missing = [p for p in phase.outputs() if not os.path.exists(p)]
                    if not missing:
                        continue
                    self.echo(f"[iterate] {phase.name}: finished before, but {missing[0]} is missing: running it "
                              "and every later phase again")
                    redo = True
                self.state.start(phase.name)
                try:
                    info = phase.run()
                except _Stop:
                    self.state.fail(phase.name, "stopped by SIGTERM")
                    raise LoopError(f"stopped by SIGTERM during phase {phase.name}; run the same command to resume")
                except LoopError as exc:
                    self.state.fail(phase.name, str(exc).splitlines()[0])
                    raise
                except Exception as exc:
                    self.state.fail(phase.name, f"{type(exc).__name__}: {exc}")
                    raise
                seconds = self.state.finish(phase.name, info)
                ran += 1
                self.echo(f"[iterate] {phase.name}: done in {seconds:.1f} s")
        finally:
            signal.signal(signal.SIGTERM, old)
        if ran == 0:
            self.echo(f"[iterate] nothing to do: every phase of {self.cfg.loop.rounds} round(s) is finished "
                      f"({os.path.join(self.dir, STATE_FILE)})")
            if not os.path.isfile(os.path.join(self.dir, "rounds.jsonl")):  # deleted by hand: the state has the rows
                self.write_rounds()
        return self.rows()

    def status(self) -> List[str]:
        """One line per phase: done / to run (for --plan)."""
        lines = []
        for phase in self.plan():
            rec = self.state.phases.get(phase.name, {})
            lines.append(f"{phase.name:<28} {rec.get('status', 'to run'):<8} {rec.get('seconds', ''):>8}")
        return lines

