"""The phases of one online RL step (docs/ARCHITECTURE.md, `training/online`), each a function:

    generate_rollouts    the policy's shards generate rollout.num_generations completions per prompt
    score_rollouts       reward sources -> total rewards (weights, DAPO overlong penalty, dynamic sampling)
    prepare_experience   pack into micro-batches; reference log-probs, critic values, old log-probs (generator's or
                         recomputed); advantages; per-token fields of every micro-batch
    train_on_experience  rollout.epochs passes of rollout.minibatches optimizer steps (policy, and critic for PPO)

Old log-probs: the generator's log-probs are used as the rollout policy's when they match the training forward
(same weights, same precision: the first step of every launch compares them and logs `generate/logprob_diff_max`
and NeMo-RL's `generate/token_mult_prob_error` = mean exp|diff|); otherwise the loop recomputes them with a
no-grad training forward each step, and `rollout.importance_correction` weights the loss by the truncated ratio
min(pi_old / pi_generator, rollout.importance_cap). A single on-policy update (epochs x minibatches = 1, no
correction) needs no old log-probs at all: the ratio is the current log-probs over themselves, detached.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.engines.forward import batch_to
from megatron.engines.grad_norm import global_grad_norm
from megatron.engines.token_forward import token_logps, token_values
from megatron.generation import generate
from megatron.objectives.advantages import varying_groups
from megatron.objectives.aggregation import GLOBAL_COUNTS, global_counts
from megatron.objectives.pg_loss import kl_penalty, truncated_is_weights
from megatron.objectives.token_stats import token_stats
from megatron.rewards import RewardError, overlong_penalty

from .experience import Rollouts, TokenMap, grid_mask, pack_rollouts, rollout_units, strip_private, to_grid
from .online_metrics import dp_reduce, mean_metrics, rollout_metrics, token_mean
from .rollout import StepPrompt

# Generator and training log-probs "match" when no scored token differs by more than this (nats). fp32 forwards
# of the same weights differ by float round-off (~1e-6); bf16, another kernel or stale weights by far more.
LOGPROB_MATCH_TOL = 1e-3


@dataclass
class OnlineModels:
    """What a step runs on: the policy engine, the frozen reference (None without KL), the critic engine (PPO),
    the objective, the reward set, the tokenizer, sampling parameters and the ids that end a completion."""
    engine: Any
    reference: Any
    critic: Any
    objective: Any
    rewards: Any
    tokenizer: Any
    params: Any
    eos_ids: List[int]


@dataclass
class LogpCheck:
    """Whether the generator's log-probs match the training forward (None until the launch's first step)."""
    matched: Optional[bool] = None


@dataclass
class StepData:
    """A step's rollouts and their texts/columns for the reward functions."""
    rollouts: Rollouts
    prompts: List[Any]
    texts: List[str]
    columns: Dict[str, List[Any]]
    record_index: List[int]


# ------------------------------------------------------------------------------------------------ generation
def generate_rollouts(models: OnlineModels, cfg, ps, prompts: List[StepPrompt]) -> StepData:
    """Generate `params.n` completions of each prompt on this rank (ZeRO-3: the weights gathered once).

    The sampling noise is keyed by (generation.seed, the prompt's stream position, sample index): the same
    completions at any layout and after a resume."""
    out = generate(models.engine, cfg, ps, [p.record.ids for p in prompts], models.params,
                   prompt_indices=[p.position for p in prompts], eos_token_ids=models.eos_ids,
                   batch_size=cfg.generation.batch_size, detokenize=models.tokenizer.decode)
    prompt_ids, comp_ids, logps, groups, texts, prompt_objs, rec_idx = [], [], [], [], [], [], []
    columns: Dict[str, List[Any]] = {k: [] for k in (prompts[0].record.columns if prompts else {})}
    for p, completions in zip(prompts, out):
        for c in completions:
            prompt_ids.append(p.record.ids)
            comp_ids.append(c.token_ids)
            logps.append(c.logprobs)
            groups.append(p.position)
            texts.append(c.text)
            prompt_objs.append(p.record.prompt)
            rec_idx.append(p.record.index)
            for k in columns:
                columns[k].append(p.record.columns.get(k))
    rollouts = Rollouts(prompt_ids=prompt_ids, completion_ids=comp_ids, behaviour_logps=logps,
                        group_ids=torch.tensor(groups, dtype=torch.long),
                        rewards=torch.zeros(len(comp_ids), dtype=torch.float64))
    return StepData(rollouts=rollouts, prompts=prompt_objs, texts=texts, columns=columns, record_index=rec_idx)


