"""Reward sources: TRL's function signature from files and built-ins, weights and skips, one-line errors that name the
function and the prompt, math-verify (when installed), DAPO's overlong penalty."""
import importlib.util
import math
import re

import pytest
import torch

from megatron.config import Config, ConfigError
from megatron.rewards import (FunctionReward, RewardError, RewardSet, build_reward_set, load_reward_function,
                              overlong_penalty, registered_rewards)

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None

USER_FUNCS = '''
import math
import re

def length_reward(completions, **kwargs):
    return [len(c) / 10 for c in completions]

def uses_column(prompts, completions, answer, difficulty):
    return [float(a in c) * d for c, a, d in zip(completions, answer, difficulty)]

def skips_odd(completions, completion_ids, **kwargs):
    return [None if len(ids) % 2 else 1.0 for ids in completion_ids]

def raises_on_bad(completions, **kwargs):
    out = []
    for c in completions:
        if "bad" in c:
            raise ValueError("cannot score this\\nsecond line")
        out.append(1.0)
    return out

def raises_in_batch(completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("batch too large")
    return [0.0]

def wrong_length(completions, **kwargs):
    return [1.0] * (len(completions) + 1)

def returns_nan(completions, **kwargs):
    return [math.nan if c == "x" else 0.0 for c in completions]

def returns_text(completions, **kwargs):
    return ["1.0" for c in completions]

def returns_scalar(completions, **kwargs):
    return 1.0

async def async_reward(completions, **kwargs):
    return [2.0 for _ in completions]

not_a_function = 3
'''


@pytest.fixture()
def funcs(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FUNCS)
    return str(path)


def reward_cfg(functions, weights=(), answer_field="answer"):
    cfg = Config()
    cfg.reward.function = list(functions)
    cfg.reward.weights = list(weights)
    cfg.reward.answer_field = answer_field
    return cfg


PROMPTS = ["1+1=", "2+2=", "3+3=", "4+4="]
COMPLETIONS = ["2", " 4 ", "six", "bad 8"]
COLUMNS = {"answer": ["2", "4", "6", "8"], "difficulty": [1.0, 2.0, 3.0, 4.0]}
IDS = [[5], [6, 7], [8, 9, 10], [11, 12]]
INDEX = [10, 11, 12, 13]


def score(cfg):
    return build_reward_set(cfg).score(PROMPTS, COMPLETIONS, COLUMNS, IDS, INDEX)


def test_builtin_registry_and_exact_match():
    assert registered_rewards() == ["exact_match", "math"]
    s = score(reward_cfg(["exact_match"]))
    assert s.total.tolist() == [1.0, 1.0, 0.0, 0.0] and s.scored.all()
    with pytest.raises(ConfigError, match="did you mean 'exact_match'"):
        load_reward_function("exact_mach", Config().reward)


def test_file_functions_columns_and_weights(funcs):
    cfg = reward_cfg([f"{funcs}:length_reward", f"{funcs}:uses_column", "exact_match"], weights=[0.5, 1.0, 2.0])
    s = score(cfg)
    length = [len(c) / 10 for c in COMPLETIONS]
    column = [float(a in c) * d for c, a, d in zip(COMPLETIONS, COLUMNS["answer"], COLUMNS["difficulty"])]
    exact = [1.0, 1.0, 0.0, 0.0]
    expect = [0.5 * a + b + 2 * c for a, b, c in zip(length, column, exact)]
    assert s.total.dtype == torch.float64
    assert all(abs(x - y) < 1e-12 for x, y in zip(s.total.tolist(), expect))
    assert s.per_source[f"{funcs}:uses_column"].tolist() == column


def test_none_skips_and_a_completion_nobody_scores(funcs):
    s = score(reward_cfg([f"{funcs}:skips_odd"], weights=[3.0]))
    assert s.scored.tolist() == [False, True, False, True]
    assert s.total.tolist() == [0.0, 3.0, 0.0, 3.0]
    assert math.isnan(s.per_source[f"{funcs}:skips_odd"][0].item())
    both = score(reward_cfg([f"{funcs}:skips_odd", "exact_match"]))
    assert both.scored.all() and both.total.tolist() == [1.0, 2.0, 0.0, 1.0]


def test_async_function(funcs):
    assert score(reward_cfg([f"{funcs}:async_reward"])).total.tolist() == [2.0] * 4


