"""The kernel registry at tensor=2 (gloo): every fast path equals its plain-torch twin at the same layout
(log-probs, gathered logits, each rank's gradient shards; fp32 1e-5) for the Llama, GPT-NeoX and Qwen2 presets,
packed and unpacked, with and without sequence parallelism; the vocab-parallel log-prob / entropy kernels with a
padded shard (part or all of rank 1's columns are padding) against float64; and an imported Hugging Face Llama
with vocabulary 500 (padded to 512) gives transformers' log-softmax at tensor 1 and 2 without slicing the padding
away (issue 10.2)."""
import os

import pytest
import torch
import torch.distributed as dist

from megatron.interop.convert import hf_to_megatron
from megatron.model import GPTModel
from megatron.mpu import (ParallelState, fused_linear_logprobs, initialize_parallel, shard_tensor,
                          vocab_parallel_log_softmax, vocab_parallel_logprobs_entropy)
from megatron.checkpoint import weights_io as wio
from megatron.testing.distributed import run_distributed
from tests.unit.test_kernels_model import LAYOUTS
from tests.unit.test_model_presets import build_cfg

TOL = 1e-5
CASES = [("llama", []), ("neox", []), ("qwen2", ["model.tie_embeddings=true"])]


def _gather_vocab(shard, ps):
    parts = [torch.empty_like(shard) for _ in range(ps.tp_size)]
    dist.all_gather(parts, shard.contiguous(), group=ps.tp_group)
    return torch.cat(parts, dim=-1)


def _run(cfg, ps, batch, weights):
    torch.manual_seed(1234)
    model = GPTModel(cfg, ps)
    ids, pos, seg = batch
    labels = torch.roll(ids, -1, dims=1)
    logp, ent = model(ids, pos, seg, labels=labels, with_entropy=True)
    ((logp * weights[0] + ent * weights[1]) * (seg != 0)).sum().backward()
    with torch.no_grad():
        logits = _gather_vocab(model(ids, pos, seg), ps)
    return logp.detach(), ent.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_model_twins(rank, world_size):
    ps = initialize_parallel(tensor=2, pipeline=1)
    failures = []
    for preset, extra in CASES:
        for layout, make in LAYOUTS.items():
            batch = make()
            gen = torch.Generator().manual_seed(7)
            weights = (torch.randn(batch[0].shape, generator=gen), torch.randn(batch[0].shape, generator=gen))
            real = batch[2] != 0
            for sp in ("false", "true"):
                common = [*extra, f"parallel.sequence_parallel={sp}"]
                ref = _run(build_cfg(preset, "model.kernels=eager", *common, tensor=2), ps, batch, weights)
                out = _run(build_cfg(preset, "model.kernels=fused", *common, tensor=2), ps, batch, weights)
                where = f"{preset} {layout} sp={sp}"
                for i, what in enumerate(("logp", "entropy", "logits")):
                    d = (out[i] - ref[i])[real].abs().max().item()
                    if not d < TOL:
                        failures.append(f"{where} {what} {d}")
                for name, g in ref[3].items():
                    d = (out[3][name] - g).abs().max().item()
                    if not d < TOL:
                        failures.append(f"{where} grad {name} {d}")
    return failures


def _check_vocab_parallel_kernels(rank, world_size):
    """Per-rank shards of one logits matrix / head weight; vocab 100 leaves rank 1 only padding, 200 part."""
    ps = initialize_parallel(tensor=2, pipeline=1)
    failures = []
    gen = torch.Generator().manual_seed(3)
    T, H, Vp = 13, 16, 256
    h_full = torch.randn(T, H, generator=gen, dtype=torch.float64)
    w_full = torch.randn(Vp, H, generator=gen, dtype=torch.float64) * 0.5
    g_lp, g_ent = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
    for vocab in (100, 200):
        target = torch.randint(0, vocab, (T,), generator=gen)
        h64, w64 = h_full.clone().requires_grad_(), w_full.clone().requires_grad_()
        ref_all = torch.log_softmax(h64 @ w64[:vocab].T, -1)
        ref_lp, ref_ent = ref_all.gather(1, target[:, None]).squeeze(1), -(ref_all.exp() * ref_all).sum(-1)
        (ref_lp * g_lp + ref_ent * g_ent).sum().backward()
        w_shard = shard_tensor(w_full.float(), ps.tp_rank, 2, dim=0)
        for kind in ("logits", "fused"):
            h = h_full.float().requires_grad_()
            w = w_shard.clone().requires_grad_()
            if kind == "fused":
                lp, ent = fused_linear_logprobs(h, w, target, ps, vocab, chunk_size=4, with_entropy=True)
            else:
                lp, ent = vocab_parallel_logprobs_entropy(h @ w.T, target, ps, chunk_size=4, vocab_size=vocab)
            (lp * g_lp + ent * g_ent).sum().backward()
            dist.all_reduce(h.grad, group=ps.tp_group)  # the input mapping's all-reduce, done by hand here
            checks = {"logp": (lp, ref_lp), "entropy": (ent, ref_ent), "dh": (h.grad, h64.grad),
                      "dW": (w.grad, shard_tensor(w64.grad, ps.tp_rank, 2, dim=0))}
            for what, (a, b) in checks.items():
                d = (a.double() - b).abs().max().item()
                if not d < TOL:
                    failures.append(f"vocab {vocab} {kind} {what} {d}")
        full = _gather_vocab(vocab_parallel_log_softmax((h_full.float() @ w_shard.T), ps, vocab), ps)
        if not (torch.isinf(full[:, vocab:]).all() and (full[:, :vocab].double() - ref_all).abs().max() < TOL):
            failures.append(f"vocab {vocab} log_softmax")
    return failures


