"""Every loss and metric against an independent float64 computation written from the formulas."""
import math
import random

import pytest
import torch

from megatron.config.schema import ObjectiveConfig
from megatron.objectives import SequenceStats, build_objective, sequence_stats
from megatron.objectives.base import log1mexp

N, P = 8, 4


# ----------------------------------------------------------------- independent scalar formulas
def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def random_stats(seed, with_scores=False):
    rnd = random.Random(seed)
    counts = [float(rnd.randint(1, 20)) for _ in range(N)]
    logp = [-c * rnd.uniform(0.2, 2.5) for c in counts]
    ref = [lp + rnd.gauss(0.0, 3.0) for lp in logp]
    scores = [rnd.gauss(0.0, 2.0) for _ in range(N)] if with_scores else None
    perm = list(range(N))
    rnd.shuffle(perm)
    chosen, rejected = perm[:P], perm[P:]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    pol = SequenceStats(t(logp), t(counts), t(scores) if with_scores else None)
    refs = SequenceStats(t(ref), t(counts))
    batch = {"chosen_idx": torch.tensor(chosen), "rejected_idx": torch.tensor(rejected)}
    return pol, refs, batch, dict(logp=logp, ref=ref, counts=counts, scores=scores, chosen=chosen, rejected=rejected)


def objective(**kw):
    return build_objective(ObjectiveConfig(**kw), None)


def check(metrics, expected, tol=1e-12):
    assert set(metrics) == set(expected), (sorted(metrics), sorted(expected))
    for k, v in expected.items():
        m = metrics[k]
        assert m.dim() == 0 and not m.requires_grad, k
        assert abs(m.item() - v) <= tol * max(1.0, abs(v)), (k, m.item(), v)


def pref_metrics(rc, rr, d):
    return {
        "rewards/chosen": mean(rc), "rewards/rejected": mean(rr),
        "rewards/accuracy": mean(1.0 if a > b else 0.0 for a, b in zip(rc, rr)),
        "rewards/margin": mean(a - b for a, b in zip(rc, rr)),
        "logps/chosen": mean(d["logp"][i] for i in d["chosen"]),
        "logps/rejected": mean(d["logp"][i] for i in d["rejected"]),
    }


def nll_chosen(d):
    return -sum(d["logp"][i] for i in d["chosen"]) / sum(d["counts"][i] for i in d["chosen"])


# ----------------------------------------------------------------- SFT
def test_sft():
    pol, _, _, d = random_stats(0)
    loss, m = objective(name="sft").loss(pol, None, {})
    nll = -sum(d["logp"]) / sum(d["counts"])
    assert abs(loss.item() - nll) < 1e-12
    check(m, {"nll": nll, "tokens": sum(d["counts"])})
    # ppl comes from the step's mean NLL (after averaging over micro-batches and ranks), not per micro-batch.
    summary = objective(name="sft").summarize_metrics({"nll": nll, "tokens": 3.0})
    assert summary == {"nll": nll, "tokens": 3.0, "ppl": pytest.approx(math.exp(nll), rel=1e-12)}


# ----------------------------------------------------------------- DPO family
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("robust", 0.0),
                                           ("hinge", 0.0), ("ipo", 0.0)])
@pytest.mark.parametrize("reference_free", [False, True])
@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
def test_dpo(loss_type, eps, reference_free, nll_weight):
    beta = 0.3
    seed = ["sigmoid", "robust", "hinge", "ipo"].index(loss_type) * 8 + int(eps * 10) * 2 + reference_free + int(nll_weight > 0) * 4
    pol, ref, batch, d = random_stats(seed)
    obj = objective(name="dpo", beta=beta, loss_type=loss_type, label_smoothing=eps,
                    reference_free=reference_free, nll_weight=nll_weight)
    loss, m = obj.loss(pol, None if reference_free else ref, batch)

    if loss_type == "ipo":
        pi = [lp / c for lp, c in zip(d["logp"], d["counts"])]
        rf = [lp / c for lp, c in zip(d["ref"], d["counts"])]
    else:
        pi, rf = d["logp"], d["ref"]
    if reference_free:
        rf = [0.0] * N
    losses, rc, rr = [], [], []
    for c, r in zip(d["chosen"], d["rejected"]):
        h = (pi[c] - rf[c]) - (pi[r] - rf[r])
        if loss_type == "sigmoid":
            losses.append(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h))
        elif loss_type == "robust":
            losses.append((-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps))
        elif loss_type == "hinge":
            losses.append(max(0.0, 1 - beta * h))
        else:
            losses.append((h - 1 / (2 * beta)) ** 2)
        rc.append(beta * (pi[c] - rf[c]))
        rr.append(beta * (pi[r] - rf[r]))
    expect = mean(losses)
    want = pref_metrics(rc, rr, d)
    if nll_weight:
        expect += nll_weight * nll_chosen(d)
        want["nll"] = nll_chosen(d)
    assert abs(loss.item() - expect) < 1e-12 * max(1, abs(expect))
    check(m, want)


