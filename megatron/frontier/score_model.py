"""Scoring units with a model of ours: a reward model (value head) or an LLM judge (the generation engine).

    model, mcfg, tok = load_scorer(cfg, "score.model", path, ps, world, value_head=True)
    scores = reward_model_scores(model, mcfg, ps, tok, units, batch_size)     # List[UnitScore]
    scores = judge_scores(model, mcfg, ps, tok, template, units, indices, params, batch_size)

The model is one of our checkpoints (any saved tensor/pipeline layout, re-sharded to `parallel.tensor` on load;
its own model and data sections decide its shape, tokenizer and chat template). Reward model: each unit is
encoded as an SFT record of the reward model's own data settings (megatron.data.encode: BOS, template, EOS after
the response), packed into rows of its `max_seq_len`, and `engines.forward.forward_stats` reads the value at
each sequence's last token. Judge: the template renders a prompt per unit, `generation.generate` answers it,
`JudgeTemplate.parse` reads the grade. Both run on `generation.replica.generation_model` (ZeRO-3 weights
gathered once), so data-parallel ranks may hold different numbers of units.

This module builds models (the engines floor); only tools import megatron.frontier.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import torch

from megatron.config import ConfigError
from megatron.data.errors import RecordProblem
from megatron.data.records import IDS

from .judge import JudgeTemplate
from .scoring import Unit, UnitScore, unit_texts


def load_scorer(cfg, key: str, path: str, ps, world: int, value_head: bool):
    """(model ready for inference, its Config, its tokenizer) of the checkpoint `path` named by config `key`.

    value_head: True for a reward model (the checkpoint must have one), False for a judge (it must not).
    Raises ConfigError naming `key` for a missing checkpoint or the wrong kind of model.
    """
    import deepspeed
    from megatron.checkpoint import weights_io as wio
    from megatron.config import derive_and_validate
    from megatron.data import load_tokenizer
    from megatron.engines.build import build_policy, device_for_rank, freeze_as_reference

    if not path or not os.path.exists(path):
        raise ConfigError(f"key '{key}': checkpoint {path!r} does not exist (a checkpoint dir of ours with "
                          "`latest`, or a tag dir)")
    tag_dir = wio.resolve_tag_dir(path)
    saved = wio.read_config(tag_dir)
    if bool(saved.model.value_head) != value_head:
        what = ("a reward model: this checkpoint has no value head (train one with objective rm)" if value_head
                else "a language model: this checkpoint is a reward model (value head), which cannot generate")
        raise ConfigError(f"key '{key}': {path} must be {what}")
    mcfg = copy.deepcopy(cfg)
    mcfg.model = copy.deepcopy(saved.model)
    mcfg.data = copy.deepcopy(saved.data)  # the tokenizer, template and fields the model was trained with
    root = os.path.dirname(os.path.abspath(tag_dir))
    if os.path.isdir(os.path.join(root, "tokenizer")):  # a converted model carries its tokenizer
        mcfg.data.tokenizer = os.path.join(root, "tokenizer")
    if not mcfg.data.tokenizer:
        mcfg.data.tokenizer = cfg.data.tokenizer
    mcfg.parallel.pipeline = 1
    mcfg.parallel.sequence_parallel = False
    mcfg.reference.load = None
    mcfg = derive_and_validate(mcfg, world)
    model = freeze_as_reference(mcfg, ps, build_policy(mcfg, ps, tag_dir), device_for_rank(), deepspeed)
    return model, mcfg, load_tokenizer(mcfg.data.tokenizer, key=f"{key} (its data.tokenizer)")


def _encoder(mcfg, tokenizer):
    """An SFT Encoder with the model's data settings; prompts may use all but one token of max_seq_len."""
    from megatron.data.encode import Encoder
    from megatron.data.settings import preprocess_settings

    settings = replace(preprocess_settings(mcfg), kind="sft", max_prompt_len=mcfg.model.max_seq_len - 1,
                       on_bad_record="skip")
    return Encoder(tokenizer, settings)


