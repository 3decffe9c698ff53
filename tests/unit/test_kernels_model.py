"""Every fast path of the kernel registry equals its plain-torch twin inside the model: the Llama, GPT-NeoX and
Qwen2 presets, packed and unpacked rows, each op switched alone and all together (model.kernels fused vs eager):
log-probs, logits and every parameter gradient within fp32 1e-5. Plus the registry itself (presets, overrides,
the start-up line, bad values) and the per-op kernels on odd shapes."""
import pytest
import torch

from megatron.config import ConfigError
from megatron.model.attention_backends import eager_attention, segment_attention, segment_runs
from megatron.model.kernels import describe_kernels, fused_rms_norm, fused_rotary, fused_swiglu, resolve_kernels, swiglu
from megatron.model.norm import rms_norm
from megatron.model.rotary import apply_rotary
from tests.unit.test_model_presets import PRESETS, build_cfg, build_model, packed_batch

TOL = 1e-5


def unpacked_batch(seed: int = 0):
    """The sequences of `packed_batch` one per row (7, 6 and 16 tokens), right-padded to 16."""
    ids, pos, seg = packed_batch(seed)
    rows = [(0, 0, 7), (0, 7, 13), (1, 0, 16)]
    out = [torch.zeros(3, 16, dtype=torch.long) for _ in range(3)]
    for r, (b, a, e) in enumerate(rows):
        out[0][r, :e - a], out[1][r, :e - a], out[2][r, :e - a] = ids[b, a:e], pos[b, a:e], 1
    return tuple(out)


LAYOUTS = {"packed": packed_batch, "unpacked": unpacked_batch}
# each op alone (everything else eager), then everything at once
SWITCHES = {
    "norm": ["model.kernel_ops.norm=fused"],
    "rotary": ["model.kernel_ops.rotary=fused"],
    "mlp": ["model.kernel_ops.mlp=fused"],
    "attention_segments": ["model.attention=segments"],
    "attention_sdpa": ["model.attention=sdpa"],
    "head": ["model.kernel_ops.head=fused"],
    "all": ["model.kernels=fused"],
}