# ------------------------------------------------------------------------------------------------ rewards
def _agree_on_error(message: Optional[str]) -> Optional[str]:
    """The first failing rank's message on every rank (collective over the world), or None when none failed: a
    reward error on one rank must stop every rank, not leave the others waiting in a collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    gathered: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)


def score_rollouts(models: OnlineModels, cfg, ps, data: StepData) -> Dict[str, float]:
    """Score the step's completions (fills rollouts.rewards and rollouts.keep); returns the reward metrics.

    total = sum of weighted source rewards + DAPO's overlong penalty (rollout.overlong_buffer > 0); completions no
    source scored do not train; with rollout.dynamic_sampling groups whose rewards are all equal do not train.
    A reward source that fails raises RewardError on every rank with the source's one-line message."""
    ro = data.rollouts
    message, scores = None, None
    try:
        scores = models.rewards.score(data.prompts, data.texts, data.columns, token_ids=ro.completion_ids,
                                      prompt_index=data.record_index)
    except RewardError as exc:
        message = str(exc)
    message = _agree_on_error(message)
    if message is not None:
        raise RewardError(message)
    rewards = scores.total.clone()
    rc = cfg.rollout
    if rc.overlong_buffer:
        rewards = rewards + overlong_penalty(ro.lengths, cfg.generation.max_new_tokens, rc.overlong_buffer,
                                             rc.overlong_penalty)
    keep = scores.scored.clone()
    if rc.dynamic_sampling:
        keep &= varying_groups(rewards, ro.group_ids)
    ro.rewards, ro.keep = rewards, keep
    return rollout_metrics(rewards, scores.per_source, ro.lengths, keep, ps)


# ------------------------------------------------------------------------------------------------ experience
def _needs_old_logps(cfg) -> bool:
    """Whether the loss needs explicit old log-probs (several updates per rollout, or importance correction)."""
    return cfg.rollout.epochs * cfg.rollout.minibatches > 1 or cfg.rollout.importance_correction


@torch.no_grad()
def _forward_all(batches, device, fn) -> List[torch.Tensor]:
    """fn(batch on device) for every micro-batch, in order (no grad)."""
    return [fn(batch_to(strip_private(b), device)) for mini in batches for b in mini]


def _fill_grid(batches, outs: List[torch.Tensor], shape) -> torch.Tensor:
    grid = torch.zeros(shape, dtype=torch.float32)
    for b, out in zip((b for mini in batches for b in mini), outs):
        b["_map"].to_grid(out, grid)
    return grid


