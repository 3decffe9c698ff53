"""One clipped policy-gradient loss for every online RL objective (grpo, rloo, reinforce_pp, ppo, mdloo).

Per scored token t of sequence i, with the policy's log-prob logp, the rollout policy's old_logp (the training
forward when the samples were drawn) and the advantage A:

    log_rho = logp - old_logp                        importance_level token
            = mean over the tokens of i of (logp - old_logp)    importance_level sequence (GSPO: the geometric
              mean ratio per sequence; A is the sequence's mean advantage)
    rho     = exp(log_rho)
    pg      = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)      clipped surrogate (PPO; DAPO clip-higher
                                                                         when clip_high > clip_low)
            = -rho A                                                     clip=False (MDPO / REINFORCE)
    pg     *= w      truncated importance weight against the behaviour policy (`is_weights`, when given)
    loss_t  = pg + kl_coef * KL_t(pi || ref) + rollout_kl_coef * (rho log rho - rho + 1) - entropy_coef * H_t
    loss    = agg(loss_t)   over the scored tokens, mode `loss_agg` (`aggregation.agg_token_loss`: global-batch
              token or sequence denominators when the loop provides them)

KL estimators of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL divergence"), with
log_r = ref_logp - logp: k1 = -log_r, k2 = log_r^2 / 2, k3 = exp(log_r) - 1 - log_r (log_r clamped to +-20 first,
as verl does, so exp cannot overflow). `rho log rho - rho + 1` estimates KL(pi || pi_old) from samples of pi_old:
non-negative, unbiased, and its gradient vanishes at rho = 1 (the mirror-descent regulariser of MDPO, Tomar et al.
2020, arXiv:2005.09814).

Papers: PPO, Schulman et al. 2017 (arXiv:1707.06347); GRPO, Shao et al. 2024 (arXiv:2402.03300); DAPO, Yu et al. 2025
(arXiv:2503.14476); Dr. GRPO, Liu et al. 2025 (arXiv:2503.20783); GSPO, Zheng et al. 2025 (arXiv:2507.18071);
truncated importance sampling, Yao et al. 2025 ("Your efficient RL framework secretly brings you off-policy RL
training").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch

from .aggregation import agg_token_loss, global_mean
from .token_stats import TokenStats, per_token, scored_mask, seq_mean

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_LOG_RATIO_CLAMP = 20.0  # |log(ref/pi)| bound inside k3 and |log rho| bound inside exp


@dataclass(frozen=True)
class PGLossConfig:
    """The flags of `policy_gradient_loss` (built by each RL objective from its `objective.*` keys).

    clip: clip the ratio (PPO surrogate); False gives the plain `-rho A` (MDPO, REINFORCE).
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO: clip_high > clip_low).
    importance_level: token | sequence (GSPO). loss_agg: one of LOSS_AGG_MODES; norm_len: the constant length of
    seq_mean_token_sum_norm (Dr. GRPO: the generation budget, in tokens).
    kl_coef / kl_estimator: KL to the reference inside the loss (0 when the objective puts it in the reward).
    rollout_kl_coef: weight of the KL to the rollout policy (MDPO). entropy_coef: entropy bonus weight.
    """

    clip: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    importance_level: str = "token"
    loss_agg: str = "token_mean"
    norm_len: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    rollout_kl_coef: float = 0.0
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        """Reject bad combinations with a ValueError naming the flag (objectives raise ConfigErrors earlier)."""
        if self.importance_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"PGLossConfig.importance_level: {self.importance_level!r} is not one of "
                             f"{', '.join(IMPORTANCE_LEVELS)}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"PGLossConfig.loss_agg: {self.loss_agg!r} is not one of {', '.join(LOSS_AGG_MODES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PGLossConfig.kl_estimator: {self.kl_estimator!r} is not one of "
                             f"{', '.join(KL_ESTIMATORS)}")
        if self.clip and not (0.0 <= self.clip_low < 1.0 and self.clip_high >= 0.0):
            raise ValueError(f"PGLossConfig: need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, "
                             f"{self.clip_high}")
        if self.loss_agg == "seq_mean_token_sum_norm" and not (self.norm_len and self.norm_len > 0):
            raise ValueError("PGLossConfig: loss_agg seq_mean_token_sum_norm needs norm_len > 0")
        if self.importance_level == "sequence" and self.loss_agg != "seq_mean_token_mean":
            raise ValueError("PGLossConfig: importance_level sequence (GSPO) optimises a mean over sequences; "
                             f"loss_agg must be seq_mean_token_mean, got {self.loss_agg}")
        for key in ("kl_coef", "rollout_kl_coef", "entropy_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"PGLossConfig.{key} must be >= 0, got {getattr(self, key)}")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman's k1 | k2 | k3).

    Args: logps, ref_logps Float[*] (nats, same shape), estimator 'k1' | 'k2' | 'k3'.
    Returns Float[*] (nats), differentiable in both inputs: k1 = logps - ref_logps, k2 = (logps - ref_logps)^2 / 2,
    k3 = exp(ref_logps - logps) - 1 - (ref_logps - logps) with the log-ratio clamped to +-20.
    """
    log_r = ref_logps - logps
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    if estimator == "k3":
        log_r = log_r.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; one of {', '.join(KL_ESTIMATORS)}")