def _run(cfg, ids, pos, seg, weights):
    """log-probs of the next token (labels = ids shifted; padding scored as id 0 too: padding rows are real
    math) and logits, then d(sum weights * logp)/d params. Returns (logp, logits, {name: grad})."""
    model = build_model(cfg)
    labels = torch.roll(ids, -1, dims=1)
    logp = model(ids, pos, seg, labels=labels)
    (logp * weights * (seg != 0)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(ids, pos, seg)
    return logp.detach(), logits, grads


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fast_paths_equal_eager_twins(preset, layout):
    ids, pos, seg = LAYOUTS[layout]()
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    extra = ["model.tie_embeddings=true"] if preset == "qwen2" else []  # tied head through the fused path too
    ref = _run(build_cfg(preset, "model.kernels=eager", *extra), ids, pos, seg, weights)
    real = seg != 0
    for name, switch in SWITCHES.items():
        out = _run(build_cfg(preset, "model.kernels=eager", *extra, *switch), ids, pos, seg, weights)
        where = f"{preset} {layout} {name}"
        assert (out[0] - ref[0])[real].abs().max() < TOL, where
        assert (out[1] - ref[1])[real].abs().max() < TOL, where
        for pname, g in ref[2].items():
            assert (out[2][pname] - g).abs().max() < TOL, (where, pname)
        assert all(g.abs().sum() > 0 for g in out[2].values()), where


def test_logprobs_through_the_model_match_its_logits():
    """The head + log-prob op (both kernels) equals log_softmax of the model's own logits over the real vocab."""
    ids, pos, seg = packed_batch()
    labels = torch.roll(ids, -1, dims=1)
    for kernel in ("eager", "fused"):
        cfg = build_cfg("llama", f"model.kernel_ops.head={kernel}")
        model = build_model(cfg)
        with torch.no_grad():
            logp = model(ids, pos, seg, labels=labels)
            logits = model(ids, pos, seg)
            index = torch.tensor([0, 5, 17, 31])
            sel = model(ids, pos, seg, logit_index=index, labels=labels.reshape(-1)[index])
            logp2, ent = model(ids, pos, seg, labels=labels, with_entropy=True)
        V = cfg.model.vocab_size  # 200, padded to 256
        ref = torch.log_softmax(logits.double()[..., :V], -1)
        assert (logp.double() - ref.gather(-1, labels[..., None]).squeeze(-1)).abs().max() < TOL, kernel
        assert torch.equal(sel, logp.reshape(-1)[index]) and torch.equal(logp2, logp)
        assert (ent.double() + (ref.exp() * ref).sum(-1)).abs().max() < TOL, kernel


def test_registry_presets_and_overrides():
    plan = resolve_kernels(build_cfg("llama", "model.attention=auto"))  # the auto preset
    assert plan.norm == plan.rotary == plan.mlp == plan.head == "fused" and plan.attention == "auto"
    eager = resolve_kernels(build_cfg("llama", "model.kernels=eager", "model.attention=auto"))
    assert (eager.norm, eager.rotary, eager.mlp, eager.attention, eager.head) == ("eager",) * 5
    mixed = resolve_kernels(build_cfg("llama", "model.kernels=eager", "model.kernel_ops.head=fused",
                                      "model.attention=segments"))
    assert (mixed.head, mixed.attention, mixed.norm) == ("fused", "segments", "eager")
    line = describe_kernels(build_cfg("neox", "model.kernels=fused", "model.attention=auto"))
    assert line.startswith("kernels (model.kernels=fused): norm=fused (layernorm: torch's native kernel)")
    assert "attention=auto (auto: flash-attn where usable" in line and "head=fused" in line
    model = build_model(build_cfg("llama", "model.kernels=eager", "model.kernel_ops.norm=fused"))
    assert model.blocks[0].input_norm.kernel == "fused" and model.final_norm.kernel == "fused"
    assert model.blocks[0].mlp.kernel == "eager" and model.lm_head.head_kernel == "eager"
    for bad in ("model.kernels=fast", "model.kernel_ops.head=compiled", "model.kernel_ops.nrom=eager"):
        with pytest.raises(ConfigError, match="kernel"):
            build_cfg("llama", bad)


def test_value_head_model_refuses_labels():
    model = build_model(build_cfg("llama", "model.value_head=true", "objective.name=rm"))
    ids, pos, seg = packed_batch()
    with pytest.raises(ValueError, match="value head"):
        model(ids, pos, seg, labels=ids)


# ---------------------------------------------------------------------------------------- per-op, odd shapes
def _grads(fn, inputs, g):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, g)
    return [o.detach() for o in out], [t.grad.clone() for t in inputs]


def test_fused_rms_norm_odd_shapes_and_bf16():
    gen = torch.Generator().manual_seed(0)
    for shape in ((3, 5, 47), (1, 31)):
        x = torch.randn(*shape, generator=gen).requires_grad_()
        w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).requires_grad_()
        g = torch.randn(*shape, generator=gen)
        a = _grads(lambda x, w: rms_norm(x, w, 1e-6), [x, w], g)
        b = _grads(lambda x, w: fused_rms_norm(x, w, 1e-6), [x, w], g)
        for u, v in zip(a[0] + a[1], b[0] + b[1]):
            assert (u - v).abs().max() < TOL
    xb = torch.randn(4, 64, generator=gen).bfloat16()
    wb = torch.randn(64, generator=gen).bfloat16()
    assert torch.equal(fused_rms_norm(xb, wb, 1e-5), rms_norm(xb, wb, 1e-5))  # HF Llama's bf16 rounding order


