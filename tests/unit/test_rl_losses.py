"""The clipped policy-gradient loss, KL estimators, truncated IS, PPO's value loss and the RL objectives against
independent float64 computations (values AND gradients, written from the papers), split invariance with the global
token normalisation, and config validation."""
import math
import random

import pytest
import torch

from megatron.config import ConfigError
from megatron.config.schema import ObjectiveConfig
from megatron.engines.run_config import load_run_config
from megatron.objectives import build_objective, compute_advantages, token_stats
from megatron.objectives.aggregation import GLOBAL_COUNTS, global_counts
from megatron.objectives.pg_loss import PGLossConfig, kl_penalty, policy_gradient_loss, truncated_is_weights

EPS_LOW, EPS_HIGH = 0.2, 0.28


# ----------------------------------------------------------------------------------- a rollout batch
def rollout_batch(seed, n_seq=7, rows=3, width=30, seq_adv=False):
    """A packed micro-batch: prompt tokens unscored, response tokens scored, a hole now and then, padding.
    old/ref log-probs are spread so ratios fall on both sides of the clip range; garbage at unscored positions."""
    rnd = random.Random(seed)
    seq_id = [[-1] * width for _ in range(rows)]
    mask = [[0.0] * width for _ in range(rows)]
    fill = [0] * rows
    last, scored = [], []
    for i in range(n_seq):
        p_len, r_len = rnd.randint(1, 3), rnd.randint(1, 6)
        length = p_len + r_len
        row = min((r for r in range(rows) if fill[r] + length <= width), key=lambda r: fill[r])
        start = fill[row]
        pos = []
        for t in range(start, start + length):
            seq_id[row][t] = i
            if t - start >= p_len and not (r_len > 2 and t - start == p_len + 1):
                mask[row][t] = 1.0
                pos.append((row, t))
        fill[row] += length
        last.append(row * width + start + length - 1)
        scored.append(pos)
    g = lambda mu, sd: [[rnd.gauss(mu, sd) for _ in range(width)] for _ in range(rows)]  # noqa: E731
    logps = g(-1.5, 0.6)
    old = [[lp + rnd.gauss(0, 0.25) for lp in row] for row in logps]
    ref = [[lp + rnd.gauss(0, 0.5) for lp in row] for row in logps]
    if seq_adv:
        per_seq = [rnd.gauss(0, 1) for _ in range(n_seq)]
        adv = [[per_seq[s] if s >= 0 else 0.0 for s in row] for row in seq_id]
    else:
        adv = g(0, 1)
    for r in range(rows):  # garbage where unscored
        for t in range(width):
            if not mask[r][t]:
                logps[r][t], old[r][t], ref[r][t], adv[r][t] = 0.0, 50.0, -80.0, 1e3
    t64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    batch = {"seq_id": torch.tensor(seq_id), "loss_mask": t64(mask).float(), "seq_last_pos": torch.tensor(last),
             "old_logps": t64(old), "ref_logps": t64(ref), "advantages": t64(adv)}
    lp = t64(logps).requires_grad_(True)
    return lp, batch, scored


def vals(x, scored):
    return [[x[r][t] for r, t in ps] for ps in scored]