def truncated_is_weights(old_logps: torch.Tensor, behaviour_logps: torch.Tensor, batch: Mapping[str, torch.Tensor],
                         cap: float, level: str = "token") -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_behaviour, cap) for samples drawn by a generator whose
    log-probs differ from the training forward's (Yao et al. 2025).

    Args: old_logps, behaviour_logps Float[B,S] (nats: the training forward's and the generator's log-probs of the
    sampled tokens), the micro-batch (loss_mask, seq_id), cap > 0, level 'token' or 'sequence' (the geometric-mean
    ratio of each sequence, for GSPO). Returns detached Float[B,S], 0 at unscored positions; the loop puts it in the
    rollout batch as `is_weights`.
    """
    if not cap > 0:
        raise ValueError(f"truncated_is_weights: cap must be > 0, got {cap}")
    mask = scored_mask(batch, old_logps)
    log_w = torch.where(mask > 0, (old_logps - behaviour_logps).detach(), torch.zeros((), dtype=old_logps.dtype))
    if level == "sequence":
        log_w = per_token(seq_mean(log_w, batch), batch)
    elif level != "token":
        raise ValueError(f"truncated_is_weights: level {level!r} is not one of {', '.join(IMPORTANCE_LEVELS)}")
    w = torch.exp(log_w.clamp(max=KL_LOG_RATIO_CLAMP)).clamp(max=cap)
    return (w * mask).to(old_logps.dtype)


def _token_field(batch: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """`batch[key]` as a per-token Float[B,S] on `like`'s device/dtype; a clear error for a missing or misshaped one."""
    if key not in batch:
        raise KeyError(f"rollout micro-batch has no '{key}' (Float[B,S], per token); the online loop adds it")
    t = batch[key]
    if tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"rollout micro-batch '{key}' has shape {tuple(t.shape)}, expected per-token "
                         f"{tuple(like.shape)} like loss_mask")
    return t.to(device=like.device, dtype=like.dtype)


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask > 0, else 0: unscored positions (padding, prompts) never reach exp() or the gradients."""
    return torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def policy_gradient_loss(policy: TokenStats, batch: Mapping[str, torch.Tensor], cfg: PGLossConfig,
                         ref_logps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss of one rollout micro-batch (formulas in the module docstring).

    Args:
      policy: TokenStats of the policy forward (logps Float[B,S]; entropy Float[B,S] when entropy_coef > 0).
      batch: the rollout micro-batch: `advantages` Float[B,S] (required), `old_logps` Float[B,S] (absent: the
        current log-probs, detached: one on-policy update), `ref_logps` Float[B,S] (when cfg.kl_coef > 0; also
        gives the `kl` metric when present), `is_weights` Float[B,S] (optional truncated IS weights), and the
        aggregation's `global_counts` (optional).
      cfg: PGLossConfig. ref_logps: overrides batch['ref_logps'] (a live reference forward).
    Returns:
      (loss 0-dim, this micro-batch's share of the global-batch loss; metrics of detached 0-dim shares of global
      token means: pg_loss, clip_fraction, clip_fraction/low, clip_fraction/high, ratio/mean, plus kl (with
      reference log-probs), rollout_kl (rollout_kl_coef > 0) and entropy (with policy.entropy)).
    """
    logps = policy.logps
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(dtype)
    mask = scored_mask(batch, logps)
    logps = _masked(logps, mask)
    adv = _masked(_token_field(batch, "advantages", logps), mask)
    old = _masked(_token_field(batch, "old_logps", logps), mask) if "old_logps" in batch else logps.detach()

    log_rho = logps - old
    if cfg.importance_level == "sequence":
        log_rho = per_token(seq_mean(log_rho, batch), batch)
        adv = per_token(seq_mean(adv, batch), batch)
    rho = torch.exp(log_rho.clamp(max=KL_LOG_RATIO_CLAMP))
    if cfg.clip:
        clipped = rho.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
        pg = torch.maximum(-rho * adv, -clipped * adv)
        low = ((rho < 1.0 - cfg.clip_low) & (adv < 0)).to(dtype)
        high = ((rho > 1.0 + cfg.clip_high) & (adv > 0)).to(dtype)
    else:
        pg = -rho * adv
        low = high = torch.zeros_like(pg)
    if "is_weights" in batch:
        pg = pg * _masked(_token_field(batch, "is_weights", logps), mask).detach()
    total = pg

    n_tokens = mask.sum()
    tmean = lambda x: global_mean((x.detach() * mask).sum(), n_tokens, "tokens", batch)  # noqa: E731
    metrics = {"clip_fraction/low": tmean(low), "clip_fraction/high": tmean(high),
               "clip_fraction": tmean(low + high), "ratio/mean": tmean(rho)}
    if ref_logps is None and "ref_logps" in batch:
        ref_logps = batch["ref_logps"]
    if ref_logps is not None:
        if tuple(ref_logps.shape) != tuple(logps.shape):
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}; a rollout batch needs per-token "
                             f"reference log-probs {tuple(logps.shape)} (not the offline per-sequence sums)")
        ref = _masked(ref_logps.to(device=logps.device, dtype=dtype).detach(), mask)
        kl = _masked(kl_penalty(logps, ref, cfg.kl_estimator), mask)
        metrics["kl"] = tmean(kl)
        if cfg.kl_coef:
            total = total + cfg.kl_coef * kl
    elif cfg.kl_coef:
        raise KeyError("kl_coef > 0 with the KL in the loss needs reference log-probs: batch['ref_logps'] "
                       "Float[B,S] or the ref_logps argument")
    if cfg.rollout_kl_coef:
        rollout_kl = _masked(rho * log_rho - rho + 1.0, mask)
        total = total + cfg.rollout_kl_coef * rollout_kl
        metrics["rollout_kl"] = tmean(rollout_kl)
    if policy.entropy is not None:
        entropy = _masked(policy.entropy.to(dtype), mask)
        metrics["entropy"] = tmean(entropy)
        if cfg.entropy_coef:
            total = total - cfg.entropy_coef * entropy
    elif cfg.entropy_coef:
        raise ValueError("entropy_coef > 0 needs the policy's per-token entropy (TokenStats.entropy)")

    mode = cfg.loss_agg.replace("_", "-")
    loss = agg_token_loss(total, batch, mode, cfg.norm_len)
    metrics["pg_loss"] = agg_token_loss(pg.detach(), batch, mode, cfg.norm_len)
    return loss, {k: v.detach().reshape(()) for k, v in metrics.items()}