@pytest.mark.parametrize("rot", [6, 10])  # 6 of 10 dims (partial rotary), all 10
def test_fused_rotary_odd_shapes(rot):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 7, 3, 10, generator=gen).requires_grad_()
    k = torch.randn(2, 7, 1, 10, generator=gen).requires_grad_()
    freqs = torch.rand(2, 7, rot // 2, generator=gen) * 20
    c, s = freqs.cos(), freqs.sin()
    cc, ss = torch.cat((c, c), -1), torch.cat((s, s), -1)
    g = (torch.randn(2, 7, 3, 10, generator=gen), torch.randn(2, 7, 1, 10, generator=gen))
    a = _grads(lambda q, k: (apply_rotary(q, cc, ss), apply_rotary(k, cc, ss)), [q, k], g)
    b = _grads(lambda q, k: fused_rotary(q, k, c, s), [q, k], g)
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert (u - v).abs().max() < TOL


def test_fused_swiglu_odd_shapes():
    gen = torch.Generator().manual_seed(2)
    h = (torch.randn(3, 5, 2 * 37, generator=gen) * 3).requires_grad_()
    g = torch.randn(3, 5, 37, generator=gen)
    a, b = _grads(swiglu, [h], g), _grads(fused_swiglu, [h], g)
    assert (a[0][0] - b[0][0]).abs().max() < TOL and (a[1][0] - b[1][0]).abs().max() < TOL


def test_segment_attention_runs_and_odd_segments():
    seg = torch.tensor([[1, 1, 1, 2, 3, 3, 0, 0], [1] * 8, [0] * 8])  # a 1-token segment, a row of padding only
    assert segment_runs(seg) == ([3, 1, 2, 2, 8, 8], [True, True, True, False, True, False])
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 8, 4, 6, generator=gen).requires_grad_()
    k = torch.randn(3, 8, 2, 6, generator=gen).requires_grad_()
    v = torch.randn(3, 8, 2, 6, generator=gen).requires_grad_()
    g = torch.randn(3, 8, 4, 6, generator=gen)
    a = _grads(lambda q, k, v: eager_attention(q, k, v, seg), [q, k, v], g)
    b = _grads(lambda q, k, v: segment_attention(q, k, v, seg), [q, k, v], g)
    for u, w in zip(a[0] + a[1], b[0] + b[1]):
        assert (u - w).abs().max() < TOL
    assert not b[0][0][seg == 0].any()


def test_unpadded_blocks_see_only_real_tokens():
    """With a segment-restricted attention the blocks run on [1, T] real tokens, segments renumbered across
    rows (two rows' first sequences must not merge); outputs at real positions are those of the padded run,
    value head included."""
    from megatron.model.unpad import unpad_plan
    seg = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 2, 0]])
    plan = unpad_plan(seg)
    ids, pos, s = plan.compress(seg * 7, torch.tensor([[0, 1, 0], [0, 1, 2], [0, 0, 0]]), seg)
    assert s.tolist() == [[1, 1, 2, 2, 2, 3, 4]] and pos.tolist() == [[0, 1, 0, 1, 2, 0, 0]] and ids.shape == (1, 7)
    h = torch.arange(7.0).view(1, 7, 1)
    assert plan.restore(h, None).view(3, 3).tolist() == [[0, 1, 0], [2, 3, 4], [5, 6, 0]]
    assert unpad_plan(torch.ones(2, 4, dtype=torch.long)) is None  # nothing to drop
    ids, pos, seg = unpacked_batch()
    seen = []
    for extra in ([], ["model.value_head=true", "objective.name=rm"]):
        outs = []
        for kernels in ("eager", "fused"):
            model = build_model(build_cfg("llama", f"model.kernels={kernels}", "model.attention=auto", *extra))
            hook = model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].shape))
            with torch.no_grad():
                outs.append(model(ids, pos, seg))
            hook.remove()
        assert (outs[0] - outs[1])[seg != 0].abs().max() < TOL, extra
    assert seen[0] == (3, 16, 64) and seen[1] == (1, int((seg != 0).sum()), 64)