def ref_loss(lp, batch, scored, *, mode="token_mean", clip=True, level="token", kl_coef=0.0, est="k3",
             rollout_kl=0.0, isw=None, norm_len=None):
    """Float64 loss and d loss / d logp written from the papers, token by token (no torch)."""
    L = vals(lp.detach().tolist(), scored)
    O = vals(batch["old_logps"].tolist(), scored)
    R = vals(batch["ref_logps"].tolist(), scored)
    A = vals(batch["advantages"].tolist(), scored)
    W = vals(isw.tolist(), scored) if isw is not None else [[1.0] * len(x) for x in L]
    n = len(L)
    total_tokens = sum(len(x) for x in L)
    if mode == "token_mean":
        w = [[1.0 / total_tokens] * len(x) for x in L]
    elif mode == "seq_mean_token_mean":
        w = [[1.0 / (n * len(x))] * len(x) for x in L]
    elif mode == "seq_mean_token_sum":
        w = [[1.0 / n] * len(x) for x in L]
    else:
        w = [[1.0 / (n * norm_len)] * len(x) for x in L]
    loss = 0.0
    grad = [[0.0] * lp.shape[1] for _ in range(lp.shape[0])]
    for i in range(n):
        T = len(L[i])
        if level == "sequence" and T:
            s = math.exp(sum(L[i][t] - O[i][t] for t in range(T)) / T)  # GSPO: geometric-mean ratio
            a = sum(A[i]) / T
        # d(loss)/d(logp_t) = sum over tokens t' of w_t' * d(loss_t')/d(rho_t') * d(rho_t')/d(logp_t): with the
        # sequence ratio every token's rho depends on every logp of its sequence (d rho / d logp_t = rho / T)
        shared = 0.0
        own = []
        for t in range(T):
            rho, a_t = (math.exp(L[i][t] - O[i][t]), A[i][t]) if level == "token" else (s, a)
            if clip:
                c = min(max(rho, 1 - EPS_LOW), 1 + EPS_HIGH)
                unclipped, clipped = rho * a_t, c * a_t
                pg = -min(unclipped, clipped)
                dpg = -a_t if (1 - EPS_LOW <= rho <= 1 + EPS_HIGH or unclipped < clipped) else 0.0  # per d rho
            else:
                pg, dpg = -rho * a_t, -a_t
            pg, dpg = pg * W[i][t], dpg * W[i][t]
            if rollout_kl:
                pg += rollout_kl * (rho * math.log(rho) - rho + 1)
                dpg += rollout_kl * math.log(rho)
            g_own = 0.0
            if kl_coef:
                d = L[i][t] - R[i][t]
                pg += kl_coef * {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[est]
                g_own = kl_coef * {"k1": 1.0, "k2": d, "k3": 1 - math.exp(-d)}[est]
            loss += w[i][t] * pg
            if level == "token":
                own.append(g_own + dpg * rho)
            else:
                shared += w[i][t] * dpg * rho / T
                own.append(g_own)
        for t, (r, c_) in enumerate(scored[i]):
            grad[r][c_] = w[i][t] * own[t] + shared
    return loss, torch.tensor(grad, dtype=torch.float64)


def our_loss(lp, batch, **kw):
    cfg = PGLossConfig(clip_low=EPS_LOW, clip_high=EPS_HIGH, **kw)
    lp.grad = None
    loss, metrics = policy_gradient_loss(token_stats(lp, batch), batch, cfg)
    loss.backward()
    return loss.item(), lp.grad.clone(), metrics


def check(ours, ref, tol=1e-10):
    loss, grad, _ = ours
    rl, rg = ref
    assert abs(loss - rl) <= tol * max(1.0, abs(rl)), (loss, rl)
    torch.testing.assert_close(grad, rg, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_loss_three_aggregations(mode, seed):
    """DAPO token-mean, GRPO seq-mean-token-mean, Dr. GRPO seq-mean-token-sum-norm (and plain token sums)."""
    lp, batch, scored = rollout_batch(seed)
    norm = 16 if mode.endswith("norm") else None
    check(our_loss(lp, batch, loss_agg=mode, norm_len=norm), ref_loss(lp, batch, scored, mode=mode, norm_len=norm))


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_in_loss_values_and_gradients(est):
    lp, batch, scored = rollout_batch(3)
    check(our_loss(lp, batch, kl_coef=0.3, kl_estimator=est), ref_loss(lp, batch, scored, kl_coef=0.3, est=est))


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_and_their_gradients(est):
    """Schulman's k1/k2/k3 of KL(pi || ref) with log_r = ref - logp, and their derivatives in logp."""
    lp = torch.tensor([-2.0, -0.3, -1.1, -4.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -0.9, -1.1, -0.5], dtype=torch.float64)
    k = kl_penalty(lp, ref, est)
    k.sum().backward()
    for i in range(4):
        d = lp[i].item() - ref[i].item()
        value = {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[est]
        grad = {"k1": 1.0, "k2": d, "k3": 1 - math.exp(-d)}[est]
        assert abs(k[i].item() - value) < 1e-12 and abs(lp.grad[i].item() - grad) < 1e-12
    # k3 is non-negative and unbiased: E_pi[k3] = KL(pi || ref) on a small categorical
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    for e in ("k1", "k3"):
        assert abs(float((p * kl_penalty(p.log(), q.log(), e)).sum()) - exact) < 1e-12
    assert bool((kl_penalty(p.log(), q.log(), "k3") >= 0).all())


@pytest.mark.parametrize("seed", [4, 5])
def test_gspo_sequence_level_ratio(seed):
    lp, batch, scored = rollout_batch(seed, seq_adv=True)
    check(our_loss(lp, batch, importance_level="sequence", loss_agg="seq_mean_token_mean"),
          ref_loss(lp, batch, scored, level="sequence", mode="seq_mean_token_mean"))
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        PGLossConfig(importance_level="sequence", loss_agg="token_mean")


def test_truncated_importance_sampling():
    lp, batch, scored = rollout_batch(6)
    behaviour = batch["old_logps"] + torch.randn_like(batch["old_logps"]) * 0.7
    w = truncated_is_weights(batch["old_logps"], behaviour, batch, cap=2.0)
    mask = batch["loss_mask"].double() * (batch["seq_id"] >= 0)
    expect = torch.exp(batch["old_logps"] - behaviour).clamp(max=2.0) * mask
    torch.testing.assert_close(w, expect)
    assert float(w.max()) <= 2.0 and not w.requires_grad
    ws = truncated_is_weights(batch["old_logps"], behaviour, batch, cap=1.5, level="sequence")
    flat_o, flat_b = vals(batch["old_logps"].tolist(), scored), vals(behaviour.tolist(), scored)
    for ps, o, b in zip(scored, flat_o, flat_b):
        v = min(math.exp(sum(x - y for x, y in zip(o, b)) / len(o)), 1.5)
        assert all(abs(ws[r, t].item() - v) < 1e-12 for r, t in ps)
    batch["is_weights"] = w
    check(our_loss(lp, batch), ref_loss(lp, batch, scored, isw=w))


def test_unclipped_mirror_descent_loss():
    lp, batch, scored = rollout_batch(7)
    check(our_loss(lp, batch, clip=False, rollout_kl_coef=0.5), ref_loss(lp, batch, scored, clip=False, rollout_kl=0.5))


def test_on_policy_without_old_logps_is_reinforce():
    """No old_logps: ratio 1, loss = -mean(A), gradient = -A / tokens (REINFORCE), clip fraction 0."""
    lp, batch, scored = rollout_batch(8)
    del batch["old_logps"]
    loss, grad, metrics = our_loss(lp, batch)
    A = vals(batch["advantages"].tolist(), scored)
    n = sum(len(a) for a in A)
    assert abs(loss + sum(map(sum, A)) / n) < 1e-12
    for ps, a in zip(scored, A):
        for (r, t), x in zip(ps, a):
            assert abs(grad[r, t].item() + x / n) < 1e-12
    assert metrics["clip_fraction"].item() == 0.0


def test_metrics():
    lp, batch, scored = rollout_batch(9)
    ent = torch.rand(lp.shape, dtype=torch.float64)
    cfg = PGLossConfig(clip_low=EPS_LOW, clip_high=EPS_HIGH, kl_estimator="k2", entropy_coef=0.01)
    _, m = policy_gradient_loss(token_stats(lp, batch, entropy=ent), batch, cfg)
    L, O, R, A = (vals(x.tolist(), scored) for x in (lp.detach(), batch["old_logps"], batch["ref_logps"],
                                                      batch["advantages"]))
    toks = [(l, o, r, a) for ls, os_, rs, as_ in zip(L, O, R, A) for l, o, r, a in zip(ls, os_, rs, as_)]
    rho = [math.exp(l - o) for l, o, _, _ in toks]
    low = sum(1 for x, (_, _, _, a) in zip(rho, toks) if x < 1 - EPS_LOW and a < 0) / len(toks)
    high = sum(1 for x, (_, _, _, a) in zip(rho, toks) if x > 1 + EPS_HIGH and a > 0) / len(toks)
    assert abs(m["clip_fraction/low"].item() - low) < 1e-12 and abs(m["clip_fraction/high"].item() - high) < 1e-12
    assert abs(m["clip_fraction"].item() - low - high) < 1e-12 and low > 0 and high > 0
    assert abs(m["kl"].item() - sum(0.5 * (l - r) ** 2 for l, _, r, _ in toks) / len(toks)) < 1e-12
    assert abs(m["entropy"].item() - sum(sum(x) for x in vals(ent.tolist(), scored)) / len(toks)) < 1e-12
    assert abs(m["ratio/mean"].item() - sum(rho) / len(toks)) < 1e-12
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def split_rows(batch, lp, rows):
    """The micro-batch made of `rows` of `batch`, sequences renumbered 0..n-1."""
    sub = {k: v[rows] for k, v in batch.items() if k != "seq_last_pos"}
    old_ids = sorted({int(s) for s in sub["seq_id"].reshape(-1).tolist() if s >= 0})
    remap = {s: i for i, s in enumerate(old_ids)}
    sub["seq_id"] = sub["seq_id"].apply_(lambda s: remap.get(s, -1))
    return sub, lp[rows]


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_split_gives_the_full_batch_loss_and_gradient(mode):
    """With the loop's global counts, the MEAN of micro-batch losses (what DeepSpeed's averaging produces) equals
    the one-batch loss, and so does the mean of their gradients, though the micro-batches hold unequal tokens."""
    lp, batch, _ = rollout_batch(10, n_seq=9, rows=4)
    cfg = PGLossConfig(clip_low=EPS_LOW, clip_high=EPS_HIGH, loss_agg=mode, norm_len=12, kl_coef=0.1)
    full, _ = policy_gradient_loss(token_stats(lp, batch), batch, cfg)
    (g_full,) = torch.autograd.grad(full, lp)
    parts = [split_rows(batch, lp, [0, 2]), split_rows(batch, lp, [1, 3])]
    obj = build_objective(ObjectiveConfig(name="grpo"))
    counts = global_counts([obj.count_units(b) for b, _ in parts], None)
    losses = []
    for b, x in parts:
        b[GLOBAL_COUNTS] = counts
        losses.append(policy_gradient_loss(token_stats(x, b), b, cfg)[0])
    mean = sum(losses) / len(losses)
    (g_split,) = torch.autograd.grad(mean, lp)
    assert abs(mean.item() - full.item()) < 1e-12
    torch.testing.assert_close(g_split, g_full, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ the objectives
def objective(**kw):
    return build_objective(ObjectiveConfig(**kw))


def test_grpo_objective_is_the_flagged_loss():
    lp, batch, scored = rollout_batch(11)
    obj = objective(name="grpo", clip_high=EPS_HIGH, kl_coef=0.04, loss_agg="seq_mean_token_mean", kl_estimator="k3")
    loss, metrics = obj.loss(token_stats(lp, batch), None, batch)
    loss.backward()
    check((loss.item(), lp.grad, metrics), ref_loss(lp, batch, scored, mode="seq_mean_token_mean", kl_coef=0.04))
    assert obj.needs_reference(obj.cfg) and not obj.kl_in_reward(obj.cfg)


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp"])
def test_kl_in_reward_objectives_have_no_kl_in_the_loss(name):
    lp, batch, scored = rollout_batch(12)
    obj = objective(name=name, clip_low=EPS_LOW, clip_high=EPS_HIGH, kl_coef=0.2)
    loss, metrics = obj.loss(token_stats(lp, batch), None, batch)
    loss.backward()
    check((loss.item(), lp.grad, metrics), ref_loss(lp, batch, scored))
    assert "kl" in metrics  # still measured from the batch's reference log-probs


def test_objective_advantages_use_kl_only_when_it_is_in_the_reward():
    lp, batch, _ = rollout_batch(13)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.0, 0.9], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    kl = kl_penalty(batch["old_logps"], batch["ref_logps"], "k1")
    mask, seq = batch["loss_mask"].double(), batch["seq_id"]
    c_rloo = ObjectiveConfig(name="rloo", kl_coef=0.1)
    a = build_objective(c_rloo).advantages(rewards, groups, seq, mask, kl=kl).advantages
    torch.testing.assert_close(a, compute_advantages("rloo", rewards, groups, seq, mask, c_rloo, kl=kl).advantages)
    assert not torch.equal(a, compute_advantages("rloo", rewards, groups, seq, mask, c_rloo).advantages)
    c_grpo = ObjectiveConfig(name="grpo", kl_coef=0.1)
    a = build_objective(c_grpo).advantages(rewards, groups, seq, mask, kl=kl).advantages
    torch.testing.assert_close(a, compute_advantages("grpo", rewards, groups, seq, mask, c_grpo).advantages)


def test_mdloo_objective():
    lp, batch, scored = rollout_batch(14)
    obj = objective(name="mdloo", kl_coef=0.05)
    loss, metrics = obj.loss(token_stats(lp, batch), None, batch)
    loss.backward()
    check((loss.item(), lp.grad, metrics), ref_loss(lp, batch, scored, clip=False, rollout_kl=0.1))
    assert "rollout_kl" in metrics and obj.kl_in_reward(obj.cfg)


@pytest.mark.parametrize("clip", [0.2, None])
def test_ppo_value_loss(clip):
    """1/2 max((V - G)^2, (V_old + clip(V - V_old) - G)^2), token mean, times vf_coef; and its gradient."""
    lp, batch, scored = rollout_batch(15)
    rnd = random.Random(0)
    v = torch.tensor([[rnd.gauss(0, 1) for _ in range(lp.shape[1])] for _ in range(lp.shape[0])],
                     dtype=torch.float64, requires_grad=True)
    batch["values"] = v.detach() + torch.randn_like(v) * 0.4
    batch["returns"] = torch.randn_like(v)
    obj = objective(name="ppo", vf_coef=0.5, value_clip=clip)
    loss, m = obj.value_loss(v, batch)
    loss.backward()
    V, Vo, G = (vals(x.tolist(), scored) for x in (v.detach(), batch["values"], batch["returns"]))
    toks = [(a, b, c) for xs, ys, zs in zip(V, Vo, G) for a, b, c in zip(xs, ys, zs)]
    n = len(toks)
    total, grads, frac = 0.0, [], 0
    for vv, vo, g in toks:
        un = (vv - g) ** 2
        if clip is None:
            total += 0.5 * un
            grads.append((vv - g) / n)
            continue
        vc = vo + min(max(vv - vo, -clip), clip)
        cl = (vc - g) ** 2
        total += 0.5 * max(un, cl)
        frac += cl > un
        grads.append(((vv - g) if un >= cl else ((vc - g) if abs(vv - vo) < clip else 0.0)) / n)
    assert abs(loss.item() - 0.5 * total / n) < 1e-12
    assert abs(m["value_loss"].item() - total / n) < 1e-12
    assert abs(m["value_clip_fraction"].item() - frac / n) < 1e-12
    got = [x * 0.5 for x in grads]
    ours = [v.grad[r, t].item() for ps in scored for r, t in ps]
    assert all(abs(a - b) < 1e-12 for a, b in zip(ours, got))


def test_ppo_end_to_end_with_gae():
    """GAE advantages from the objective, laid into the batch, give the reference clipped loss."""
    lp, batch, scored = rollout_batch(16)
    obj = objective(name="ppo", kl_coef=0.1, clip_high=EPS_HIGH, lam=0.9)
    rewards = torch.linspace(-1, 1, 7, dtype=torch.float64)
    kl = kl_penalty(batch["old_logps"], batch["ref_logps"], "k3")
    values = torch.randn(lp.shape, dtype=torch.float64)
    out = obj.advantages(rewards, torch.arange(7), batch["seq_id"], batch["loss_mask"].double(), kl=kl, values=values)
    batch["advantages"] = out.advantages
    loss, _ = obj.loss(token_stats(lp, batch), None, batch)
    loss.backward()
    check((loss.item(), lp.grad, None), ref_loss(lp, batch, scored))  # KL is in the reward: none in the loss


# -------------------------------------------------------------------------------------- validation
BASE = ["rollout.prompts_path=prompts.jsonl", "reward.function=[exact_match]"]


@pytest.mark.parametrize("overrides,key", [
    (["objective.name=grpo", "objective.importance_level=sequence"], "objective.loss_agg"),
    (["objective.name=grpo", "objective.lam=0.9"], "objective.lam"),
    (["objective.name=grpo", "objective.kl_estimator=k4"], "objective.kl_estimator"),
    (["objective.name=grpo", "objective.clip_low=1.0"], "objective.clip_low"),
    (["objective.name=grpo", "rollout.num_generations=1", "train.global_batch_size=2", "train.micro_batch_size=2"],
     "rollout.num_generations"),
    (["objective.name=grpo", "rollout.prompts_per_step=3"], "train.global_batch_size"),
    (["objective.name=grpo", "reference.mode=precomputed", "objective.kl_coef=0.1"], "reference.mode"),
    (["objective.name=grpo", "reference.mode=live"], "reference.mode"),
    (["objective.name=grpo", "reward.weights=[1, 2]"], "reward.weights"),
    (["objective.name=mdloo", "objective.kl_in_reward=false"], "objective.kl_in_reward"),
    (["objective.name=mdloo", "objective.clip_high=0.3"], "objective.clip_high"),
    (["objective.name=ppo", "objective.value_clip=0"], "objective.value_clip"),
    (["objective.name=ppo", "rollout.dynamic_sampling=true"], "rollout.dynamic_sampling"),
    (["objective.name=reinforce_pp", "objective.discount=1.5"], "objective.discount"),
    (["objective.name=rloo", "model.value_head=true"], "model.value_head"),
])
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_run_config([], BASE + overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_valid_rl_configs_resolve():
    cfg = load_run_config([], BASE + ["objective.name=grpo", "objective.kl_coef=0.04"])
    assert cfg.derived.data_kind == "prompts" and cfg.derived.reference_mode == "live"
    cfg = load_run_config([], BASE + ["objective.name=grpo", "objective.loss_agg=seq_mean_token_sum_norm",
                                      "generation.max_new_tokens=64"])
    assert cfg.objective.loss_norm_len == 64 and cfg.derived.reference_mode == "none"
    for name in ("rloo", "reinforce_pp", "ppo", "mdloo"):
        load_run_config([], BASE + [f"objective.name={name}"])
    with pytest.raises(ConfigError, match="data-parallel"):
        load_run_config([], BASE + ["objective.name=grpo", "launcher.num_gpus=2", "rollout.prompts_per_step=3",
                                    "rollout.num_generations=2", "train.global_batch_size=6",
                                    "train.micro_batch_size=3"])


def test_offline_trainer_refuses_rollout_objectives():
    from megatron.training.trainer import run_training
    cfg = load_run_config([], BASE + ["objective.name=grpo"])
    with pytest.raises(ConfigError, match="online RL objective"):
        run_training(cfg)


def test_loss_needs_token_stats():
    lp, batch, _ = rollout_batch(17)
    obj = objective(name="grpo")
    with pytest.raises(TypeError, match="TokenStats"):
        obj.loss(token_stats(lp, batch).sequence_stats(), None, batch)
    del batch["advantages"]
    with pytest.raises(KeyError, match="advantages"):
        obj.loss(token_stats(lp, batch), None, batch)
