"""Hugging Face tensors <-> canonical full (tensor=1) tensors, one rule table for both directions.

A `Rule` ties one canonical key to one or more HF keys and a join:
  * `copy`  one HF tensor is the canonical tensor;
  * `vocab` the same, with rows zero-padded to `pad_vocab(vocab, 1)` on import and cut to `vocab` on export;
  * `cat`   several HF tensors concatenated along dim 0 (Llama q|k|v -> qkv, gate|up -> fc1);
  * `neox_qkv` GPT-NeoX's fused `query_key_value`, whose rows are interleaved per head as
    `[q_0, k_0, v_0, q_1, k_1, v_1, ...]` (each `head_dim` rows), reordered to `[q heads | k heads | v heads]`.
The value head bias has no HF counterpart (HF's `score` is bias-free): zero on import, and on export an
error if non-zero unless the caller drops it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from megatron.config import Config
from megatron.config.derive import pad_vocab

from .hf_config import ConversionError

# Keys found in some HF checkpoints that carry no weights (buffers of older transformers versions).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
VALUE_BIAS_KEY = "value_head.bias"


@dataclass(frozen=True)
class Rule:
    """canonical key <- hf keys joined by `kind` (copy | vocab | cat | neox_qkv)."""
    canonical: str
    hf: Sequence[str]
    kind: str = "copy"


def _norm_rules(canon: str, hf: str, with_bias: bool) -> List[Rule]:
    rules = [Rule(f"{canon}.weight", [f"{hf}.weight"])]
    if with_bias:
        rules.append(Rule(f"{canon}.bias", [f"{hf}.bias"]))
    return rules


def rules_for(cfg: Config, family: str) -> List[Rule]:
    """The mapping rules for `cfg.model` in HF `family` (llama | mistral | qwen2 | gpt_neox)."""
    m = cfg.model
    ln = m.norm == "layernorm"
    rules: List[Rule] = []
    if family == "gpt_neox":
        base = "gpt_neox"
        rules.append(Rule("embedding.word_embeddings.weight", [f"{base}.embed_in.weight"], "vocab"))
        for i in range(m.num_layers):
            L, B = f"{base}.layers.{i}", f"blocks.{i}"
            rules += _norm_rules(f"{B}.input_norm", f"{L}.input_layernorm", ln)
            for p in ("weight", "bias"):
                rules.append(Rule(f"{B}.attention.qkv.{p}", [f"{L}.attention.query_key_value.{p}"], "neox_qkv"))
                rules.append(Rule(f"{B}.attention.dense.{p}", [f"{L}.attention.dense.{p}"]))
            rules += _norm_rules(f"{B}.post_attention_norm", f"{L}.post_attention_layernorm", ln)
            for p in ("weight", "bias"):
                rules.append(Rule(f"{B}.mlp.fc1.{p}", [f"{L}.mlp.dense_h_to_4h.{p}"]))
                rules.append(Rule(f"{B}.mlp.fc2.{p}", [f"{L}.mlp.dense_4h_to_h.{p}"]))
        rules += _norm_rules("final_norm", f"{base}.final_layer_norm", ln)
        lm_head = "embed_out.weight"
    else:
        base = "model"
        rules.append(Rule("embedding.word_embeddings.weight", [f"{base}.embed_tokens.weight"], "vocab"))
        for i in range(m.num_layers):
            L, B = f"{base}.layers.{i}", f"blocks.{i}"
            rules += _norm_rules(f"{B}.input_norm", f"{L}.input_layernorm", ln)
            rules.append(Rule(f"{B}.attention.qkv.weight", [f"{L}.self_attn.{x}_proj.weight" for x in "qkv"], "cat"))
            if m.qkv_bias:
                rules.append(Rule(f"{B}.attention.qkv.bias", [f"{L}.self_attn.{x}_proj.bias" for x in "qkv"], "cat"))
            rules.append(Rule(f"{B}.attention.dense.weight", [f"{L}.self_attn.o_proj.weight"]))
            if m.linear_bias:
                rules.append(Rule(f"{B}.attention.dense.bias", [f"{L}.self_attn.o_proj.bias"]))
            rules += _norm_rules(f"{B}.post_attention_norm", f"{L}.post_attention_layernorm", ln)
            for p in (("weight", "bias") if m.linear_bias else ("weight",)):
                rules.append(Rule(f"{B}.mlp.fc1.{p}", [f"{L}.mlp.gate_proj.{p}", f"{L}.mlp.up_proj.{p}"], "cat"))
                rules.append(Rule(f"{B}.mlp.fc2.{p}", [f"{L}.mlp.down_proj.{p}"]))
        rules += _norm_rules("final_norm", f"{base}.norm", ln)
        lm_head = "lm_head.weight"
    if m.value_head:
        rules.append(Rule("value_head.weight", ["score.weight"]))
    elif not m.tie_embeddings:
        rules.append(Rule("lm_head.weight", [lm_head], "vocab"))
    return rules


def _cat_sizes(rule: Rule, cfg: Config) -> List[int]:
    m = cfg.model
    hd = m.hidden_size // m.num_attention_heads
    if ".attention.qkv." in rule.canonical:
        nkv = m.num_kv_heads or m.num_attention_heads
        return [m.num_attention_heads * hd, nkv * hd, nkv * hd]
    ffn = cfg.derived.ffn_hidden_size or m.ffn_hidden_size
    return [ffn, ffn]


def _neox_to_canonical(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads*3*hd, ...] per-head [q_h, k_h, v_h] -> [3*heads*hd, ...] as [all q | all k | all v]."""
    rest = tuple(t.shape[1:])
    x = t.reshape((heads, 3, -1) + rest)
    return x.transpose(0, 1).reshape((-1,) + rest).contiguous()