def prepare_experience(models: OnlineModels, cfg, ps, rollouts: Rollouts, check: LogpCheck, device
                       ) -> Tuple[List[List[Dict[str, torch.Tensor]]], Dict[str, float]]:
    """Pack the rollouts and add the per-token fields the loss needs (module docstring).

    Returns ([minibatch][micro-batch] batches on the CPU, metrics). Collective when a model is (TP, ZeRO-3) and for
    batch-wide advantage statistics (data-parallel group)."""
    width = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
    batches = pack_rollouts(rollouts, cfg.rollout.minibatches, cfg.train.micro_batch_size, cfg.model.max_seq_len,
                            width_multiple=width)
    mask = grid_mask(rollouts)
    N, T = mask.shape
    lengths = rollouts.lengths
    seq_id = torch.where(torch.arange(T)[None, :] < lengths[:, None], torch.arange(N)[:, None], -1)
    behaviour = to_grid(rollouts.behaviour_logps, T)
    metrics: Dict[str, float] = {}

    old = behaviour
    recompute = check.matched is None or (not check.matched and _needs_old_logps(cfg))
    if recompute:
        outs = _forward_all(batches, device, lambda b: token_logps(models.engine, b)[0])
        trained = _fill_grid(batches, outs, (N, T))
        diff = ((trained.double() - behaviour.double()).abs() * mask.double())
        g = dp_reduce({"max": float(diff.max()) if diff.numel() else 0.0}, ps, op="max")
        metrics["generate/logprob_diff_max"] = g["max"]
        metrics["generate/token_mult_prob_error"] = token_mean(torch.exp(diff), mask, ps)
        if check.matched is None:
            check.matched = g["max"] <= LOGPROB_MATCH_TOL
        if not check.matched:
            old = trained
    ref = None
    if models.reference is not None:
        ref = _fill_grid(batches, _forward_all(batches, device, lambda b: token_logps(models.reference, b)[0]),
                         (N, T))
    values = None
    if models.critic is not None:
        values = _fill_grid(batches, _forward_all(batches, device, lambda b: token_values(models.critic, b)),
                            (N, T))
    kl = kl_penalty(old, ref, cfg.objective.kl_estimator) * mask if ref is not None else None
    group = ps.dp_group if ps.dp_size > 1 else None
    adv = models.objective.advantages(rollouts.rewards.float(), rollouts.group_ids, seq_id, mask, kl=kl,
                                      values=values, group=group)
    advantages = adv.advantages.float() * mask
    metrics["advantage/mean"] = token_mean(advantages, mask, ps)

    old_in_batch = _needs_old_logps(cfg)
    correct = cfg.rollout.importance_correction and not check.matched
    for mini in batches:
        for b in mini:
            m: TokenMap = b["_map"]
            b["advantages"] = m.to_batch(advantages)
            if old_in_batch:
                b["old_logps"] = m.to_batch(old)
            if correct:
                b["is_weights"] = truncated_is_weights(m.to_batch(old), m.to_batch(behaviour), b,
                                                       cfg.rollout.importance_cap, cfg.objective.importance_level)
            if ref is not None:
                b["ref_logps"] = m.to_batch(ref)
            if values is not None:
                b["values"] = m.to_batch(values)
                b["returns"] = m.to_batch(adv.returns.float() * mask)
    return batches, metrics


# ------------------------------------------------------------------------------------------------ training
def _update(models: OnlineModels, cfg, ps, mini: List[Dict[str, torch.Tensor]], device) -> Dict[str, float]:
    """One optimizer step of the policy (and the critic) over one minibatch's micro-batches; metrics averaged
    over them (shares of global means: their mean over micro-batches and ranks is the global value)."""
    counts = global_counts([rollout_units(b) for b in mini], ps, device)  # collective (dp group)
    engine, critic, objective = models.engine, models.critic, models.objective
    sums: Dict[str, float] = {}

    def add(key: str, value) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    for raw in mini:
        batch = batch_to(strip_private(raw), device)
        batch[GLOBAL_COUNTS] = counts
        logps, entropy = token_logps(engine, batch, with_entropy=True)
        loss, metrics = objective.loss(token_stats(logps, batch, entropy=entropy), None, batch)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and cfg.parallel.zero_stage == 0:
            add("grad_norm", global_grad_norm(engine.module.parameters(), ps) * len(mini))
        engine.step()
        add("loss", loss.detach())
        for k, v in metrics.items():
            add(k, v)
        if critic is not None:
            vloss, vmetrics = objective.value_loss(token_values(critic, batch), batch)
            critic.backward(vloss)
            critic.step()
            add("critic/loss", vloss.detach())
            for k, v in vmetrics.items():
                add(f"critic/{k}", v)
    out = {k: v / len(mini) for k, v in sums.items()}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        out["grad_norm"] = float(norm)
    return out


def train_on_experience(models: OnlineModels, cfg, ps, batches, device) -> Dict[str, float]:
    """rollout.epochs passes over the minibatches, one optimizer step each; metrics averaged over the updates
    (not yet over data-parallel ranks)."""
    rows = []
    for _ in range(cfg.rollout.epochs):
        for mini in batches:
            rows.append(_update(models, cfg, ps, mini, device))
    return mean_metrics(rows)


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), wall seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
