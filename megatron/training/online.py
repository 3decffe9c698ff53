"""The online RL loop (objectives with batch_kind "rollout": grpo, rloo, reinforce_pp, ppo, mdloo), colocated: the
ranks that train also generate, score and compute reference log-probs, each with its own shards.

    start-up  policy (checkpoint.load weights, any layout) -> DeepSpeed engine; live reference when kl_coef > 0;
              critic engine (PPO); reward sources (functions, reward model); prompts and their sampler
    step      prompts (rollout.prompts_per_step over all data-parallel ranks, all samples of a prompt on one rank)
              -> generate -> rewards -> experience (reference log-probs, values, old log-probs, advantages)
              -> rollout.epochs x rollout.minibatches optimizer steps -> metrics -> checkpoint

`train.iters` counts online steps; each runs epochs x minibatches optimizer steps of `train.global_batch_size`
completions (= prompts_per_step x num_generations / minibatches, checked by the objective). A checkpoint holds the
policy (as the offline loop saves it), the critic's DeepSpeed state in `<tag>/critic/`, the prompts consumed (as
`consumed_samples`) and every rank's RNG: a resumed run draws the same prompts and samples and logs the same
rewards and losses. The phases live in `online_step.py`, prompts in `rollout.py`, packing in `experience.py`.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import torch

from megatron.checkpoint import checkpointing as ckpt
from megatron.config import Config, ConfigError
from megatron.engines.build import build_policy, build_reference, device_for_rank, param_groups, starting_point
from megatron.engines.critic import build_critic, critic_start, load_critic, save_critic
from megatron.engines.deepspeed_config import build_deepspeed_config
from megatron.engines.schedules import lambda_lr_factory
from megatron.generation import SamplingParams
from megatron.mpu import initialize_parallel
from megatron.mpu.distributed import init_distributed
from megatron.objectives import build_objective, get_objective_class, resolve_objective
from megatron.rewards import build_reward_set

from megatron.model.kernels import describe_kernels

from .metrics import MetricsLogger
from .online_metrics import dp_reduce
from .online_step import (LogpCheck, OnlineModels, generate_rollouts, prepare_experience, score_rollouts, timed,
                          train_on_experience)
from .rollout import PromptSampler, load_prompts
from .summary import print_run_summary
from .trainer import Hooks, TrainResult, _mean_over_dp, _StopFlag


def check_online_config(cfg: Config) -> None:
    """Layout limits of the online loop (the objective checked the rollout and reward sections)."""
    if cfg.parallel.pipeline > 1:
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline}: online RL generates with the policy's shards, "
                          "which runs unpipelined; set parallel.pipeline=1 (tensor parallelism, data parallelism "
                          "and ZeRO-3 all work)")


def _eos_ids(tokenizer, cfg) -> list:
    ids = {tokenizer.eos_id}
    if cfg.checkpoint.load:  # a converted Hugging Face model may end turns with other ids too
        import json
        path = os.path.join(cfg.checkpoint.load, "hf", "generation_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                eos = json.load(fh).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def build_models(cfg: Config, ps, init_from: Optional[str], device, tokenizer) -> OnlineModels:
    """Policy engine, reference, critic, objective, reward set and sampling parameters of a run (every rank)."""
    import deepspeed

    objective_cls = get_objective_class(cfg.objective.name)
    optimizer_steps = cfg.train.iters * cfg.rollout.epochs * cfg.rollout.minibatches
    model = build_policy(cfg, ps, init_from)
    reference = build_reference(cfg, ps, model, device, deepspeed)
    ds_cfg = build_deepspeed_config(cfg, use_torch_adam=not torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay),
                                      config=ds_cfg, lr_scheduler=lambda_lr_factory(cfg.optimizer, optimizer_steps),
                                      mpu=ps)
    critic = None
    if objective_cls.uses_critic:
        critic, _ = build_critic(cfg, ps, init_from, deepspeed, optimizer_steps)
    model_source = None
    if cfg.reward.model:
        from megatron.rewards.model import build_reward_model
        model_source = build_reward_model(cfg, ps, deepspeed, device)
    params = SamplingParams.from_config(cfg.generation)
    params.n = cfg.rollout.num_generations
    return OnlineModels(engine=engine, reference=reference, critic=critic, objective=build_objective(cfg, ps),
                        rewards=build_reward_set(cfg, model_source=model_source), tokenizer=tokenizer, params=params,
                        eos_ids=_eos_ids(tokenizer, cfg))


def run_online(cfg: Config, hooks: Optional[Hooks] = None) -> TrainResult:
    """Train `cfg` (an online RL objective, validated) on the current process group; 1..N ranks."""
    from megatron.data import load_tokenizer
    from megatron.data.chat_template import resolve_chat_template

    hooks = hooks or Hooks()
    resolve_objective(cfg)
    if get_objective_class(cfg.objective.name).batch_kind != "rollout":
        raise ConfigError(f"objective '{cfg.objective.name}' trains on a dataset (data.train_path); the online loop "
                          "runs the rollout objectives (grpo, rloo, reinforce_pp, ppo, mdloo)")
    check_online_config(cfg)
    init_distributed(cfg.parallel.backend)
    ps = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    if ps.world_size != cfg.derived.world_size:
        raise ConfigError(f"the config was validated for world size {cfg.derived.world_size} but {ps.world_size} "
                          f"ranks started; launch with launcher.num_gpus * launcher.num_nodes = "
                          f"{cfg.derived.world_size} or re-validate")
    device = device_for_rank()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    template = resolve_chat_template(cfg.data.chat_template, tokenizer.chat_template)
    prompts = load_prompts(cfg, tokenizer, template)

    resume_dir, full_resume, init_from = starting_point(cfg)
    models = build_models(cfg, ps, init_from, device, tokenizer)
    state = ckpt.TrainState()
    if full_resume:
        state = ckpt.load_training_state(resume_dir, cfg, ps, models.engine)
        if models.critic is not None:
            load_critic(models.critic, resume_dir)
    sampler = PromptSampler(prompts, cfg.rollout.prompts_per_step, ps.dp_rank, ps.dp_size, cfg.train.seed,
                            shuffle=cfg.data.shuffle)
    logger = MetricsLogger(cfg, enabled=ps.rank == 0, start_step=state.step)
    logger.message(describe_kernels(cfg))  # which kernel path each op took (model.kernels)
    if models.critic is not None and state.step == 0:
        logger.message(f"critic starts from {critic_start(cfg, init_from)[1]}")
    stop = _StopFlag() if cfg.checkpoint.save_on_sigterm else None
    result = TrainResult(step=state.step)
    check = LogpCheck()

    def save() -> None:
        if not cfg.checkpoint.save:
            return
        tmp = os.path.join(cfg.checkpoint.save, ckpt.tag_for_step(state.step) + ".tmp")  # save_checkpoint's staging

        def commit() -> None:
            if models.critic is not None:
                save_critic(models.critic, tmp)
            if hooks.before_commit:
                hooks.before_commit(state.step)

        ckpt.save_checkpoint(cfg, ps, models.engine, state, extra_meta={"init_from": init_from}, before_commit=commit)
        logger.message(f"saved checkpoint step {state.step} to {cfg.checkpoint.save}")

    models.engine.train()
    if models.critic is not None:
        models.critic.train()
    last_saved = state.step
    try:
        while state.step < cfg.train.iters:
            metrics = online_step(models, cfg, ps, sampler, state.consumed_samples, check, device)
            state.step += 1
            state.consumed_samples += cfg.rollout.prompts_per_step
            metrics["lr"] = models.engine.get_lr()[0]
            if state.step % cfg.train.log_interval == 0 or state.step == cfg.train.iters:
                logger.log(state.step, metrics)
                result.history.append({"step": state.step, **metrics})
            logger.advance()
            if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
                save()
                last_saved = state.step
            requested = hooks.after_step is not None and hooks.after_step(state.step)
            if requested or (stop is not None and stop.agreed(device)):
                logger.message(f"stop requested: saving at step {state.step} and exiting")
                result.stopped_by_signal = True
                break
        if state.step != last_saved:
            save()
    finally:
        if stop is not None:
            stop.restore()
        logger.close()
    result.step = state.step
    if ps.rank == 0:
        print_run_summary(cfg, state.step, result.stopped_by_signal)
    return result


def online_step(models: OnlineModels, cfg: Config, ps, sampler: PromptSampler, consumed: int, check: LogpCheck,
                device) -> Dict[str, float]:
    """One online step on this rank (collective); returns the step's metrics, global over data-parallel ranks."""
    t0 = time.perf_counter()
    data, t_gen = timed(generate_rollouts, models, cfg, ps, sampler.step(consumed))
    reward_metrics, t_score = timed(score_rollouts, models, cfg, ps, data)
    (batches, prep_metrics), t_prep = timed(prepare_experience, models, cfg, ps, data.rollouts, check, device)
    train_metrics, t_train = timed(train_on_experience, models, cfg, ps, batches, device)
    metrics = _mean_over_dp(train_metrics, ps, device)
    metrics.update(reward_metrics)
    metrics.update(prep_metrics)
    gen_tokens = dp_reduce({"tokens": float(data.rollouts.lengths.sum())}, ps)["tokens"]
    times = dp_reduce({"generate": t_gen, "score": t_score, "prepare": t_prep, "train": t_train,
                       "step": time.perf_counter() - t0}, ps, op="max")
    metrics.update({f"time/{k}_s": v for k, v in times.items()})
    metrics["generate/tokens_per_s"] = gen_tokens / max(times["generate"], 1e-9)
    return metrics
