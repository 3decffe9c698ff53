"""Advantage estimators against independent float64 computations written from the papers, loop vs vectorised twins,
masked-token invariance, layout invariance, and DAPO's dynamic-sampling filter."""
import math
import random

import pytest
import torch

from megatron.config import ConfigError
from megatron.config.schema import ObjectiveConfig
from megatron.objectives.advantages import (ADV_EPS, compute_advantages, get_advantage_estimator,
                                            registered_advantage_estimators, varying_groups)

ESTIMATORS = ["gae", "grpo", "mdloo", "reinforce_pp", "rloo"]


# ----------------------------------------------------------------------------------- fixed rollouts
def rollouts(seed, group_sizes=(4, 3, 1, 5, 2), rows=4, width=48):
    """Completions packed into rows: a prompt (unscored), a response (scored) with an occasional unscored hole
    (a masked tool output), padding (-1); completions of a group are NOT contiguous. Garbage KL/values everywhere
    unscored. One group has equal rewards. Returns a dict of tensors and the per-completion scored positions."""
    rnd = random.Random(seed)
    gids = []
    for g, size in enumerate(group_sizes):
        gids += [1000 + 37 * g] * size  # arbitrary prompt ids
    order = list(range(len(gids)))
    rnd.shuffle(order)
    gids = [gids[i] for i in order]
    n = len(gids)
    seq_id = [[-1] * width for _ in range(rows)]
    mask = [[0.0] * width for _ in range(rows)]
    fill = [0] * rows
    scored = []
    for i in range(n):
        p_len, r_len = rnd.randint(1, 4), rnd.randint(1, 7)
        length = p_len + r_len
        row = min((r for r in range(rows) if fill[r] + length <= width), key=lambda r: fill[r])
        start = fill[row]
        pos = []
        hole = rnd.randint(p_len + 1, length - 1) if r_len >= 3 and rnd.random() < 0.5 else -1
        for t in range(start, start + length):
            seq_id[row][t] = i
            if t - start >= p_len and t - start != hole:
                mask[row][t] = 1.0
                pos.append(row * width + t)
        fill[row] += length
        scored.append(pos)
    rewards = [rnd.choice([0.0, 1.0, 0.5, -0.3]) + rnd.gauss(0, 0.3) for _ in range(n)]
    equal_group = gids[0]
    for i in range(n):
        if gids[i] == equal_group:
            rewards[i] = 0.7
    t = lambda x, dt=torch.float64: torch.tensor(x, dtype=dt)  # noqa: E731
    kl = [[rnd.gauss(0, 0.2) if mask[r][c] else rnd.gauss(0, 50) for c in range(width)] for r in range(rows)]
    values = [[rnd.gauss(0, 1) if mask[r][c] else rnd.gauss(0, 50) for c in range(width)] for r in range(rows)]
    return dict(rewards=t(rewards), group_ids=torch.tensor(gids), seq_id=torch.tensor(seq_id), mask=t(mask),
                kl=t(kl), values=t(values), scored=scored, n=n)


def cfg(**kw):
    return ObjectiveConfig(**kw)


def run(name, ro, c, impl="vectorised", kl=True, values=True, **over):
    args = dict(kl=ro["kl"] if kl else None, values=ro["values"] if values else None)
    args.update(over)
    return compute_advantages(name, ro["rewards"], ro["group_ids"], ro["seq_id"], ro["mask"], c, impl=impl, **args)


def at(x, ro):
    """Per-completion lists of a flat token tensor's values at the scored positions."""
    flat = x.reshape(-1).tolist()
    return [[flat[p] for p in ps] for ps in ro["scored"]]


def token_lists(ro, key):
    flat = ro[key].reshape(-1).tolist()
    return [[flat[p] for p in ps] for ps in ro["scored"]]


