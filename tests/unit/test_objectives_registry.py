"""Registry lookups, config validation through load_config, reference needs, the KTO weight warning."""
import pytest

from megatron.config import ConfigError
from megatron.engines.run_config import load_run_config as load_config
from megatron.config.schema import ObjectiveConfig
from megatron.objectives import (KTOObjective, Objective, build_objective, get_objective_class,
                                 kto_class_weight_warning, register_objective, registered_objectives)


def test_all_objectives_registered():
    assert registered_objectives() == ["dpo", "grpo", "kto", "mdloo", "orpo", "ppo", "reinforce_pp", "rloo", "rm",
                                       "rpo", "sft", "simpo"]
    kinds = {n: get_objective_class(n).batch_kind for n in registered_objectives()}
    assert kinds == {"dpo": "pairwise", "kto": "unpaired", "orpo": "pairwise", "rm": "pairwise",
                     "rpo": "pairwise", "sft": "single", "simpo": "pairwise",
                     **{n: "rollout" for n in ("grpo", "mdloo", "ppo", "reinforce_pp", "rloo")}}
    assert [n for n in registered_objectives() if get_objective_class(n).uses_value_head] == ["rm"]


def test_unknown_name_did_you_mean():
    with pytest.raises(ConfigError) as err:
        get_objective_class("dpoo")
    msg = str(err.value)
    assert "objective.name" in msg and "did you mean 'dpo'" in msg
    assert "dpo, grpo, kto, mdloo, orpo, ppo, reinforce_pp, rloo, rm, rpo, sft, simpo" in msg
    with pytest.raises(ConfigError, match="did you mean 'simpo'"):
        load_config([], ["objective.name=simp0"])


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        @register_objective("dpo")
        class Other(Objective):
            pass
    assert get_objective_class("dpo").__name__ == "DPOObjective"


def test_bad_loss_type_via_load_config():
    with pytest.raises(ConfigError) as err:
        load_config([], ["objective.name=dpo", "objective.loss_type=sigmoidd"])
    assert "objective.loss_type" in str(err.value) and "did you mean 'sigmoid'" in str(err.value)


@pytest.mark.parametrize("overrides,key", [
    (["objective.name=dpo", "objective.label_smoothing=0.5"], "objective.label_smoothing"),
    (["objective.name=dpo", "objective.label_smoothing=-0.1"], "objective.label_smoothing"),
    (["objective.name=dpo", "objective.loss_type=ipo", "objective.label_smoothing=0.1"], "objective.label_smoothing"),
    (["objective.name=dpo", "objective.beta=0"], "objective.beta"),
    (["objective.name=dpo", "objective.nll_weight=-1"], "objective.nll_weight"),
    (["objective.name=kto", "objective.desirable_weight=0"], "objective.desirable_weight"),
    (["objective.name=kto", "objective.undesirable_weight=-2"], "objective.undesirable_weight"),
    (["objective.name=simpo", "reference.mode=live"], "reference.mode"),
    (["objective.name=orpo", "reference.mode=precomputed"], "reference.mode"),
    (["objective.name=dpo", "objective.reference_free=true", "reference.mode=live"], "reference.mode"),
    (["objective.name=rm", "objective.center_weight=-0.1"], "objective.center_weight"),
    (["objective.name=sft", "objective.beta=0.3"], "objective.beta"),
    (["objective.name=kto", "objective.loss_type=ipo"], "objective.loss_type"),
    (["objective.name=dpo", "data.kind=unpaired"], "data.kind"),
    (["objective.name=sft", "model.value_head=true"], "model.value_head"),
])
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert key in str(err.value)


def test_simpo_reference_message_says_unused():
    with pytest.raises(ConfigError, match="never used"):
        load_config([], ["objective.name=simpo", "reference.mode=live"])


def test_reference_needs():
    assert get_objective_class("dpo").needs_reference(ObjectiveConfig(name="dpo"))
    assert not get_objective_class("dpo").needs_reference(ObjectiveConfig(name="dpo", reference_free=True))
    assert KTOObjective.needs_reference(ObjectiveConfig(name="kto"))
    for n in ("sft", "rm", "simpo", "orpo"):
        assert not get_objective_class(n).needs_reference(ObjectiveConfig(name=n))
    assert load_config([], ["objective.name=dpo"]).derived.reference_mode == "live"
    assert load_config([], ["objective.name=dpo", "reference.mode=precomputed"]).derived.reference_mode == "precomputed"
    assert load_config([], ["objective.name=dpo", "objective.reference_free=true"]).derived.reference_mode == "none"
    assert load_config([], ["objective.name=kto"]).derived.reference_mode == "live"
    assert load_config([], ["objective.name=simpo"]).derived.reference_mode == "none"
    with pytest.raises(ConfigError, match="reference"):
        load_config([], ["objective.name=kto", "reference.mode=none"])


def test_valid_configs_and_build():
    cfg = load_config([], ["objective.name=rm", "objective.margin=0.5", "data.kind=pairwise"])
    assert cfg.model.value_head is True
    obj = build_objective(cfg, None)
    assert obj.name == "rm" and obj.cfg.margin == 0.5 and obj.ps is None
    cfg = load_config([], ["objective.name=dpo", "objective.loss_type=robust", "objective.label_smoothing=0.2",
                           "objective.nll_weight=1.0", "data.kind=auto"])
    assert build_objective(cfg.objective).cfg.loss_type == "robust"
    load_config([], ["objective.name=simpo", "objective.gamma=1.0", "objective.beta=2.0"])
    load_config([], ["objective.name=orpo", "objective.orpo_lambda=0.2"])
    load_config([], ["objective.name=kto", "objective.desirable_weight=1.33", "data.kind=unpaired"])
    load_config([], ["objective.name=sft", "data.kind=sft"])


def test_kto_class_weight_warning():
    assert kto_class_weight_warning(100, 100, 1.0, 1.0) is None
    assert kto_class_weight_warning(100, 100, 1.3, 1.0) is None
    # ratio 1/10: too few desirable -> raise desirable_weight into [10, 13.33]
    msg = kto_class_weight_warning(10, 100, 1.0, 1.0)
    assert msg is not None and "objective.desirable_weight=" in msg and "0.1" in msg
    value = float(msg.split("objective.desirable_weight=")[1].split()[0])
    assert 10.0 <= value <= 40.0 / 3.0
    assert 1.0 <= value * 10 / (1.0 * 100) <= 4.0 / 3.0
    # ratio 3: too many desirable -> raise undesirable_weight
    msg = kto_class_weight_warning(300, 100, 1.0, 1.0)
    value = float(msg.split("objective.undesirable_weight=")[1].split()[0])
    assert 1.0 <= 300 * 1.0 / (value * 100) <= 4.0 / 3.0
    # just outside the upper bound
    assert kto_class_weight_warning(100, 100, 1.34, 1.0) is not None
    assert kto_class_weight_warning(100, 100, 0.99, 1.0) is not None
    assert "no undesirable" in kto_class_weight_warning(5, 0, 1.0, 1.0)