@torch.no_grad()
def reward_model_scores(model, mcfg, ps, tokenizer, units: Sequence[Unit], batch_size: int) -> List[UnitScore]:
    """The value-head score (at the last token of prompt + response + EOS) of every unit, in order.

    Token ids: the reward model's training encoding (megatron.data.encode with its saved data settings), so the
    score is read where training read it; an empty response is prompt + EOS (`ModelReward.sequence`, as the
    online loop scores it). Units that still cannot be encoded (a prompt longer than max_seq_len - 1, ...) get
    None with the data reason code; responses cut to max_seq_len are scored and flagged `truncated`. The packed
    forward is the online loop's reward source (`megatron.rewards.model.ModelReward.score_ids`), run on a plain
    replica (ZeRO-3 weights gathered once), so ranks may score different numbers of units.
    """
    from megatron.data.chat_template import resolve_chat_template
    from megatron.data.errors import EMPTY_RESPONSE
    from megatron.generation.replica import generation_model
    from megatron.rewards.model import ModelReward

    encoder = _encoder(mcfg, tokenizer)
    template = resolve_chat_template(mcfg.data.chat_template, tokenizer.chat_template)
    out: List[Optional[UnitScore]] = [None] * len(units)
    ready: List[Tuple[int, List[int], bool]] = []  # (unit position, ids, truncated)
    for k, unit in enumerate(units):
        if unit.problem is not None:
            out[k] = UnitScore(None, unit.problem.reason)
            continue
        try:
            enc = encoder.encode(unit.normal)
            ready.append((k, enc.sequences[0].ids, enc.truncated))
        except RecordProblem as problem:
            if problem.reason == EMPTY_RESPONSE and unit.normal.mode != IDS:
                ids = ModelReward(None, mcfg, ps, tokenizer, template).sequence(unit.normal.prompt, "")
                ready.append((k, ids, False))
            else:
                out[k] = UnitScore(None, problem.reason)
    rm_cfg = copy.deepcopy(mcfg)
    rm_cfg.train.micro_batch_size = batch_size  # sequences per packed forward
    with generation_model(model, mcfg, ps) as module:
        scores = ModelReward(module, rm_cfg, ps, tokenizer, template).score_ids([ids for _, ids, _ in ready]).tolist()
    for (k, _, cut), s in zip(ready, scores):
        out[k] = UnitScore(s, None, truncated=cut) if math.isfinite(s) else UnitScore(None, "non_finite")
    return out  # type: ignore[return-value]


def _eos_ids(tokenizer, mcfg) -> List[int]:
    """EOS of the tokenizer plus those of a converted model's hf/generation_config.json."""
    ids = {tokenizer.eos_id}
    tok_dir = mcfg.data.tokenizer or ""
    path = os.path.join(os.path.dirname(os.path.abspath(tok_dir)), "hf", "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            eos = json.load(fh).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def judge_prompt_ids(template: JudgeTemplate, unit: Unit, tokenizer, chat_template: Optional[str]) -> List[int]:
    """Token ids of the judge's prompt for one unit (a user turn through `chat_template` when the template
    file asks for chat and the judge has one; else the plain text), BOS as a training prompt gets it."""
    from megatron.generation.prompts import encode_prompt

    prompt, response = unit_texts(unit, tokenizer.decode)
    text = template.render(prompt, response)
    record = ({"messages": [{"role": "user", "content": text}]} if template.chat and chat_template
              else {"prompt": text})
    return encode_prompt(record, tokenizer, chat_template, unit.where)


@torch.no_grad()
def judge_scores(model, mcfg, ps, tokenizer, template: JudgeTemplate, units: Sequence[Unit],
                 indices: Sequence[int], params, batch_size: int) -> List[UnitScore]:
    """The judge's parsed grade for every unit, in order (None + reason when unparseable, with the answer).

    indices: each unit's global index (the sampling seed's prompt index, so answers do not depend on how units
    are split across ranks); params: generation.SamplingParams (n = 1).
    """
    from megatron.data.chat_template import resolve_chat_template
    from megatron.generation import generate

    chat_template = resolve_chat_template(mcfg.data.chat_template, tokenizer.chat_template)
    out: List[Optional[UnitScore]] = [None] * len(units)
    prompts, where, seeds = [], [], []
    for k, unit in enumerate(units):
        if unit.problem is not None:
            out[k] = UnitScore(None, unit.problem.reason)
            continue
        try:
            ids = judge_prompt_ids(template, unit, tokenizer, chat_template)
        except RecordProblem as problem:
            out[k] = UnitScore(None, problem.reason)
            continue
        if len(ids) >= mcfg.model.max_seq_len:
            out[k] = UnitScore(None, "judge_prompt_too_long")
            continue
        prompts.append(ids)
        where.append(k)
        seeds.append(int(indices[k]))
    answers = generate(model, mcfg, ps, prompts, params, prompt_indices=seeds, eos_token_ids=_eos_ids(tokenizer, mcfg),
                       batch_size=batch_size, detokenize=tokenizer.decode) if prompts else []
    for k, comps in zip(where, answers):
        text = comps[0].text or ""
        grade, reason = template.parse(text)
        out[k] = UnitScore(grade, reason, judge_answer=text)
    return out  # type: ignore[return-value]