def _canonical_to_neox(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `_neox_to_canonical`."""
    rest = tuple(t.shape[1:])
    x = t.reshape((3, heads, -1) + rest)
    return x.transpose(0, 1).reshape((-1,) + rest).contiguous()


def _lookup(hf_sd: Dict[str, torch.Tensor], key: str, family: str) -> str:
    """The key under which `key` is stored in `hf_sd` (GPT-NeoX's embed_out may appear as lm_head)."""
    if key in hf_sd:
        return key
    if family == "gpt_neox" and key == "embed_out.weight" and "lm_head.weight" in hf_sd:
        return "lm_head.weight"  # transformers >= 5 in-memory name
    raise ConversionError(f"tensor '{key}' is missing from the Hugging Face checkpoint")


def hf_to_canonical(hf_sd: Dict[str, torch.Tensor], cfg: Config, family: str) -> Dict[str, torch.Tensor]:
    """HF state dict -> canonical full state dict (fp32, vocab rows padded to pad_vocab(vocab, 1)).

    Every HF tensor must be used (except known weightless buffers and a tied lm_head copy).
    """
    m = cfg.model
    used = set()
    full: Dict[str, torch.Tensor] = {}
    for rule in rules_for(cfg, family):
        keys = [_lookup(hf_sd, k, family) for k in rule.hf]
        used.update(keys)
        ts = [hf_sd[k] for k in keys]
        if rule.kind == "cat":
            t = torch.cat(ts, 0)
        elif rule.kind == "neox_qkv":
            t = _neox_to_canonical(ts[0], m.num_attention_heads)
        elif rule.kind == "vocab":
            t = ts[0]
            if t.shape[0] != m.vocab_size:
                raise ConversionError(f"tensor '{rule.hf[0]}' has {t.shape[0]} rows but config.json vocab_size "
                                      f"is {m.vocab_size}")
            padded = pad_vocab(m.vocab_size, 1)
            t = torch.cat([t, t.new_zeros((padded - t.shape[0],) + tuple(t.shape[1:]))], 0)
        else:
            t = ts[0]
        full[rule.canonical] = t.float().contiguous()
    if m.value_head:
        full[VALUE_BIAS_KEY] = torch.zeros(1)
    tied_copies = {"lm_head.weight", "embed_out.weight"} if (m.tie_embeddings or m.value_head) else set()
    leftover = [k for k in hf_sd if k not in used and k not in tied_copies
                and not k.endswith(_IGNORABLE_SUFFIXES)]
    if leftover:
        raise ConversionError(f"the Hugging Face checkpoint has tensors this conversion does not map: "
                              f"{sorted(leftover)[:8]}{' ...' if len(leftover) > 8 else ''}")
    return full


def canonical_to_hf(full: Dict[str, torch.Tensor], cfg: Config, family: str, dtype: torch.dtype = torch.float32,
                    drop_value_bias: bool = False) -> Dict[str, torch.Tensor]:
    """Canonical full state dict -> HF state dict in `dtype` (vocab rows cut to vocab_size, contiguous copies).

    A value head with a non-zero bias raises ConversionError unless `drop_value_bias` (HF's score has no bias).
    """
    m = cfg.model
    out: Dict[str, torch.Tensor] = {}
    for rule in rules_for(cfg, family):
        if rule.canonical not in full:
            raise ConversionError(f"canonical tensor '{rule.canonical}' is missing from the checkpoint")
        t = full[rule.canonical]
        if rule.kind == "cat":
            parts = t.split(_cat_sizes(rule, cfg), 0)
        elif rule.kind == "neox_qkv":
            parts = [_canonical_to_neox(t, m.num_attention_heads)]
        elif rule.kind == "vocab":
            parts = [t[:m.vocab_size]]
        else:
            parts = [t]
        for key, p in zip(rule.hf, parts):
            out[key] = p.to(dtype).contiguous().clone()
    if m.value_head:
        bias = full.get(VALUE_BIAS_KEY)
        if bias is not None and bool((bias != 0).any()) and not drop_value_bias:
            raise ConversionError(f"value_head.bias = {bias.tolist()} is non-zero but Hugging Face's score layer has "
                                  "no bias; pass --drop-value-bias to export without it (scores shift by that "
                                  "constant, which pairwise reward losses ignore)")
    return out