def close(a, b, tol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert abs(u - v) <= tol * max(1.0, abs(v)), (u, v)


def groups_of(ro):
    out = {}
    for i, g in enumerate(ro["group_ids"].tolist()):
        out.setdefault(g, []).append(i)
    return out


# ----------------------------------------------------------------------- references from the papers
def kl_regularised(ro, beta):
    """R_i - beta * sum_t kl_t (the KL-in-reward of RLOO / MDLOO)."""
    kls = token_lists(ro, "kl")
    return [r - beta * sum(k) for r, k in zip(ro["rewards"].tolist(), kls)]


def ref_grpo(rewards, groups, mode):
    """DeepSeekMath eq. (GRPO outcome supervision): (r - mean(r_group)) / std(r_group); Dr. GRPO drops the std."""
    n = len(rewards)
    adv = [0.0] * n
    allmean = sum(rewards) / n
    batch_std = math.sqrt(sum((r - allmean) ** 2 for r in rewards) / (n - 1))
    for members in groups.values():
        rs = [rewards[i] for i in members]
        m = sum(rs) / len(rs)
        s = math.sqrt(sum((r - m) ** 2 for r in rs) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        for i in members:
            d = rewards[i] - m
            adv[i] = d / (s + ADV_EPS) if mode == "group" else d / (batch_std + ADV_EPS) if mode == "batch" else d
    return adv


def ref_loo(rewards, groups):
    """RLOO (Kool 2019 / Ahmadian 2024): r_i - 1/(k-1) sum_{j != i} r_j."""
    adv = [0.0] * len(rewards)
    for members in groups.values():
        k = len(members)
        for i in members:
            adv[i] = rewards[i] - sum(rewards[j] for j in members if j != i) / (k - 1) if k > 1 else 0.0
    return adv


def whiten(per_seq_tokens):
    flat = [x for xs in per_seq_tokens for x in xs]
    m = sum(flat) / len(flat)
    s = math.sqrt(sum((x - m) ** 2 for x in flat) / len(flat))
    return [[(x - m) / (s + ADV_EPS) for x in xs] for xs in per_seq_tokens]


def token_rewards(ro, beta, terminal):
    """r_t = -beta kl_t, plus the terminal reward on the last token (InstructGPT / REINFORCE++ token rewards)."""
    kls = token_lists(ro, "kl")
    out = []
    for i, ks in enumerate(kls):
        r = [-beta * k for k in ks]
        if r:
            r[-1] += terminal[i]
        out.append(r)
    return out


def ref_reinforce_pp(ro, beta, gamma, baseline):
    """REINFORCE++: G_t = sum_{s>=t} gamma^(s-t) r_s, normalised over the batch; -baseline: R - group mean."""
    rewards = ro["rewards"].tolist()
    if baseline:
        g = groups_of(ro)
        means = {}
        for gid, members in g.items():
            means[gid] = sum(rewards[i] for i in members) / len(members)
        rewards = [r - means[gid] for r, gid in zip(rewards, ro["group_ids"].tolist())]
    rs = token_rewards(ro, beta, rewards)
    returns = [[sum(gamma ** (s - t) * r[s] for s in range(t, len(r))) for t in range(len(r))] for r in rs]
    return whiten(returns), returns


def ref_gae(ro, beta, gamma, lam):
    """GAE (Schulman 2016 eq. 16) written as the explicit sum A_t = sum_l (gamma lam)^l delta_{t+l}."""
    rs = token_rewards(ro, beta, ro["rewards"].tolist())
    vs = token_lists(ro, "values")
    advs, rets = [], []
    for r, v in zip(rs, vs):
        T = len(r)
        vnext = lambda t: v[t + 1] if t + 1 < T else 0.0  # noqa: E731
        delta = [r[t] + gamma * vnext(t) - v[t] for t in range(T)]
        a = [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)]
        advs.append(a)
        rets.append([a[t] + v[t] for t in range(T)])
    return whiten(advs), rets


def broadcast(per_seq, ro):
    return [[per_seq[i]] * len(ps) for i, ps in enumerate(ro["scored"])]


# ------------------------------------------------------------------------------------------- tests
def test_registry():
    assert registered_advantage_estimators() == ESTIMATORS
    with pytest.raises(ConfigError, match="did you mean 'rloo'"):
        get_advantage_estimator("rlooo")


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_matches_paper(mode, seed):
    ro = rollouts(seed)
    c = cfg(scale_rewards=mode)
    expect = broadcast(ref_grpo(ro["rewards"].tolist(), groups_of(ro), mode), ro)
    for impl in ("vectorised", "loop"):
        out = run("grpo", ro, c, impl, kl=False)
        close(at(out.advantages, ro), expect)
        assert out.returns is None
    # the group whose rewards are all equal and the group of one get 0
    adv = run("grpo", ro, c, kl=False).advantages
    for i, gid in enumerate(ro["group_ids"].tolist()):
        if gid == ro["group_ids"][0].item() or len(groups_of(ro)[gid]) == 1:
            assert all(adv.reshape(-1)[p] == 0 for p in ro["scored"][i])


def test_grpo_kl_in_reward_and_unscored_positions_are_zero():
    ro = rollouts(3)
    c = cfg(scale_rewards="group", kl_coef=0.3)
    expect = broadcast(ref_grpo(kl_regularised(ro, 0.3), groups_of(ro), "group"), ro)
    out = run("grpo", ro, c)
    close(at(out.advantages, ro), expect)
    unscored = (ro["mask"] == 0) | (ro["seq_id"] < 0)
    assert torch.all(out.advantages[unscored] == 0)
    assert out.advantages.shape == ro["mask"].shape and out.advantages.dtype == torch.float64


@pytest.mark.parametrize("name", ["rloo", "mdloo"])
@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_leave_one_out_matches_paper(name, beta):
    ro = rollouts(5)
    c = cfg(kl_coef=beta)
    expect = broadcast(ref_loo(kl_regularised(ro, beta), groups_of(ro)), ro)
    for impl in ("vectorised", "loop"):
        close(at(run(name, ro, c, impl).advantages, ro), expect)
    # LOO advantages of a group sum to zero
    adv = run(name, ro, c).advantages.reshape(-1)
    for members in groups_of(ro).values():
        firsts = [adv[ro["scored"][i][0]].item() for i in members]
        assert abs(sum(firsts)) < 1e-10


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_paper(baseline, gamma):
    ro = rollouts(7)
    c = cfg(kl_coef=0.1, discount=gamma, group_baseline=baseline)
    adv_ref, ret_ref = ref_reinforce_pp(ro, 0.1, gamma, baseline)
    for impl in ("vectorised", "loop"):
        out = run("reinforce_pp", ro, c, impl)
        close(at(out.advantages, ro), adv_ref)
        close(at(out.returns, ro), ret_ref)
    flat = [x for xs in at(run("reinforce_pp", ro, c).advantages, ro) for x in xs]
    m = sum(flat) / len(flat)
    assert abs(m) < 1e-9 and abs(math.sqrt(sum((x - m) ** 2 for x in flat) / len(flat)) - 1) < 1e-5


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_paper(gamma, lam):
    ro = rollouts(11)
    c = cfg(kl_coef=0.05, discount=gamma, lam=lam)
    adv_ref, ret_ref = ref_gae(ro, 0.05, gamma, lam)
    for impl in ("vectorised", "loop"):
        out = run("gae", ro, c, impl)
        close(at(out.advantages, ro), adv_ref)
        close(at(out.returns, ro), ret_ref)


def test_gae_lambda_one_is_monte_carlo():
    """With lam = gamma = 1 the return of every token is the terminal reward minus the KL still to come."""
    ro = rollouts(13)
    c = cfg(kl_coef=0.2, discount=1.0, lam=1.0)
    out = run("gae", ro, c)
    kls = token_lists(ro, "kl")
    expect = [[ro["rewards"][i].item() - 0.2 * sum(ks[t:]) for t in range(len(ks))] for i, ks in enumerate(kls)]
    close(at(out.returns, ro), expect)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_unscored_positions_never_matter(name):
    """KL, values at masked tokens (prompts, holes, padding) are garbage in the fixture; new garbage changes nothing."""
    ro = rollouts(17)
    c = cfg(kl_coef=0.1, scale_rewards="batch")
    before = run(name, ro, c)
    unscored = (ro["mask"] == 0) | (ro["seq_id"] < 0)
    for key in ("kl", "values"):
        ro[key] = torch.where(unscored, torch.randn_like(ro[key]) * 1e6, ro[key])
    after = run(name, ro, c)
    assert torch.equal(before.advantages, after.advantages)
    if before.returns is not None:
        assert torch.equal(before.returns, after.returns)


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("seed", [21, 22, 23])
def test_loop_and_vectorised_twins_agree(name, seed):
    ro = rollouts(seed, group_sizes=(2, 5, 3, 3, 1, 4), rows=5)
    c = cfg(kl_coef=0.07, discount=0.97, lam=0.9, scale_rewards=["group", "batch", "none"][seed % 3],
            group_baseline=bool(seed % 2))
    a = run(name, ro, c, "vectorised")
    b = run(name, ro, c, "loop")
    torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-10, atol=1e-10)
    if a.returns is not None:
        torch.testing.assert_close(a.returns, b.returns, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_padded_layout_gives_the_same_advantages(name):
    """The same rollouts right-padded one completion per row ([N, T]) instead of packed."""
    ro = rollouts(29)
    c = cfg(kl_coef=0.1)
    packed = run(name, ro, c)
    t_max = max(len(ps) for ps in ro["scored"])
    n = ro["n"]
    seq = torch.full((n, t_max + 2), -1, dtype=torch.long)
    mask = torch.zeros(n, t_max + 2, dtype=torch.float64)
    kl = torch.zeros_like(mask)
    values = torch.zeros_like(mask)
    flat_kl, flat_v = ro["kl"].reshape(-1), ro["values"].reshape(-1)
    for i, ps in enumerate(ro["scored"]):
        seq[i, :len(ps) + 1] = i  # one extra unscored position inside the completion
        for j, p in enumerate(ps):
            mask[i, j] = 1.0
            kl[i, j], values[i, j] = flat_kl[p], flat_v[p]
    padded = compute_advantages(name, ro["rewards"], ro["group_ids"], seq, mask, c, kl=kl, values=values)
    for i, ps in enumerate(ro["scored"]):
        for j, p in enumerate(ps):
            assert abs(padded.advantages[i, j].item() - packed.advantages.reshape(-1)[p].item()) < 1e-10


def test_fractional_and_float32_inputs():
    ro = rollouts(31)
    c = cfg(kl_coef=0.1)
    f32 = compute_advantages("grpo", ro["rewards"].float(), ro["group_ids"], ro["seq_id"], ro["mask"].float(), c)
    assert f32.advantages.dtype == torch.float32
    torch.testing.assert_close(f32.advantages.double(), run("grpo", ro, c, kl=False).advantages, rtol=1e-5, atol=1e-5)


def test_dynamic_sampling_keeps_groups_whose_rewards_vary():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 9, 9, 4, 4, 5])
    keep = varying_groups(rewards, groups)
    assert keep.tolist() == [False, False, False, True, True, False, False, False, False, False]
    ro = rollouts(37)
    keep = varying_groups(ro["rewards"], ro["group_ids"])
    for gid, members in groups_of(ro).items():
        vals = {ro["rewards"][i].item() for i in members}
        assert all(keep[i].item() == (len(vals) > 1) for i in members)


def test_bad_inputs_have_clear_errors():
    ro = rollouts(41)
    c = cfg()
    with pytest.raises(ValueError, match="reward of completion 2 is nan"):
        r = ro["rewards"].clone()
        r[2] = float("nan")
        compute_advantages("grpo", r, ro["group_ids"], ro["seq_id"], ro["mask"], c)
    with pytest.raises(ValueError, match="gae needs the critic's per-token values"):
        compute_advantages("gae", ro["rewards"], ro["group_ids"], ro["seq_id"], ro["mask"], c)
    with pytest.raises(ValueError, match="refers to completion"):
        compute_advantages("rloo", ro["rewards"][:3], ro["group_ids"][:3], ro["seq_id"], ro["mask"], c)
    with pytest.raises(ConfigError, match="objective.scale_rewards"):
        compute_advantages("grpo", ro["rewards"], ro["group_ids"], ro["seq_id"], ro["mask"], cfg(scale_rewards="grup"))