def test_dpo_ignores_policy_reference_leak_and_needs_reference():
    pol, ref, batch, _ = random_stats(5)
    obj = objective(name="dpo")
    with pytest.raises(ValueError, match="reference"):
        obj.loss(pol, None, batch)
    # a reference that requires grad does not get gradients
    ref.logp_sum.requires_grad_()
    pol.logp_sum.requires_grad_()
    loss, _ = obj.loss(pol, ref, batch)
    loss.backward()
    assert ref.logp_sum.grad is None and pol.logp_sum.grad is not None


# ----------------------------------------------------------------- reward model
@pytest.mark.parametrize("const_margin,batch_margin,center", [(0.0, False, 0.0), (0.5, True, 0.01), (0.0, True, 0.3)])
def test_reward_model(const_margin, batch_margin, center):
    pol, _, batch, d = random_stats(17, with_scores=True)
    margins = [0.0] * P
    if batch_margin:  # the collator's Float[P] (fp32); the reference uses the same rounded values
        batch["margin"] = torch.rand(P, generator=torch.Generator().manual_seed(3)) * 2
        margins = batch["margin"].tolist()
    loss, m = objective(name="rm", margin=const_margin, center_weight=center).loss(pol, None, batch)
    s = d["scores"]
    rc = [s[i] for i in d["chosen"]]
    rr = [s[i] for i in d["rejected"]]
    bt = mean(-logsig(a - b - const_margin - mg) for a, b, mg in zip(rc, rr, margins))
    expect = bt + center * mean((a + b) ** 2 for a, b in zip(rc, rr))
    assert abs(loss.item() - expect) < 1e-12
    check(m, {"accuracy": mean(1.0 if a > b else 0.0 for a, b in zip(rc, rr)),
              "chosen_score": mean(rc), "rejected_score": mean(rr), "margin": mean(a - b for a, b in zip(rc, rr))})


# ----------------------------------------------------------------- SimPO
@pytest.mark.parametrize("gamma,eps,nll_weight", [(0.5, 0.0, 0.0), (1.4, 0.1, 0.0), (0.0, 0.0, 1.0)])
def test_simpo(gamma, eps, nll_weight):
    beta = 2.0
    pol, ref, batch, d = random_stats(23)
    loss, m = objective(name="simpo", beta=beta, gamma=gamma, label_smoothing=eps,
                        nll_weight=nll_weight).loss(pol, ref, batch)
    avg = [lp / c for lp, c in zip(d["logp"], d["counts"])]
    losses = []
    for c, r in zip(d["chosen"], d["rejected"]):
        x = beta * (avg[c] - avg[r]) - gamma
        losses.append(-(1 - eps) * logsig(x) - eps * logsig(-x))
    expect = mean(losses)
    want = pref_metrics([beta * avg[c] for c in d["chosen"]], [beta * avg[r] for r in d["rejected"]], d)
    if nll_weight:
        expect += nll_weight * nll_chosen(d)
        want["nll"] = nll_chosen(d)
    assert abs(loss.item() - expect) < 1e-12
    check(m, want)


# ----------------------------------------------------------------- ORPO
def test_orpo():
    beta, lam = 0.1, 0.25
    pol, _, batch, d = random_stats(31)
    # one nearly certain sequence exercises the stable log(1 - exp(x))
    d["logp"][d["chosen"][0]] = -1e-4 * d["counts"][d["chosen"][0]]
    pol.logp_sum[d["chosen"][0]] = d["logp"][d["chosen"][0]]
    loss, m = objective(name="orpo", beta=beta, orpo_lambda=lam).loss(pol, None, batch)
    avg = [lp / c for lp, c in zip(d["logp"], d["counts"])]
    l1me = lambda x: math.log(1.0 - math.exp(x))
    log_odds = [(avg[c] - avg[r]) - (l1me(avg[c]) - l1me(avg[r])) for c, r in zip(d["chosen"], d["rejected"])]
    ratio = [logsig(x) for x in log_odds]
    expect = nll_chosen(d) - lam * mean(ratio)
    want = pref_metrics([beta * avg[c] for c in d["chosen"]], [beta * avg[r] for r in d["rejected"]], d)
    want.update(nll=nll_chosen(d), log_odds_ratio=mean(ratio), log_odds_chosen=mean(log_odds))
    assert abs(loss.item() - expect) < 1e-9
    check(m, want, tol=1e-9)


