"""RPO (Nemotron-4 reward-aware preference optimisation): losses, rewards and gradients against an independent
float64 computation written from the paper, global-batch normalisation over unequal micro-batches, config
validation, and the error without reward margins."""
import math
import random

import pytest
import torch

from megatron.config import ConfigError
from megatron.config.schema import ObjectiveConfig
from megatron.engines.run_config import load_run_config
from megatron.objectives import SequenceStats, build_objective

N, P = 10, 5


# ----------------------------------------------------------------- the paper, in plain float64 scalars
def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def paper_D(a, b):
    """Nemotron-4 (arXiv:2406.11704): D[a||b] = sig(b) log(sig(b)/sig(a)) + (1-sig(b)) log((1-sig(b))/(1-sig(a)))."""
    # 1 - sig(x) written as sig(-x): the same number without cancellation when x is large
    return sig(b) * math.log(sig(b) / sig(a)) + sig(-b) * math.log(sig(-b) / sig(-a))


def expected_loss(loss_type, a, b):
    if loss_type == "bwd_kl":
        return paper_D(a, b)
    if loss_type == "fwd_kl":  # the divergence with its arguments swapped
        return paper_D(b, a)
    return (a - b) ** 2


def expected_dloss_da(loss_type, a, b):
    """d loss / d a, worked out by hand from the formulas above."""
    if loss_type == "bwd_kl":
        return sig(a) - sig(b)
    if loss_type == "fwd_kl":
        return sig(a) * sig(-a) * (a - b)
    return 2 * (a - b)


def random_case(seed):
    rnd = random.Random(seed)
    counts = [float(rnd.randint(1, 20)) for _ in range(N)]
    logp = [-c * rnd.uniform(0.2, 2.5) for c in counts]
    ref = [lp + rnd.gauss(0.0, 3.0) for lp in logp]
    perm = list(range(N))
    rnd.shuffle(perm)
    chosen, rejected = perm[:P], perm[P:]
    score_c = [rnd.gauss(1.0, 2.0) for _ in range(P)]
    score_r = [rnd.gauss(-0.5, 2.0) for _ in range(P)]
    return dict(logp=logp, ref=ref, counts=counts, chosen=chosen, rejected=rejected, score_c=score_c, score_r=score_r)


def tensors(d):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    logp = t(d["logp"]).requires_grad_(True)
    pol = SequenceStats(logp, t(d["counts"]))
    refs = SequenceStats(t(d["ref"]), t(d["counts"]))
    batch = {"chosen_idx": torch.tensor(d["chosen"]), "rejected_idx": torch.tensor(d["rejected"]),
             "margin": t([c - r for c, r in zip(d["score_c"], d["score_r"])])}
    return logp, pol, refs, batch


def mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("loss_type", ["bwd_kl", "fwd_kl", "sq"])
@pytest.mark.parametrize("seed,beta,eta,nll_weight", [(0, 0.1, 1.0, 0.0), (1, 0.5, 0.3, 0.0), (2, 1.0, 2.0, 0.4)])
def test_rpo_equals_float64_formula(loss_type, seed, beta, eta, nll_weight):
    d = random_case(seed)
    logp, pol, refs, batch = tensors(d)
    obj = build_objective(ObjectiveConfig(name="rpo", loss_type=loss_type, beta=beta, eta=eta, nll_weight=nll_weight))
    loss, metrics = obj.loss(pol, refs, batch)

    rc = [beta * (d["logp"][i] - d["ref"][i]) for i in d["chosen"]]
    rr = [beta * (d["logp"][i] - d["ref"][i]) for i in d["rejected"]]
    a = [x - y for x, y in zip(rc, rr)]
    b = [eta * (c - r) for c, r in zip(d["score_c"], d["score_r"])]
    nll = -sum(d["logp"][i] for i in d["chosen"]) / sum(d["counts"][i] for i in d["chosen"])
    want = mean([expected_loss(loss_type, x, y) for x, y in zip(a, b)]) + nll_weight * nll
    assert loss.item() == pytest.approx(want, abs=1e-12, rel=1e-12)

    expected = {"rewards/chosen": mean(rc), "rewards/rejected": mean(rr),
                "rewards/accuracy": mean([1.0 if x > y else 0.0 for x, y in zip(rc, rr)]),
                "rewards/margin": mean(a), "target_margin": mean(b),
                "logps/chosen": mean([d["logp"][i] for i in d["chosen"]]),
                "logps/rejected": mean([d["logp"][i] for i in d["rejected"]])}
    if nll_weight:
        expected["nll"] = nll
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        assert metrics[k].dim() == 0 and not metrics[k].requires_grad, k
        assert metrics[k].item() == pytest.approx(v, abs=1e-12, rel=1e-12), k

    # Gradients: d loss / d pi_c = beta/P * dD/da, d loss / d pi_r = -beta/P * dD/da (+ the NLL term's).
    loss.backward()
    want_grad = [0.0] * N
    chosen_tokens = sum(d["counts"][i] for i in d["chosen"])
    for p, (c, r) in enumerate(zip(d["chosen"], d["rejected"])):
        g = beta / P * expected_dloss_da(loss_type, a[p], b[p])
        want_grad[c] += g - nll_weight / chosen_tokens
        want_grad[r] -= g
    assert logp.grad.tolist() == pytest.approx(want_grad, abs=1e-12, rel=1e-10)