def _both(rank, world_size):
    return _check_model_twins(rank, world_size) + _check_vocab_parallel_kernels(rank, world_size)


def test_fast_paths_equal_twins_at_tensor_2():
    results = run_distributed(_both, 2)
    assert results == [[], []], results


# ------------------------------------------------------------------------------------ issue 10.2: HF vocab 500
def _load(ckpt, tp_rank):
    tag_dir = wio.resolve_tag_dir(ckpt)
    path = wio.weights_file(tag_dir, tp_rank, 0)
    load = getattr(wio, "load_shard", None)
    return wio.read_config(tag_dir), (load(path) if load else torch.load(path, weights_only=True))


def _our_logprobs(ckpt, ids, ps, kernels):
    """Our converted model: log p(next token) at every position [B, S-1] and this rank's log-softmax shard."""
    cfg, state = _load(ckpt, ps.tp_rank)
    cfg.model.kernels = kernels
    model = GPTModel(cfg, ps)
    model.load_state_dict(state, strict=True)
    model.eval()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    seg = torch.ones_like(ids)
    with torch.no_grad():
        logp = model(ids, pos, seg, labels=torch.roll(ids, -1, 1))[:, :-1]
        log_softmax = vocab_parallel_log_softmax(model(ids, pos, seg), ps, cfg.model.vocab_size)
    return logp, log_softmax, cfg.derived.padded_vocab_size


def _tp2_hf(rank, world_size, ckpt, ids):
    ps = initialize_parallel(2, 1)
    out = {}
    for kernels in ("eager", "fused"):
        logp, shard, padded = _our_logprobs(ckpt, ids, ps, kernels)
        out[kernels] = (logp, _gather_vocab(shard, ps), padded)
    return out


@pytest.fixture(scope="module")
def hf_llama_500(tmp_path_factory):
    import transformers
    from tests.integration.test_hf_logits import randomize

    root = tmp_path_factory.mktemp("hf500")
    config = transformers.LlamaConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    randomize(hf, 0)
    hf.eval()
    hf.save_pretrained(str(root / "hf"))
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_all = torch.log_softmax(hf(ids).logits.double(), -1)  # [2, 20, 500]
    for tp in (1, 2):
        hf_to_megatron(str(root / "hf"), str(root / f"tp{tp}"), tp=tp)
    return ref_all, ids, str(root / "tp1"), str(root / "tp2")


def _check_against_hf(logp, full, padded, ref_all, ids, where):
    assert padded == 512, where
    ref = ref_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (logp.double() - ref).abs().max() < TOL, (where, (logp.double() - ref).abs().max())
    assert torch.isinf(full[..., 500:]).all() and (full[..., 500:] < 0).all(), where
    assert (full[..., :500].double() - ref_all).abs().max() < TOL, where
    assert (full.double().exp().sum(-1) - 1).abs().max() < 1e-5, where  # all the mass on the real ids


def test_hf_llama_vocab_500_logprobs_tp1(hf_llama_500):
    ref_all, ids, tp1, _ = hf_llama_500
    for kernels in ("eager", "fused"):
        logp, shard, padded = _our_logprobs(tp1, ids, ParallelState.single(), kernels)
        _check_against_hf(logp, shard, padded, ref_all, ids, f"tp1 {kernels}")


def test_hf_llama_vocab_500_logprobs_tp2(hf_llama_500):
    ref_all, ids, _, tp2 = hf_llama_500
    for rank, res in enumerate(run_distributed(_tp2_hf, 2, tp2, ids)):
        for kernels, (logp, full, padded) in res.items():
            _check_against_hf(logp, full, padded, ref_all, ids, f"tp2 rank {rank} {kernels}")