def test_log1mexp_stable():
    xs = [-50.0, -5.0, -0.7, -0.69, -0.1, -1e-3]
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    for g, x in zip(got.tolist(), xs):
        assert abs(g - math.log(1 - math.exp(x))) < 1e-10 * max(1, abs(g))
    for x in [-1e-9, -1e-14]:  # 1 - exp(x) = -x (1 + x/2 + x^2/6 + ...)
        want = math.log(-x) + math.log1p(x / 2 + x * x / 6)
        assert abs(log1mexp(torch.tensor([x], dtype=torch.float64)).item() - want) < 1e-12
    x = torch.tensor([0.0, -1e-30], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------- KTO
def kto_case(seed, kl_shift):
    rnd = random.Random(seed)
    e = 4
    counts = [float(rnd.randint(1, 20)) for _ in range(2 * e)]
    logp = [-c * rnd.uniform(0.2, 2.5) for c in counts]
    ref = [lp + rnd.gauss(0, 2.0) for lp in logp]
    perm = list(range(2 * e))
    rnd.shuffle(perm)
    target, kl = perm[:e], perm[e:]
    for k in kl:
        ref[k] = logp[k] - kl_shift + rnd.gauss(0, 0.5)  # pi - ref around kl_shift
    labels = [1.0, 0.0, 1.0, 1.0]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    batch = {"target_idx": torch.tensor(target), "kl_idx": torch.tensor(kl), "kto_label": t(labels)}
    return SequenceStats(t(logp), t(counts)), SequenceStats(t(ref), t(counts)), batch, \
        dict(logp=logp, ref=ref, target=target, kl=kl, labels=labels)


def kto_reference(d, beta, dw, uw):
    z0 = max(0.0, mean(d["logp"][k] - d["ref"][k] for k in d["kl"]))
    losses, rc, rr, lc, lr, agree = [], [], [], [], [], []
    for t, y in zip(d["target"], d["labels"]):
        r = d["logp"][t] - d["ref"][t]
        agree.append(0.5 if r == 0 else float((r > 0) == (y == 1.0)))  # the reward's sign matches the label
        if y == 1.0:
            losses.append(dw * (1 - sig(beta * (r - z0))))
            rc.append(beta * r)
            lc.append(d["logp"][t])
        else:
            losses.append(uw * (1 - sig(beta * (z0 - r))))
            rr.append(beta * r)
            lr.append(d["logp"][t])
    return sum(losses) / len(losses), {
        "kl": z0, "rewards/chosen": mean(rc), "rewards/rejected": mean(rr), "rewards/margin": mean(rc) - mean(rr),
        "logps/chosen": mean(lc), "logps/rejected": mean(lr), "count/chosen": float(len(rc)),
        "count/rejected": float(len(rr)), "rewards/accuracy": mean(agree)}


@pytest.mark.parametrize("kl_shift,dw,uw", [(1.5, 1.0, 1.0), (-2.0, 1.0, 1.0), (0.8, 1.33, 0.6)])
def test_kto(kl_shift, dw, uw):
    beta = 0.4
    pol, ref, batch, d = kto_case(41, kl_shift)
    loss, m = objective(name="kto", beta=beta, desirable_weight=dw, undesirable_weight=uw).loss(pol, ref, batch)
    expect, want = kto_reference(d, beta, dw, uw)
    assert abs(loss.item() - expect) < 1e-12
    check(m, want)
    if kl_shift < 0:
        assert m["kl"].item() == 0.0  # clamped
    else:
        assert m["kl"].item() > 0.5


def test_kto_batch_size_one_and_only_one_class():
    pol, ref, batch, d = kto_case(43, 1.0)
    one = {"target_idx": batch["target_idx"][1:2], "kl_idx": batch["kl_idx"][1:2], "kto_label": batch["kto_label"][1:2]}
    loss, m = objective(name="kto", beta=0.2).loss(pol, ref, one)
    t, k = d["target"][1], d["kl"][1]
    z0 = max(0.0, d["logp"][k] - d["ref"][k])
    r = d["logp"][t] - d["ref"][t]
    assert d["labels"][1] == 0.0
    assert abs(loss.item() - (1 - sig(0.2 * (z0 - r)))) < 1e-12
    assert m["rewards/chosen"].item() == 0.0 and m["logps/chosen"].item() == 0.0
    assert abs(m["rewards/rejected"].item() - 0.2 * r) < 1e-12


def test_kto_gradient_does_not_flow_through_z0():
    pol, ref, batch, d = kto_case(47, 1.0)
    pol.logp_sum.requires_grad_()
    loss, _ = objective(name="kto", beta=0.5).loss(pol, ref, batch)
    loss.backward()
    z0 = max(0.0, mean(d["logp"][k] - d["ref"][k] for k in d["kl"]))
    for k in d["kl"]:
        assert pol.logp_sum.grad[k].item() == 0.0
    for t, y in zip(d["target"], d["labels"]):
        r = d["logp"][t] - d["ref"][t]
        x = 0.5 * (r - z0) if y == 1.0 else 0.5 * (z0 - r)
        g = -sig(x) * (1 - sig(x)) * 0.5 * (1 if y == 1.0 else -1) / 4
        assert abs(pol.logp_sum.grad[t].item() - g) < 1e-12


# ----------------------------------------------------------------- gradients from token log-probs
def token_batch(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, seqlen = 2, 16
    seq_id = torch.full((rows, seqlen), -1, dtype=torch.long)
    mask = torch.zeros(rows, seqlen)
    last = []
    for n in range(N):
        row, start = n % 2, (n // 2) * 4
        seq_id[row, start:start + 3] = n
        mask[row, start + 1:start + 3] = 1.0
        last.append(row * seqlen + start + 2)
    batch = {"seq_id": seq_id, "loss_mask": mask, "seq_last_pos": torch.tensor(last)}
    perm = torch.randperm(N, generator=g)
    if kind == "pairwise":
        batch.update(chosen_idx=perm[:P], rejected_idx=perm[P:])
    elif kind == "unpaired":
        batch.update(target_idx=perm[:P], kl_idx=perm[P:], kto_label=torch.tensor([1.0, 0.0, 0.0, 1.0]))
    return batch


@pytest.mark.parametrize("cfg", [dict(name="sft"), dict(name="rm", center_weight=0.1),
                                 dict(name="dpo"), dict(name="dpo", loss_type="ipo"),
                                 dict(name="dpo", loss_type="hinge", beta=0.01),
                                 dict(name="dpo", loss_type="robust", label_smoothing=0.1, nll_weight=1.0),
                                 dict(name="simpo"), dict(name="orpo"), dict(name="kto")])
def test_gradients_flow_to_token_logps(cfg):
    obj = objective(**cfg)
    batch = token_batch(obj.batch_kind)
    g = torch.Generator().manual_seed(1)
    logps = (-torch.rand(batch["seq_id"].shape, generator=g) * 4).requires_grad_()
    values = torch.randn(batch["seq_id"].shape, generator=g).requires_grad_()
    policy = sequence_stats(logps, batch, values if obj.uses_value_head else None)
    reference = sequence_stats(-torch.rand(batch["seq_id"].shape, generator=g) * 4, batch)
    loss, metrics = obj.loss(policy, reference, batch)
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    grad = values.grad if obj.uses_value_head else logps.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad[batch["seq_id"] < 0] == 0).all()
    for k, v in metrics.items():
        assert v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k


def test_accuracy_counts_ties_as_wrong():
    """rewards/accuracy and rm accuracy use chosen > rejected strictly (TRL)."""
    pol, _, batch, d = random_stats(53, with_scores=True)
    c, r = d["chosen"], d["rejected"]
    pol.logp_sum[c[0]] = pol.logp_sum[r[0]]  # a tie in the policy reward
    pol.logp_sum[c[1]] = pol.logp_sum[r[1]] + 1.0  # a win
    pol.logp_sum[c[2]] = pol.logp_sum[r[2]] - 1.0  # a loss
    pol.logp_sum[c[3]] = pol.logp_sum[r[3]] + 2.0  # a win
    pol.scores[c[0]] = pol.scores[r[0]]
    pol.scores[c[1:]] = pol.scores[r[1:]] + 1.0
    _, m = objective(name="dpo", reference_free=True).loss(pol, None, batch)
    assert m["rewards/accuracy"].item() == 0.5
    _, m = objective(name="rm").loss(pol, None, batch)
    assert m["accuracy"].item() == 0.75