@pytest.mark.parametrize("loss_type", ["bwd_kl", "fwd_kl", "sq"])
def test_rpo_is_zero_when_the_policy_margin_matches_the_reward_margin(loss_type):
    d = random_case(3)
    beta, eta = 0.2, 0.5
    # Set each pair's chosen log-prob so that beta * h equals eta * (score_c - score_r) exactly.
    for p, (c, r) in enumerate(zip(d["chosen"], d["rejected"])):
        target = eta * (d["score_c"][p] - d["score_r"][p]) / beta
        d["logp"][c] = d["ref"][c] + target + (d["logp"][r] - d["ref"][r])
    _, pol, refs, batch = tensors(d)
    obj = build_objective(ObjectiveConfig(name="rpo", loss_type=loss_type, beta=beta, eta=eta))
    loss, _ = obj.loss(pol, refs, batch)
    assert abs(loss.item()) < 1e-12


def test_bwd_kl_is_stable_for_large_margins_and_tends_to_dpo():
    # b -> +inf: KL(Ber(1) || Ber(sig(a))) = -log sig(a), DPO's loss; fp32 stays finite for huge logits.
    a = torch.tensor([-30.0, -2.0, 0.0, 3.0, 40.0])
    b = torch.full_like(a, 60.0)
    from megatron.objectives import rpo_losses
    got = rpo_losses(a, b, "bwd_kl")
    assert torch.isfinite(got).all()
    want = [-math.log(sig(x)) if x > -20 else -x for x in a.tolist()]
    assert got.tolist() == pytest.approx(want, abs=1e-5, rel=1e-5)
    assert torch.isfinite(rpo_losses(a, -b, "fwd_kl")).all()


def test_missing_reward_margin_is_a_clear_error():
    d = random_case(1)
    _, pol, refs, batch = tensors(d)
    del batch["margin"]
    obj = build_objective(ObjectiveConfig(name="rpo", loss_type="bwd_kl"))
    with pytest.raises(ValueError, match="score_chosen/score_rejected"):
        obj.loss(pol, refs, batch)
    with pytest.raises(ValueError, match="needs reference"):
        obj.loss(pol, None, tensors(d)[3])


@pytest.mark.parametrize("overrides,key", [
    (["objective.loss_type=sigmoid"], "objective.loss_type"),
    (["objective.loss_type=bwd_k"], "objective.loss_type"),
    (["objective.loss_type=sq", "objective.eta=0"], "objective.eta"),
    (["objective.loss_type=sq", "objective.beta=-1"], "objective.beta"),
    (["objective.loss_type=sq", "objective.label_smoothing=0.1"], "objective.label_smoothing"),
    (["objective.loss_type=sq", "reference.mode=none"], "reference.mode"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_run_config([], ["objective.name=rpo"] + overrides)
    assert key in str(err.value)


def test_valid_config_resolves_live_reference_and_pairwise_data():
    cfg = load_run_config([], ["objective.name=rpo", "objective.loss_type=fwd_kl", "objective.eta=0.5"])
    assert cfg.derived.reference_mode == "live" and cfg.derived.data_kind == "pairwise"
    cfg = load_run_config([], ["objective.name=rpo", "objective.loss_type=bwd_kl", "reference.mode=precomputed"])
    assert cfg.derived.reference_mode == "precomputed"
    # eta belongs to rpo only
    with pytest.raises(ConfigError, match="objective.eta"):
        load_run_config([], ["objective.name=dpo", "objective.eta=2"])


@pytest.mark.parametrize("loss_type", ["bwd_kl", "fwd_kl", "sq"])
def test_unequal_micro_batches_give_the_full_batch_loss_gradient_and_metrics(loss_type):
    from megatron.objectives.aggregation import GLOBAL_COUNTS, GlobalCounts

    d = random_case(7)
    logp, pol, refs, batch = tensors(d)
    obj = build_objective(ObjectiveConfig(name="rpo", loss_type=loss_type, beta=0.4, eta=0.8, nll_weight=0.3))
    full_loss, full_metrics = obj.loss(pol, refs, batch)
    full_grad, = torch.autograd.grad(full_loss, logp)

    # Pairs split 3 + 1 + 1 over micro-batches (each with its own sequence numbering), as the loop would.
    counts = GlobalCounts(units={"examples": float(P), "chosen_tokens": sum(d["counts"][i] for i in d["chosen"])},
                          contributors=3)

    def micro_batch(part, with_counts):
        seqs = [d["chosen"][p] for p in part] + [d["rejected"][p] for p in part]
        k = len(part)
        sub_batch = {"chosen_idx": torch.arange(k), "rejected_idx": torch.arange(k, 2 * k),
                     "margin": batch["margin"][part]}
        if with_counts:
            sub_batch[GLOBAL_COUNTS] = counts
        return obj.loss(SequenceStats(pol.logp_sum[seqs], pol.token_count[seqs]),
                        SequenceStats(refs.logp_sum[seqs], refs.token_count[seqs]), sub_batch)

    parts = ([0, 1, 2], [3], [4])
    losses, metrics = zip(*(micro_batch(part, True) for part in parts))
    mean_loss = sum(losses) / len(losses)  # DeepSpeed: / grad_accum, then the mean over data-parallel ranks
    split_grad, = torch.autograd.grad(mean_loss, logp)
    assert mean_loss.item() == pytest.approx(full_loss.item(), abs=1e-12, rel=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-14)
    for key, value in full_metrics.items():  # metrics are global means the same way
        got = sum(float(m[key]) for m in metrics) / len(metrics)
        assert got == pytest.approx(float(value), abs=1e-12, rel=1e-12), key
    # Without the global counts each micro-batch is its own mean and their average differs (the test can fail).
    local = [micro_batch(part, False)[0].item() for part in parts]
    assert abs(sum(local) / len(local) - full_loss.item()) > 1e-6
