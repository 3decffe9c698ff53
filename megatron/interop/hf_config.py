"""Hugging Face config <-> `cfg.model`: which architectures we support and how their switches map.

Families: llama, mistral, qwen2 (RMSNorm, SwiGLU, GQA, rotate_half rotary) and gpt_neox (LayerNorm with
bias, GeLU, biased linears, partial rotary, parallel residual). Each family converts as `*ForCausalLM`
or, with a value head (reward model, `num_labels=1`), as `*ForSequenceClassification`.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

from megatron.config import Config

FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox")
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gpt_neox": "GPTNeoX"}
SUPPORTED_ARCHITECTURES = tuple(f"{_CLASS_PREFIX[f]}For{kind}" for f in FAMILIES
                                for kind in ("CausalLM", "SequenceClassification"))
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_META_KEYS = ("rope_theta", "partial_rotary_factor")


class ConversionError(ValueError):
    """A model that cannot be converted faithfully; the message says why and what is supported."""


def architecture_of(config_json: Dict[str, Any]) -> Tuple[str, bool]:
    """(family, is_reward_model) from a config.json dict; ConversionError listing the supported ones."""
    archs = list(config_json.get("architectures") or [])
    if not archs:
        model_type = config_json.get("model_type")
        if model_type in FAMILIES:
            return model_type, False
        raise ConversionError(f"config.json names no architecture and model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    name = archs[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"unsupported architecture {name!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    for fam, prefix in _CLASS_PREFIX.items():
        if name in (prefix + "ForCausalLM", prefix + "ForSequenceClassification"):
            return fam, name.endswith("SequenceClassification")
    raise AssertionError(name)


def hf_class_name(family: str, value_head: bool) -> str:
    """Transformers class name for `family` (CausalLM, or SequenceClassification for a value head)."""
    return _CLASS_PREFIX[family] + ("ForSequenceClassification" if value_head else "ForCausalLM")


def _rope_parameters(hf) -> Dict[str, Any]:
    rp = getattr(hf, "rope_parameters", None)
    if rp is None:  # transformers 4.x attribute names
        rp = dict(getattr(hf, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(hf, "rope_theta", getattr(hf, "rotary_emb_base", 10000.0)))
        prf = getattr(hf, "partial_rotary_factor", getattr(hf, "rotary_pct", None))
        if prf is not None:
            rp.setdefault("partial_rotary_factor", prf)
    rp = dict(rp)
    if any(isinstance(v, dict) for v in rp.values()):
        raise ConversionError("per-layer-type rope parameters are not supported")
    return rp


def hf_to_model_fields(hf, family: str, value_head: bool) -> Dict[str, Any]:
    """`cfg.model` fields (a dict for ModelConfig) describing the transformers config `hf`."""
    nq = hf.num_attention_heads
    h = hf.hidden_size
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, h // nq):
        raise ConversionError(f"head_dim={head_dim} differs from hidden_size/num_attention_heads={h // nq}; "
                              "our model derives head_dim from hidden_size and cannot represent this")
    rp = _rope_parameters(hf)
    rtype = str(rp.get("rope_type", rp.get("type", "default")))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"rope type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling = None
    if rtype != "default":
        scaling = {k: v for k, v in rp.items() if k not in _ROPE_META_KEYS and k != "type"}
        scaling["rope_type"] = rtype
    max_seq = int(hf.max_position_embeddings)
    fields: Dict[str, Any] = dict(
        arch=family, hidden_size=h, num_layers=hf.num_hidden_layers, num_attention_heads=nq,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or nq, ffn_hidden_size=hf.intermediate_size,
        vocab_size=hf.vocab_size, rope_theta=float(rp.get("rope_theta", 10000.0)), rope_scaling=scaling,
        rotary_pct=float(rp.get("partial_rotary_factor", 1.0)),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)), value_head=value_head)
    if value_head and getattr(hf, "num_labels", 1) != 1:
        raise ConversionError(f"a reward model needs num_labels=1, got {hf.num_labels}")
    if family == "gpt_neox":
        if hf.hidden_act != "gelu":
            raise ConversionError(f"GPT-NeoX hidden_act {hf.hidden_act!r} is not supported (only 'gelu')")
        if not getattr(hf, "attention_bias", True):
            raise ConversionError("GPT-NeoX with attention_bias=False is not supported (its MLP keeps biases, "
                                  "ours ties attention-output and MLP biases under model.linear_bias)")
        fields.update(norm="layernorm", norm_eps=float(hf.layer_norm_eps), activation="gelu", qkv_bias=True,
                      linear_bias=True, parallel_residual=bool(hf.use_parallel_residual), num_kv_heads=nq)
    else:
        if hf.hidden_act != "silu":
            raise ConversionError(f"{family} hidden_act {hf.hidden_act!r} is not supported (only 'silu' / SwiGLU)")
        if fields["rotary_pct"] != 1.0:
            raise ConversionError(f"{family} with partial_rotary_factor={fields['rotary_pct']} is not supported")
        if family == "llama":
            ab, mb = bool(getattr(hf, "attention_bias", False)), bool(getattr(hf, "mlp_bias", False))
            if ab != mb:
                raise ConversionError(f"Llama with attention_bias={ab} and mlp_bias={mb} is not supported: "
                                      "model.linear_bias covers the attention output and the MLP together")
            qkv_bias = linear_bias = ab
        elif family == "qwen2":
            qkv_bias, linear_bias = True, False
        else:
            qkv_bias, linear_bias = False, False
        window = getattr(hf, "sliding_window", None)
        if family == "qwen2" and not getattr(hf, "use_sliding_window", False):
            window = None
        if window:
            max_seq = min(max_seq, int(window))  # within the window, full causal attention is exact
        fields.update(norm="rmsnorm", norm_eps=float(hf.rms_norm_eps), activation="swiglu", qkv_bias=qkv_bias,
                      linear_bias=linear_bias, parallel_residual=False)
    fields["max_seq_len"] = max_seq
    return fields


def family_for_export(cfg: Config, architecture: Optional[str]) -> str:
    """The family to export as: `architecture` if given, else `cfg.model.arch`; ConversionError otherwise."""
    fam = architecture or cfg.model.arch
    if fam not in FAMILIES:
        raise ConversionError(f"cannot export model.arch={fam!r}; pass --architecture one of {', '.join(FAMILIES)}")
    return fam


def _check_exportable(cfg: Config, family: str) -> None:
    m = cfg.model
    want = dict(norm="layernorm", activation="gelu", qkv_bias=True, linear_bias=True) if family == "gpt_neox" else \
        dict(norm="rmsnorm", activation="swiglu", parallel_residual=False, rotary_pct=1.0)
    if family == "qwen2":
        want.update(qkv_bias=True, linear_bias=False)
    elif family == "mistral":
        want.update(qkv_bias=False, linear_bias=False)
    elif family == "llama" and m.qkv_bias != m.linear_bias:
        raise ConversionError(f"llama cannot express qkv_bias={m.qkv_bias} with linear_bias={m.linear_bias} "
                              "(Llama's attention_bias covers q, k, v and o together); try --architecture qwen2")
    if family == "gpt_neox" and (m.num_kv_heads or m.num_attention_heads) != m.num_attention_heads:
        raise ConversionError("the model cannot be exported as gpt_neox: it has no grouped-query attention "
                              f"(model.num_kv_heads={m.num_kv_heads} must equal num_attention_heads)")
    bad = {k: (getattr(m, k), v) for k, v in want.items() if getattr(m, k) != v}
    if bad:
        detail = ", ".join(f"model.{k}={got!r} (needs {need!r})" for k, (got, need) in bad.items())
        raise ConversionError(f"the model cannot be exported as {family}: {detail}")
    rtype = (m.rope_scaling or {}).get("rope_type", (m.rope_scaling or {}).get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(f"rope type {rtype!r} cannot be exported")


_OLD_ROPE_KEYS = ("rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base", "partial_rotary_factor",
                  "torch_dtype", "dtype", "transformers_version", "architectures", "id2label", "label2id",
                  "num_labels", "model_type")


def model_to_hf_config(cfg: Config, family: str, value_head: bool, dtype: str,
                       base: Optional[Dict[str, Any]] = None):
    """A transformers config object for `cfg.model` exported as `family`.

    `base`: an original config.json dict (token ids, max_position_embeddings, ...) whose non-architectural
    entries are kept; every architectural entry comes from `cfg.model`. `dtype`: 'float32' | 'bfloat16' | ...
    """
    import transformers

    _check_exportable(cfg, family)
    m = cfg.model
    rope: Dict[str, Any] = {"rope_type": "default"}
    if m.rope_scaling:
        rope.update({k: v for k, v in m.rope_scaling.items() if k != "type"})
        rope["rope_type"] = m.rope_scaling.get("rope_type", m.rope_scaling.get("type"))
    rope["rope_theta"] = m.rope_theta
    if family == "gpt_neox":
        rope["partial_rotary_factor"] = m.rotary_pct
    data: Dict[str, Any] = {}
    if base and base.get("model_type") == family:
        data = {k: v for k, v in copy.deepcopy(base).items() if k not in _OLD_ROPE_KEYS}
    data.update(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=cfg.derived.ffn_hidden_size
                or m.ffn_hidden_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                tie_word_embeddings=m.tie_embeddings, rope_parameters=rope)
    data["max_position_embeddings"] = max(int(data.get("max_position_embeddings", 0)), m.max_seq_len)
    if family == "gpt_neox":
        data.update(layer_norm_eps=m.norm_eps, hidden_act="gelu", use_parallel_residual=m.parallel_residual,
                    attention_bias=True)
    else:
        data.update(num_key_value_heads=m.num_kv_heads or m.num_attention_heads, rms_norm_eps=m.norm_eps,
                    hidden_act="silu")
        if family == "llama":
            data.update(attention_bias=m.qkv_bias, mlp_bias=m.linear_bias,
                        head_dim=m.hidden_size // m.num_attention_heads)
        elif family == "mistral":
            data.update(head_dim=m.hidden_size // m.num_attention_heads)
            data.setdefault("sliding_window", None)
        else:
            data.setdefault("use_sliding_window", False)
    cls = getattr(transformers, _CLASS_PREFIX[family] + "Config")
    hf = cls(**data)
    hf.architectures = [hf_class_name(family, value_head)]
    if value_head:
        hf.num_labels = 1
    hf.dtype = dtype
    return hf
