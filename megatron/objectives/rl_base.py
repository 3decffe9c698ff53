"""`RLObjective`: the base of the online RL objectives (grpo, rloo, reinforce_pp, ppo, mdloo).

Each one is a preset of the same two pieces: an advantage estimator (`advantages.py`, run once per step on the
rank's rollouts) and the clipped policy-gradient loss (`pg_loss.py`, run per packed micro-batch). Subclasses set
class attributes only (plus PPO's value loss). They declare `batch_kind = "rollout"`: they train on generated
rollouts, so the offline trainer refuses them and `derived.data_kind` is 'prompts'.

How the online loop uses one (`obj = build_objective(cfg, ps)`):

    adv = obj.advantages(rewards[N], group_ids[N], seq_id, mask, kl=..., values=..., group=ps.dp_group)
    ... lay the rollouts out as packed micro-batches with per-token old_logps / ref_logps / advantages ...
    loss, metrics = obj.loss(token_stats(token_logps, batch, entropy=...), None, batch)

`kl` is the per-token `pg_loss.kl_penalty(old_logps, ref_logps, cfg.kl_estimator)` at rollout time; `advantages`
uses it only when the objective's KL is in the reward (`kl_in_reward`), and then the loss has no KL term.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from megatron.config import ConfigError
from megatron.config.schema import ObjectiveConfig

from .advantages import SCALE_REWARDS, AdvantageOutput, compute_advantages
from .base import Objective
from .pg_loss import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_AGG_MODES, PGLossConfig, policy_gradient_loss
from .token_stats import TokenStats

# keys every RL objective reads; CLIP_KEYS only the clipped ones (not mdloo)
COMMON_KEYS = ("name", "kl_coef", "kl_estimator", "kl_in_reward", "loss_agg", "loss_norm_len", "entropy_coef")
CLIP_KEYS = ("clip_low", "clip_high", "importance_level")
MDLOO_DEFAULT_ROLLOUT_KL = 0.1


def _choice(obj: ObjectiveConfig, key: str, choices) -> None:
    value = getattr(obj, key)
    if value not in choices:
        from megatron.config.load import _suggest
        raise ConfigError(f"key 'objective.{key}': {value!r} is not one of {', '.join(choices)}"
                          f"{_suggest(str(value), choices)}")


def _range(ok: bool, key: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"key '{key}': must be {want}, got {value!r}")


class RLObjective(Objective):
    """Base of the online RL objectives.

    Class attributes (set by subclasses):
      estimator: the registered advantage estimator (`advantages.py`).
      clipped: the ratio is clipped (PPO surrogate); False: `-rho A` plus the KL to the rollout policy (MDPO).
      kl_in_reward_default: where the KL to the reference goes when `objective.kl_in_reward` is None.
      min_group: the smallest `rollout.num_generations` the estimator works with (2 for group baselines).
      uses_critic: PPO: a separate value model with its own engine (`value_loss`).
    """

    batch_kind = "rollout"
    estimator: str = ""
    clipped: bool = True
    kl_in_reward_default: bool = False
    min_group: int = 2
    uses_critic: bool = False
    allowed_keys: Tuple[str, ...] = COMMON_KEYS + CLIP_KEYS

    # ------------------------------------------------------------------------------ configuration
    @classmethod
    def needs_reference(cls, obj_cfg: ObjectiveConfig) -> bool:
        """A reference model is needed exactly when kl_coef > 0."""
        return obj_cfg.kl_coef > 0

    @classmethod
    def kl_in_reward(cls, obj_cfg: ObjectiveConfig) -> bool:
        """Whether the KL to the reference is part of the reward (advantages) rather than of the loss."""
        return cls.kl_in_reward_default if obj_cfg.kl_in_reward is None else bool(obj_cfg.kl_in_reward)

    @classmethod
    def group_size_needed(cls, obj_cfg: ObjectiveConfig) -> int:
        """Smallest rollout.num_generations that gives a learning signal (2 for group/leave-one-out baselines)."""
        return cls.min_group

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Check the objective keys, the rollout and reward sections and the reference/model settings.

        Fills `objective.loss_norm_len` from `generation.max_new_tokens` when seq_mean_token_sum_norm needs it.
        """
        obj = cfg.objective
        defaults = ObjectiveConfig()
        for f in dataclasses.fields(obj):
            if f.name not in cls.allowed_keys and getattr(obj, f.name) != getattr(defaults, f.name):
                raise ConfigError(
                    f"key 'objective.{f.name}': objective '{cls.name}' does not use it (got "
                    f"{getattr(obj, f.name)!r}); remove it. Keys of '{cls.name}': {', '.join(cls.allowed_keys)}")
        _choice(obj, "loss_agg", LOSS_AGG_MODES)
        _choice(obj, "kl_estimator", KL_ESTIMATORS)
        _choice(obj, "importance_level", IMPORTANCE_LEVELS)
        _choice(obj, "scale_rewards", SCALE_REWARDS)
        _range(0.0 <= obj.clip_low < 1.0, "objective.clip_low", obj.clip_low, "in [0, 1)")
        _range(obj.clip_high is None or obj.clip_high >= 0, "objective.clip_high", obj.clip_high, ">= 0 (or null)")
        for key in ("kl_coef", "entropy_coef"):
            _range(getattr(obj, key) >= 0, f"objective.{key}", getattr(obj, key), ">= 0")
        if obj.importance_level == "sequence" and obj.loss_agg != "seq_mean_token_mean":
            raise ConfigError(f"key 'objective.loss_agg': importance_level=sequence (GSPO) optimises a mean over "
                              f"sequences; set objective.loss_agg=seq_mean_token_mean (got {obj.loss_agg})")
        if obj.loss_agg == "seq_mean_token_sum_norm" and obj.loss_norm_len is None:
            max_new = getattr(getattr(cfg, "generation", None), "max_new_tokens", None)
            if not max_new:
                raise ConfigError("key 'objective.loss_norm_len': loss_agg=seq_mean_token_sum_norm divides by a "
                                  "constant length; set it (e.g. to the generation budget)")
            obj.loss_norm_len = int(max_new)
        _range(obj.loss_norm_len is None or obj.loss_norm_len > 0, "objective.loss_norm_len", obj.loss_norm_len, "> 0")
        if cfg.reference.mode == "precomputed":
            raise ConfigError(f"key 'reference.mode': objective '{cls.name}' scores freshly generated completions, "
                              "so reference log-probs cannot be precomputed; set reference.mode=auto or live")
        if not cls.needs_reference(obj) and cfg.reference.mode == "live":
            raise ConfigError("key 'reference.mode': objective.kl_coef is 0, so a live reference would never be "
                              "used; set reference.mode=auto or none, or objective.kl_coef > 0")
        if cfg.model.value_head:
            raise ConfigError(f"key 'model.value_head': objective '{cls.name}' trains the policy's language-model "
                              "head (a PPO critic is a separate model); set model.value_head=false")
        cls._validate_rollout(cfg)
        cls._validate_reward(cfg)

    @classmethod
    def _validate_rollout(cls, cfg: Any) -> None:
        ro, obj = cfg.rollout, cfg.objective
        if not ro.prompts_path:
            raise ConfigError(f"key 'rollout.prompts_path': objective '{cls.name}' generates from prompts; set it "
                              "to a file of prompt records")
        for key in ("num_generations", "prompts_per_step", "epochs", "minibatches"):
            _range(getattr(ro, key) >= 1, f"rollout.{key}", getattr(ro, key), ">= 1")
        need = cls.group_size_needed(obj)
        if ro.num_generations < need:
            raise ConfigError(f"key 'rollout.num_generations': objective '{cls.name}' compares the completions of a "
                              f"prompt with each other, so it needs >= {need}, got {ro.num_generations}")
        completions = ro.prompts_per_step * ro.num_generations
        if completions % ro.minibatches or completions // ro.minibatches != cfg.train.global_batch_size:
            raise ConfigError(
                f"key 'train.global_batch_size': counts completions per optimizer step = rollout.prompts_per_step x "
                f"rollout.num_generations / rollout.minibatches = {ro.prompts_per_step} x {ro.num_generations} / "
                f"{ro.minibatches} = {completions / ro.minibatches:g}, but it is {cfg.train.global_batch_size}; make "
                "them agree")
        dp = max(int(getattr(cfg.derived, "data_parallel", 1) or 1), 1)
        if ro.prompts_per_step % dp:
            raise ConfigError(f"key 'rollout.prompts_per_step': {ro.prompts_per_step} prompts cannot be split over "
                              f"{dp} data-parallel ranks (all completions of a prompt stay on one rank); use a "
                              f"multiple of {dp}")
        _range(ro.importance_cap > 0, "rollout.importance_cap", ro.importance_cap, "> 0")
        _range(ro.overlong_buffer >= 0, "rollout.overlong_buffer", ro.overlong_buffer, ">= 0")
        _range(ro.overlong_penalty >= 0, "rollout.overlong_penalty", ro.overlong_penalty, ">= 0")
        gen = getattr(cfg, "generation", None)
        max_new = getattr(gen, "max_new_tokens", None)
        if ro.overlong_buffer and max_new is not None and ro.overlong_buffer >= max_new:
            raise ConfigError(f"key 'rollout.overlong_buffer': {ro.overlong_buffer} must be below "
                              f"generation.max_new_tokens={max_new} (it is the last stretch before the limit)")
        if gen is not None and getattr(gen, "n", 1) not in (1, ro.num_generations):
            raise ConfigError(f"key 'generation.n': online rollouts draw rollout.num_generations="
                              f"{ro.num_generations} completions per prompt; leave generation.n at 1 (got {gen.n})")
        if ro.dynamic_sampling and cls.group_size_needed(obj) < 2:
            raise ConfigError(f"key 'rollout.dynamic_sampling': objective '{cls.name}' has no group baseline, so "
                              "groups with equal rewards still carry a signal; set it to false")

    @classmethod
    def _validate_reward(cls, cfg: Any) -> None:
        rw = cfg.reward
        sources = len(rw.function) + (1 if rw.model else 0)
        if sources == 0:
            raise ConfigError(f"section 'reward': objective '{cls.name}' needs a reward; set reward.function "
                              "(exact_match, math or path/to/file.py:name, a list) and/or reward.model")
        if rw.weights and len(rw.weights) != sources:
            raise ConfigError(f"key 'reward.weights': {len(rw.weights)} weights for {sources} reward sources "
                              f"({', '.join(list(rw.function) + ([f'model {rw.model}'] if rw.model else []))}); "
                              "give one per function, then one for the model, or none")

    # ------------------------------------------------------------------------------ the two pieces
    def pg_config(self) -> PGLossConfig:
        """The policy-gradient loss flags of this objective's config."""
        obj = self.cfg
        in_reward = self.kl_in_reward(obj)
        rollout_kl = 0.0
        if not self.clipped:
            rollout_kl = MDLOO_DEFAULT_ROLLOUT_KL if obj.rollout_kl_coef is None else obj.rollout_kl_coef
        return PGLossConfig(
            clip=self.clipped, clip_low=obj.clip_low,
            clip_high=obj.clip_low if obj.clip_high is None else obj.clip_high,
            importance_level=obj.importance_level, loss_agg=obj.loss_agg, norm_len=obj.loss_norm_len,
            kl_coef=0.0 if in_reward else obj.kl_coef, kl_estimator=obj.kl_estimator, rollout_kl_coef=rollout_kl,
            entropy_coef=obj.entropy_coef)

    @property
    def needs_entropy(self) -> bool:
        """Whether `loss` needs the policy's per-token entropy (TokenStats.entropy)."""
        return self.cfg.entropy_coef > 0

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, seq_id: torch.Tensor, mask: torch.Tensor,
                   *, kl: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
                   group: Any = None, impl: str = "vectorised") -> AdvantageOutput:
        """This objective's advantages (`advantages.py` signature). `kl` (per token, at rollout time) is used only
        when the KL is in the reward; `group` is the data-parallel group for batch-wide statistics."""
        use_kl = kl if (self.kl_in_reward(self.cfg) and self.cfg.kl_coef > 0) else None
        return compute_advantages(self.estimator, rewards, group_ids, seq_id, mask, self.cfg, kl=use_kl,
                                  values=values, group=group, impl=impl)

    def loss(self, policy: TokenStats, reference: Optional[TokenStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Policy-gradient loss of one rollout micro-batch (keys in `pg_loss.policy_gradient_loss`).

        policy: TokenStats of the policy forward; reference: None (reference log-probs come per token in
        batch['ref_logps']) or the TokenStats of a live reference forward. Returns (0-dim loss share, metrics).
        """
        if not isinstance(policy, TokenStats):
            raise TypeError(f"objective '{self.name}' is token-level: pass TokenStats (objectives.token_stats), "
                            f"not {type(policy).__name__}")
        ref = reference.logps.detach() if reference is not None else None
        return policy_gradient_loss(policy, batch, self.pg_config(), ref_logps=ref)
