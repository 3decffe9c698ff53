"""Reward sources: the `RewardSource` interface and the python-function source (TRL's reward-function signature).

A source scores N completions at once:

    score(prompts: list[str], completions: list[str], columns: {name: list of N values},
          token_ids: list[list[int]] | None, prompt_index: list[int] | None) -> Float64[N]   (NaN = not scored)

`columns` are the prompt record's other fields, one value per completion (a record's fields repeated for each of its
completions); `prompt_index` is each completion's prompt (its index in rollout.prompts_path), used in error messages.
A reward model of ours is another source (`reward.model`, built by the online loop on its engine).

`FunctionReward` wraps `fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]`
(TRL's GRPOTrainer convention; None = this function does not score that completion). Only the arguments `fn`
declares are passed unless it takes **kwargs; async functions are run to completion. A function that raises, returns
the wrong number of values, or a non-finite / non-numeric value stops the run with a one-line `RewardError` naming
the function, the prompt index and the message.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

RESERVED_ARGS = ("prompts", "completions", "completion_ids")


class RewardError(RuntimeError):
    """A reward source failed; the message is one line naming the source, the prompt index and the cause."""


def one_line(text: Any, limit: int = 500) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space, cut at `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores completions (a python function, a verifier, a reward model)."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]],
              token_ids: Optional[Sequence[Sequence[int]]] = None,
              prompt_index: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Float64[N] rewards, NaN where the source does not score a completion."""
        ...


class FunctionReward:
    """A python reward function as a `RewardSource` (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], name: str):
        """fn: the reward function; name: how errors and metrics name it (the built-in name or 'file.py:fn')."""
        if not callable(fn):
            raise TypeError(f"reward function '{name}' is not callable ({type(fn).__name__})")
        self.fn = fn
        self.name = name
        params = inspect.signature(fn).parameters.values()
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        named = [p for p in params if p.kind in kinds]
        self._accepts = {p.name for p in named}
        self._required = [p.name for p in named if p.default is inspect.Parameter.empty]

    # ---------------------------------------------------------------------------------------------
    def _kwargs(self, prompts, completions, columns, token_ids) -> Dict[str, Any]:
        clash = [c for c in columns if c in RESERVED_ARGS]
        if clash:
            raise RewardError(f"reward function '{self.name}': the prompt records have a column named {clash[0]!r}, "
                              f"which clashes with the argument of that name; rename the column")
        everything: Dict[str, Any] = {"prompts": list(prompts), "completions": list(completions),
                                      "completion_ids": token_ids, **{k: list(v) for k, v in columns.items()}}
        missing = [a for a in self._required if a not in everything or (a == "completion_ids" and token_ids is None)]
        if missing:
            raise RewardError(f"reward function '{self.name}' needs argument {missing[0]!r}, which is neither "
                              f"prompts/completions/completion_ids nor a prompt-record column (columns: "
                              f"{', '.join(sorted(columns)) or 'none'})")
        if self._var_kw:
            return everything
        return {k: v for k, v in everything.items() if k in self._accepts}

    def _call(self, kwargs: Dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(self.fn):
            return asyncio.run(self.fn(**kwargs))
        return self.fn(**kwargs)

    @staticmethod
    def _slice(kwargs: Dict[str, Any], k: int) -> Dict[str, Any]:
        return {key: (v[k:k + 1] if isinstance(v, list) else v) for key, v in kwargs.items()}

    def _where(self, prompt_index: Optional[Sequence[int]], k: int) -> str:
        return f"prompt index {prompt_index[k]}" if prompt_index is not None else f"completion {k}"

    def score(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]],
              token_ids: Optional[Sequence[Sequence[int]]] = None,
              prompt_index: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Call the function on all N completions -> Float64[N] (NaN where it returned None); RewardError if it
        raises (the failing completion is found by calling it on each one alone), returns the wrong length, or a
        value that is not a finite number."""
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError(f"reward '{self.name}': prompts, completions and every column need {n} entries")
        kwargs = self._kwargs(prompts, completions, columns, token_ids)
        try:
            out = self._call(kwargs)
        except Exception as exc:  # noqa: BLE001  (any user error becomes one clear line)
            where, cause = self._locate(kwargs, n, prompt_index, exc)
            raise RewardError(f"reward function '{self.name}' raised on {where}: {type(cause).__name__}: "
                              f"{one_line(cause)}") from exc
        return self._check(out, n, prompt_index)

    def _locate(self, kwargs, n, prompt_index, exc):
        """The first completion the function fails on alone, or all of them when each alone succeeds."""
        for k in range(n):
            try:
                self._call(self._slice(kwargs, k))
            except Exception as one:  # noqa: BLE001
                return self._where(prompt_index, k), one
        where = (f"prompt indices {sorted(set(prompt_index))}" if prompt_index is not None
                 else f"completions 0..{n - 1}") + " (together; each alone succeeds)"
        return where, exc

    def _check(self, out: Any, n: int, prompt_index: Optional[Sequence[int]]) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().reshape(-1).tolist()
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
            where = (f"prompt indices {sorted(set(prompt_index))}" if prompt_index is not None else "the batch")
            raise RewardError(f"reward function '{self.name}' returned {type(out).__name__} for {where}; it must "
                              f"return a list of {n} floats (or None)")
        values = list(out)
        if len(values) != n:
            where = (f"prompt indices {sorted(set(prompt_index))}" if prompt_index is not None else "the batch")
            raise RewardError(f"reward function '{self.name}' returned {len(values)} rewards for {n} completions "
                              f"({where}); it must return one per completion")
        result: List[float] = []
        for k, v in enumerate(values):
            if v is None:
                result.append(math.nan)
                continue
            if not isinstance(v, numbers.Real):
                raise RewardError(f"reward function '{self.name}' returned {type(v).__name__} {one_line(repr(v), 80)} "
                                  f"for {self._where(prompt_index, k)}; rewards must be numbers or None")
            f = float(v)
            if not math.isfinite(f):
                raise RewardError(f"reward function '{self.name}' returned {f} for {self._where(prompt_index, k)}; "
                                  "rewards must be finite (return None to skip a completion)")
            result.append(f)
        return torch.tensor(result, dtype=torch.float64)
