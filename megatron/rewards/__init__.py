"""Reward sources for online RL: python functions with TRL's signature (built-ins `exact_match`, `math`, or
`path/to/file.py:name`), combined with weights; a reward model of ours is another `RewardSource` that the online
loop builds on its engine (`reward.model`). Plus DAPO's overlong length penalty.

    rewards = build_reward_set(cfg)                       # from the `reward:` section
    scores = rewards.score(prompts, completions, columns, token_ids, prompt_index)   # RewardScores (total Float64[N])
"""
from .sources import FunctionReward, RewardError, RewardSource, one_line
from .registry import load_reward_function, register_reward, registered_rewards
from . import builtin_rewards  # noqa: F401  (registers exact_match and math)
from .combine import RewardScores, RewardSet, build_reward_set
from .shaping import overlong_penalty

__all__ = ["FunctionReward", "RewardError", "RewardSource", "one_line", "load_reward_function", "register_reward",
           "registered_rewards", "RewardScores", "RewardSet", "build_reward_set", "overlong_penalty"]
