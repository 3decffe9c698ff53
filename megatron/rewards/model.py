"""`reward.model`: a reward-model checkpoint of ours as a reward source, scored on the ranks that generate.

The checkpoint (`reward.model`: a run directory with `latest`, or a tag directory) may have been saved at any
tensor/pipeline layout; it is loaded re-sharded to this run's `parallel.tensor` (its own model section decides
the shape, `model.value_head` true), frozen, in `train.precision`, and ZeRO-3 partitioned like the policy when the
policy is. Each data-parallel rank scores its own completions; tensor-parallel peers score the same ones together.

A completion is scored as the reward model saw its training sequences: the prompt text followed by the completion
text (chat prompts: the messages plus an assistant turn, rendered with the chat template), tokenised with the
reward model's tokenizer (BOS when it uses one), EOS appended when the text does not end with it; the score is
the value head at the last token. Sequences are packed into micro-batches of `train.micro_batch_size` sequences
(the same number of forwards on every data-parallel rank, as ZeRO-3 needs).
"""
from __future__ import annotations

import copy
import os
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import torch

from megatron.checkpoint import weights_io as wio
from megatron.config import ConfigError, derive_and_validate
from megatron.data.collate import collate
from megatron.data.dataset import Example, SequenceData
from megatron.engines.build import build_policy, freeze_as_reference
from megatron.engines.forward import batch_to, forward_stats

MODEL_SOURCE_NAME = "model"  # the reward source's name in metrics (reward/model)


def reward_model_config(cfg, tag_dir: str):
    """The Config of the reward model inside this run: the checkpoint's model section with its value head, this
    run's layout (tensor, ZeRO stage, precision, micro-batch size), unpipelined, no reference."""
    saved = wio.read_config(tag_dir)
    if not saved.model.value_head:
        raise ConfigError(f"key 'reward.model': {tag_dir} is not a reward model (its model.value_head is false); "
                          "give a checkpoint trained with objective rm")
    rm = copy.deepcopy(cfg)
    rm.model = copy.deepcopy(saved.model)
    rm.model.max_seq_len = max(saved.model.max_seq_len, cfg.model.max_seq_len)
    rm.parallel.pipeline = 1
    rm.parallel.sequence_parallel = False
    rm.parallel.activation_checkpointing = False
    rm.reference.load = None
    rm.checkpoint.load = None
    rm.data.tokenizer = saved.data.tokenizer or cfg.data.tokenizer
    try:
        return derive_and_validate(rm, cfg.derived.world_size)
    except ConfigError as exc:
        raise ConfigError(f"key 'reward.model': {tag_dir} cannot run at this layout: {exc}") from None


class ModelReward:
    """A frozen value-head model as a `RewardSource` (module docstring)."""

    def __init__(self, model, rm_cfg, ps, tokenizer, template: Optional[str] = None, name: str = MODEL_SOURCE_NAME):
        """model: the frozen reward model (GPTModel with value head, or an inference DeepSpeed engine);
        rm_cfg: its Config; tokenizer: the reward model's; template: chat template source for chat prompts."""
        self.model = model
        self.cfg = rm_cfg
        self.ps = ps
        self.tokenizer = tokenizer
        self.template = template
        self.name = name

    def sequence(self, prompt: Any, completion: str) -> List[int]:
        """Token ids the reward model scores for one (prompt, completion) (module docstring)."""
        tok = self.tokenizer
        if isinstance(prompt, list):  # chat messages
            if self.template is None:
                raise ConfigError("key 'reward.model': chat prompts need a chat template, but the reward model's "
                                  "tokenizer has none; set data.chat_template")
            text = tok.render_chat(self.template, list(prompt) + [{"role": "assistant", "content": completion}],
                                   False)
        else:
            text = str(prompt) + completion
        ids = tok.encode(text)
        if tok.add_bos and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        if not ids or ids[-1] != tok.eos_id:
            ids.append(tok.eos_id)
        limit = self.cfg.model.max_seq_len
        return ids[-limit:] if len(ids) > limit else ids  # keep the end: the score is read at the last token

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Float64[N]: the value head at the last token of each token sequence."""
        mbs = self.cfg.train.micro_batch_size
        device = next(iter(getattr(self.model, "module", self.model).parameters())).device
        out: List[torch.Tensor] = []
        for start in range(0, len(sequences), mbs):
            chunk = sequences[start:start + mbs]
            examples = [Example(index=i, kind="sft", sequences=[SequenceData(
                ids=np.asarray(s, dtype=np.int64), prompt_len=len(s), dataset_index=i)]) for i, s in enumerate(chunk)]
            batch = batch_to(collate(examples, pack=True, max_seq_len=self.cfg.model.max_seq_len), device)
            out.append(forward_stats(self.model, batch, self.ps, value_head=True).scores.double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def score(self, prompts: Sequence[Any], completions: Sequence[str], columns: Mapping[str, Sequence[Any]],
              token_ids: Optional[Sequence[Sequence[int]]] = None,
              prompt_index: Optional[Sequence[int]] = None) -> torch.Tensor:
        """`RewardSource.score`: Float64[N] reward-model scores of the N (prompt, completion) texts."""
        if len(prompts) != len(completions):
            raise ValueError(f"reward '{self.name}': {len(prompts)} prompts for {len(completions)} completions")
        return self.score_ids([self.sequence(p, c) for p, c in zip(prompts, completions)])


def build_reward_model(cfg, ps, ds_module, device) -> ModelReward:
    """The `reward.model` source of this run (every rank; collective when ZeRO-3 partitions it)."""
    from megatron.data import load_tokenizer
    from megatron.data.chat_template import resolve_chat_template

    if not os.path.exists(cfg.reward.model):
        raise ConfigError(f"key 'reward.model': {cfg.reward.model!r} does not exist; give a reward-model checkpoint "
                          "directory of ours (a run's checkpoint.save, or one of its step_* tags)")
    tag_dir = wio.resolve_tag_dir(cfg.reward.model)
    rm_cfg = reward_model_config(cfg, tag_dir)
    model = freeze_as_reference(rm_cfg, ps, build_policy(rm_cfg, ps, tag_dir), device, ds_module)
    tokenizer = load_tokenizer(rm_cfg.data.tokenizer, key="reward.model (its data.tokenizer)")
    template = resolve_chat_template(cfg.data.chat_template, tokenizer.chat_template)
    return ModelReward(model, rm_cfg, ps, tokenizer, template)
