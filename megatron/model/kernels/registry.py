"""The kernel registry: which implementation each model op uses, decided once from the config.

Ops and their implementations (every fast path has the plain-torch `eager` twin it is tested against):

    norm       eager (megatron.model.norm) | fused (one-node RMSNorm, kernels/norm.py) | compiled (torch.compile)
    rotary     eager (megatron.model.rotary) | fused (q and k in one node, cos/sin table) | compiled
    mlp        eager (silu(gate) * up) | fused (one-node SwiGLU, kernels/activation.py) | compiled
    attention  eager (fp32 matmul/softmax) | sdpa (masked SDPA over the whole row) | segments (per-segment
               causal SDPA: a packed row costs the sum of its segments' squares) | flash (flash-attn varlen,
               CUDA fp16/bf16) | auto (flash where usable, else segments; resolved per call)
    head       eager (logits, then the chunked vocab-parallel log-prob) | fused (linear + log-prob in token
               chunks with a custom backward, megatron.mpu.fused_logprobs)

`model.kernels` picks a preset for all ops: `eager` (the twins), `fused` (every fast path that needs no
compiler) or `auto` (the fastest measured on this CPU, docs/benchmarks.md; today the same as `fused`: the fused
head is as fast as the plain one at vocab 512 and faster from 4096, with memory bounded by its chunk).
`compiled` is opt-in: its compile time outweighs what it saves in a short CPU run.
`model.kernel_ops.<op>` overrides one op (`auto` = follow the preset); `model.attention` overrides attention.
GPU-only extras (Liger, apex, fused CUDA norms) are not included: nothing here imports a CUDA-only package.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Tuple

KERNEL_PRESETS = ("auto", "eager", "fused")
OP_CHOICES: Dict[str, Tuple[str, ...]] = {
    "norm": ("eager", "fused", "compiled"),
    "rotary": ("eager", "fused", "compiled"),
    "mlp": ("eager", "fused", "compiled"),
    "attention": ("eager", "sdpa", "segments", "flash", "auto"),
    "head": ("eager", "fused"),
}
_PRESETS: Dict[str, Dict[str, str]] = {
    "eager": {"norm": "eager", "rotary": "eager", "mlp": "eager", "attention": "eager", "head": "eager"},
    "fused": {"norm": "fused", "rotary": "fused", "mlp": "fused", "attention": "auto", "head": "fused"},
}
_PRESETS["auto"] = dict(_PRESETS["fused"])  # measured fastest on CPU (docs/benchmarks.md)


@dataclass(frozen=True)
class KernelPlan:
    """The implementation of each op (one of OP_CHOICES[op])."""
    norm: str
    rotary: str
    mlp: str
    attention: str
    head: str


def resolve_kernels(cfg) -> KernelPlan:
    """The KernelPlan of a Config: `model.kernels` preset, then `model.kernel_ops` overrides, then
    `model.attention`. Pure function of the config (every module calls it at build time and gets the same
    answer); raises ValueError naming the key for an unknown value.
    """
    model_cfg = cfg.model
    preset = model_cfg.kernels
    if preset not in KERNEL_PRESETS:
        raise ValueError(f"model.kernels={preset!r} is not one of {', '.join(KERNEL_PRESETS)}")
    plan = dict(_PRESETS[preset])
    for op, value in asdict(model_cfg.kernel_ops).items():
        if value == "auto":
            continue
        if value not in OP_CHOICES[op]:
            raise ValueError(f"model.kernel_ops.{op}={value!r} is not one of auto, {', '.join(OP_CHOICES[op])}")
        plan[op] = value
    if model_cfg.attention != "auto":
        plan["attention"] = model_cfg.attention
    return KernelPlan(**plan)


_ATTENTION_NOTE = {"auto": "auto: flash-attn where usable (CUDA fp16/bf16, installed), else segments; "
                           "blocks skip padding",
                   "segments": "blocks skip padding", "flash": "blocks skip padding"}


def describe_kernels(cfg) -> str:
    """One start-up line naming each op's implementation (for the trainer to print), e.g.
    `kernels (model.kernels=auto): norm=fused rotary=fused mlp=fused attention=auto (...) head=fused`."""
    model_cfg = cfg.model
    plan = resolve_kernels(cfg)
    parts = []
    for op, value in asdict(plan).items():
        note = _ATTENTION_NOTE.get(value) if op == "attention" else None
        if op == "norm" and model_cfg.norm == "layernorm" and value == "fused":
            note = "layernorm: torch's native kernel"
        if op == "mlp" and model_cfg.activation == "gelu" and value == "fused":
            note = "gelu: torch's native kernel"
        parts.append(f"{op}={value}" + (f" ({note})" if note else ""))
    return f"kernels (model.kernels={model_cfg.kernels}): " + " ".join(parts)