@pytest.mark.parametrize("fn,pattern", [
    ("raises_on_bad", r"^reward function '.*my_rewards.py:raises_on_bad' raised on prompt index 13: ValueError: "
                      r"cannot score this second line$"),
    ("raises_in_batch", r"raised on prompt indices \[10, 11, 12, 13\] \(together; each alone succeeds\): "
                        r"RuntimeError: batch too large$"),
    ("wrong_length", r"'.*:wrong_length' returned 5 rewards for 4 completions \(prompt indices \[10, 11, 12, 13\]\)"),
    ("returns_nan", None),
    ("returns_text", r"returned str '1.0' for prompt index 10; rewards must be numbers or None"),
    ("returns_scalar", r"returned float for prompt indices"),
])
def test_bad_functions_give_one_line_errors(funcs, fn, pattern):
    completions = list(COMPLETIONS)
    if fn == "returns_nan":
        completions[2] = "x"
        pattern = r"'.*:returns_nan' returned nan for prompt index 12; rewards must be finite"
    with pytest.raises(RewardError) as err:
        build_reward_set(reward_cfg([f"{funcs}:{fn}"])).score(PROMPTS, completions, COLUMNS, IDS, INDEX)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(pattern, msg), msg


def test_missing_column_and_argument(funcs):
    with pytest.raises(RewardError, match=r"exact_match' raised on prompt index 10: KeyError: .*'solution' "
                                          r"\(reward.answer_field\).*answer, difficulty"):
        score(reward_cfg(["exact_match"], answer_field="solution"))
    with pytest.raises(RewardError, match="needs argument 'difficulty'"):
        build_reward_set(reward_cfg([f"{funcs}:uses_column"])).score(PROMPTS, COMPLETIONS,
                                                                     {"answer": COLUMNS["answer"]})
    with pytest.raises(RewardError, match="clashes"):
        build_reward_set(reward_cfg(["exact_match"])).score(PROMPTS, COMPLETIONS, {**COLUMNS, "prompts": PROMPTS})


def test_bad_specs_are_config_errors(funcs, tmp_path):
    cases = [
        ("missing.py:f", "not found"),
        (f"{funcs}:lenght_reward", "did you mean 'length_reward'"),
        (f"{funcs}:not_a_function", "not a function"),
        (funcs, "names a file but no function"),
    ]
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_xyz\n")
    cases.append((f"{broken}:f", "importing .* failed: ModuleNotFoundError"))
    for spec, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            build_reward_set(reward_cfg([spec]))
        assert "reward.function" in str(err.value)
    with pytest.raises(ConfigError, match="listed twice"):
        build_reward_set(reward_cfg(["exact_match", "exact_match"]))
    with pytest.raises(ConfigError, match="reward.weights"):
        build_reward_set(reward_cfg(["exact_match"], weights=[1, 2]))


def test_reward_model_is_a_source_the_loop_provides():
    cfg = reward_cfg(["exact_match"])
    cfg.reward.model = "ckpts/rm"
    with pytest.raises(ConfigError, match="reward.model"):
        build_reward_set(cfg)

    class FakeModel:  # what the online loop will pass: any RewardSource
        name = "model"

        def score(self, prompts, completions, columns, token_ids=None, prompt_index=None):
            return torch.tensor([float(len(t)) for t in token_ids], dtype=torch.float64)

    cfg.reward.weights = [1.0, 0.5]
    s = build_reward_set(cfg, model_source=FakeModel()).score(PROMPTS, COMPLETIONS, COLUMNS, IDS, INDEX)
    assert s.total.tolist() == [1.5, 2.0, 1.5, 1.0]


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed (pip install math-verify)")
def test_math_reward_with_math_verify():
    cfg = reward_cfg(["math"])
    completions = ["The answer is \\boxed{\\frac{1}{2}}", "so it is 0.5", "I get 3/4", "no idea", "42"]
    columns = {"answer": ["0.5", "\\frac{1}{2}", "0.5", "7", None]}
    s = build_reward_set(cfg).score(["q"] * 5, completions, columns, None, list(range(5)))
    assert s.per_source["math"][:4].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert not s.scored[4].item()  # no reference answer: not scored


def test_math_reward_without_math_verify_says_how_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_math_verify(name, *a, **k):
        if name.startswith("math_verify"):
            raise ImportError("no math_verify")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(ConfigError, match="pip install math-verify"):
        build_reward_set(reward_cfg(["math"]))


def test_overlong_penalty_matches_dapo():
    """DAPO eq. 13 with L_max = 20, L_cache = 8, scaled by the penalty."""
    lengths = torch.tensor([0, 5, 12, 13, 16, 20, 25])
    got = overlong_penalty(lengths, max_len=20, buffer=8, penalty=0.5).tolist()
    expect = []
    for y in lengths.tolist():
        if y <= 12:
            r = 0.0
        elif y <= 20:
            r = (12 - y) / 8
        else:
            r = -1.0
        expect.append(0.5 * r)
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, expect))
    assert overlong_penalty(lengths, 20, 0).tolist() == [0.0] * 7


def test_function_reward_directly():
    src = FunctionReward(lambda completions, **kw: [1.0 for _ in completions], "lambda")
    assert src.score(["a"], ["b"], {}).tolist() == [1.0]
    assert RewardSet([src]).names == ["lambda"]
