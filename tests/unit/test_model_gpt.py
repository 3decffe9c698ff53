"""GPTModel: canonical state-dict keys, the packing guarantee, activation checkpointing, dropout, and the
pipeline layer specs chaining to the same outputs as GPTModel."""
import torch

from megatron.model import canonical_prefix, layer_specs, tp_partition
from megatron.model.layer_utils import hidden_dropout
from megatron.mpu import ParallelState

from tests.unit.test_model_presets import PRESETS, build_cfg, build_model, packed_batch


def _expected_keys(cfg):
    """The canonical table of docs/ARCHITECTURE.md, written out independently, with full (tp=1) shapes."""
    m, d = cfg.model, cfg.derived
    H, hd, nq, nkv, F, Vp = m.hidden_size, d.head_dim, m.num_attention_heads, d.num_kv_heads, d.ffn_hidden_size, \
        d.padded_vocab_size
    ln = m.norm == "layernorm"
    keys = [("embedding.word_embeddings.weight", (Vp, H))]
    for i in range(m.num_layers):
        b = f"blocks.{i}."
        keys += [(b + "input_norm.weight", (H,))] + ([(b + "input_norm.bias", (H,))] if ln else [])
        keys += [(b + "attention.qkv.weight", ((nq + 2 * nkv) * hd, H))]
        keys += [(b + "attention.qkv.bias", ((nq + 2 * nkv) * hd,))] if m.qkv_bias else []
        keys += [(b + "attention.dense.weight", (H, nq * hd))] + ([(b + "attention.dense.bias", (H,))]
                                                                 if m.linear_bias else [])
        keys += [(b + "post_attention_norm.weight", (H,))] + ([(b + "post_attention_norm.bias", (H,))] if ln else [])
        fc1 = 2 * F if m.activation == "swiglu" else F
        keys += [(b + "mlp.fc1.weight", (fc1, H))] + ([(b + "mlp.fc1.bias", (fc1,))] if m.linear_bias else [])
        keys += [(b + "mlp.fc2.weight", (H, F))] + ([(b + "mlp.fc2.bias", (H,))] if m.linear_bias else [])
    keys += [("final_norm.weight", (H,))] + ([("final_norm.bias", (H,))] if ln else [])
    if m.value_head:
        keys += [("value_head.weight", (1, H)), ("value_head.bias", (1,))]
    elif not m.tie_embeddings:
        keys += [("lm_head.weight", (Vp, H))]
    return keys


def test_state_dict_keys_are_canonical():
    for preset in PRESETS:
        for extra in ([], ["model.tie_embeddings=true"], ["model.value_head=true", "objective.name=rm"]):
            cfg = build_cfg(preset, *extra)
            sd = build_model(cfg).state_dict()
            assert [(k, tuple(v.shape)) for k, v in sd.items()] == _expected_keys(cfg), (preset, extra)
            for k in sd:
                tp_partition(k, cfg)  # every canonical name has a TP partition rule


def test_packed_row_equals_separate_sequences():
    ids, pos, seg = packed_batch(1)
    for preset in PRESETS:
        model = build_model(build_cfg(preset)).eval()
        packed = model(ids, pos, seg)
        assert torch.isfinite(packed).all()
        for start, n in ((0, 7), (7, 6)):
            alone = model(ids[:1, start:start + n], torch.arange(n)[None], torch.ones(1, n, dtype=torch.long))
            torch.testing.assert_close(packed[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
        # the second row holds a single sequence: compare with an unpadded batch of one
        alone = model(ids[1:], pos[1:], seg[1:])
        torch.testing.assert_close(packed[1], alone[0], rtol=1e-5, atol=1e-5)
        # and a different segment id must not leak: renumbering segment 2 as 5 changes nothing
        seg5 = seg.clone()
        seg5[seg5 == 2] = 5
        torch.testing.assert_close(model(ids, pos, seg5), packed, rtol=0, atol=0)
        # while merging the two segments into one must change the second one's logits
        merged = seg.clone()
        merged[merged == 2] = 1
        assert not torch.allclose(model(ids, pos, merged)[0, 7:13], packed[0, 7:13], atol=1e-4)


def _loss_and_grads(model, batch, weight):
    out = model(*batch)
    loss = (out * weight).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_loss_and_grads():
    batch = packed_batch(2)
    for dropout in ("0.0", "0.2"):
        extra = ["model.num_layers=3", f"model.dropout={dropout}"]
        plain = build_model(build_cfg("llama", *extra))
        ckpt = build_model(build_cfg("llama", *extra, "parallel.activation_checkpointing=true",
                                     "parallel.checkpoint_num_layers=2"))
        calls = []
        for i, blk in enumerate(ckpt.blocks):
            blk.register_forward_pre_hook(lambda mod, inp, i=i: calls.append(i))
        weight = torch.randn(2, 16, 256)
        torch.manual_seed(11)
        loss0, g0 = _loss_and_grads(plain, batch, weight)
        torch.manual_seed(11)
        loss1, g1 = _loss_and_grads(ckpt, batch, weight)
        assert calls == [0, 1, 2, 2, 0, 1]  # forward, then chunks [2] and [0, 1] recomputed in backward
        torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0)
    ckpt.eval()
    calls.clear()
    with torch.no_grad():
        ckpt(*batch)
    assert calls == [0, 1, 2]


def test_dropout_only_in_training():
    batch = packed_batch(3)
    ref = build_model(build_cfg("neox")).eval()
    model = build_model(build_cfg("neox", "model.dropout=0.3"))
    model.eval()
    torch.testing.assert_close(model(*batch), ref(*batch), rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(*batch), ref(*batch), atol=1e-3)
    x = torch.ones(4, 50, 64)
    y = hidden_dropout(x, 0.25, True)
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((y == 0).float().mean().item() - 0.25) < 0.03


def _chain_specs(cfg, seed, batch):
    torch.manual_seed(seed)
    specs = layer_specs(cfg, ParallelState.single())
    # as PipelineModule._build: a tied key is built once per stage; later specs with it use its forward_fn
    modules, tied = [], {}
    for spec in specs:
        key = getattr(spec, "key", None)
        if key is not None and key in tied:
            modules.append(None)
            continue
        modules.append(spec.build())
        if key is not None:
            tied[key] = modules[-1]
    x = batch
    for spec, module in zip(specs, modules):
        fwd = getattr(spec, "forward_fn", None)
        x = fwd(tied[spec.key], x) if fwd is not None else module(x)
    return specs, modules, x


def test_layer_specs_chain_like_gpt_model():
    batch = packed_batch(4)
    for preset, extra in (("llama", []), ("neox", ["model.tie_embeddings=true"]),
                          ("qwen2", ["model.value_head=true", "objective.name=rm"])):
        cfg = build_cfg(preset, *extra)
        model = build_model(cfg, seed=5)
        specs, modules, out = _chain_specs(cfg, 5, batch)
        assert len(specs) == cfg.model.num_layers + 3
        torch.testing.assert_close(out, model(*batch), rtol=0, atol=0)
        canonical = model.state_dict()
        seen = set()
        for i, module in enumerate(modules):
            if module is None:  # the tied head: its weight is the embedding's
                continue
            for key, value in module.state_dict().items():
                name = canonical_prefix(i, cfg) + key
                seen.add(name)
                torch.testing.assert_close(value, canonical[name], rtol=0, atol=0)
        assert seen == set(canonical)
        if cfg.model.tie_embeddings:
            assert type(specs[-1]).__name__ == "TiedLayerSpec" and specs[-1].key == specs[0].key
            assert canonical_prefix(len(specs) - 1, cfg) == "embedding."
