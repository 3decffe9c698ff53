"""Exported token ids come from the tokenizer and the base model, not transformers' class defaults (Llama bos 1 /
eos 2, GPT-NeoX eos 2, no pad): Llama-3-, Qwen2- and GPT-NeoX-like byte-level BPE tokenizers built on the fly,
models converted from transformers, trained by the engine (the base generation_config is found through the
checkpoint's starting points, or next to its tokenizer), exported; transformers' generate then stops at the EOS
and a reward model scores padded batches at each sequence's EOS, as we do."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron.interop.convert import hf_to_megatron, megatron_to_hf
from megatron.checkpoint import weights_io as wio
from megatron.testing.configs import DATA, TINY
from megatron.testing.distributed import run_distributed
from tests.integration.test_hf_logits import our_forward

# (tokenizer, special tokens, bos, eos, pad); `first` specials take ids 0.. (GPT-NeoX), the others come after the
# learnt vocabulary (Llama-3, Qwen2), so no id coincides with a transformers default by accident.
FLAVOURS = {
    "llama3": dict(first=[], added=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                    "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None),
    "qwen2": dict(first=[], added=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    "gpt_neox": dict(first=["<|endoftext|>", "<|padding|>"], added=[],
                     bos="<|endoftext|>", eos="<|endoftext|>", pad=None),
}


def build_tokenizer(flavour: str, out: str):
    """A byte-level BPE trained on the tiny data, with the flavour's special tokens; saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FLAVOURS[flavour]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = []
    for name in ("sft.jsonl", "pairwise.jsonl"):
        with open(os.path.join(DATA, name)) as fh:
            texts += [" ".join(str(v) for v in json.loads(line).values()) for line in fh]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=spec["first"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"], unk_token=spec["eos"] if flavour == "gpt_neox" else None)
    fast.add_special_tokens({"additional_special_tokens": [t for t in spec["added"] + spec["first"]
                                                           if t not in (spec["bos"], spec["eos"], spec["pad"])]})
    for t in spec["added"]:  # bos/eos/pad themselves were added above only if new: make every one exist
        if t not in fast.get_vocab():
            fast.add_tokens([t], special_tokens=True)
    fast.save_pretrained(out)
    return fast


def build_base(flavour: str, root: str, reward: bool = False) -> str:
    """A tiny random transformers model dir with the flavour's tokenizer, config ids and generation_config."""
    import transformers
    from transformers import GenerationConfig

    path = os.path.join(root, f"{flavour}{'_rm' if reward else ''}_hf")
    tok = build_tokenizer(flavour, path)
    ids = tok.convert_tokens_to_ids
    shape = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    if flavour == "llama3":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, rope_theta=500000.0, bos_token_id=ids("<|begin_of_text|>"),
                                       eos_token_id=ids("<|end_of_text|>"), **shape)
        gen = GenerationConfig(bos_token_id=ids("<|begin_of_text|>"), do_sample=True, temperature=0.6, top_p=0.9,
                               eos_token_id=[ids("<|end_of_text|>"), ids("<|eot_id|>")])
        model = transformers.LlamaForCausalLM(cfg)
    elif flavour == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, bos_token_id=ids("<|endoftext|>"),
                                       eos_token_id=ids("<|im_end|>"), **shape)
        gen = GenerationConfig(bos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
                               eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")], repetition_penalty=1.1)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPTNeoXConfig(bos_token_id=0, eos_token_id=0, rotary_pct=0.25, **shape)
        if reward:
            cfg.num_labels = 1
            model = transformers.GPTNeoXForSequenceClassification(cfg)
        else:
            model = transformers.GPTNeoXForCausalLM(cfg)
        gen = GenerationConfig(bos_token_id=0, eos_token_id=0)
    model.save_pretrained(path)
    if not reward:
        gen.save_pretrained(path)
    return path


def _train(rank, world_size, root, llama_o, qwen_o):
    """SFT from the converted Llama-3-like model, then DPO from that SFT run (two hops from the HF model); and a
    Qwen2-like model trained from scratch with the converted model's tokenizer."""
    from megatron.engines.run_config import load_run_config
    from megatron.training.trainer import run_training

    def cfg(o, objective, data, extra):
        sets = [f"objective.name={objective}", f"data.train_path={os.path.join(DATA, data)}", "data.valid_path=null",
                f"data.tokenizer={o}/tokenizer", f"data.cache_dir={root}/cache_{objective}_{os.path.basename(o)}",
                "data.on_bad_record=skip", "train.iters=1", "train.micro_batch_size=2", "train.global_batch_size=2",
                "train.eval_interval=0", "train.progress_bar=false", "train.precision=fp32",
                "checkpoint.interval=0", "launcher.num_gpus=1", "model.max_seq_len=64", "model.attention=eager"]
        return load_run_config([os.path.join(TINY, "sft.yml"), os.path.join(o, "model.yaml")], sets + extra,
                               world_size=world_size)

    run_training(cfg(llama_o, "sft", "sft.jsonl", [f"checkpoint.load={llama_o}", f"checkpoint.save={root}/l_sft",
                                                   f"logging.dir={root}/l_sft_logs"]))
    run_training(cfg(llama_o, "dpo", "pairwise.jsonl", [f"checkpoint.load={root}/l_sft",
                                                        f"checkpoint.save={root}/l_dpo", f"logging.dir={root}/l_dpo_logs"]))
    run_training(cfg(qwen_o, "sft", "sft.jsonl", [f"checkpoint.save={root}/q_sft", f"logging.dir={root}/q_logs"]))
    return True


def _make_eos_the_argmax(model, eos: int) -> None:
    """Weights for which greedy decoding emits `eos` first: blocks output zero (residual = embedding), every
    embedding is the first unit vector, the head scores only `eos` (positive on that direction)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name:
                p.zero_()
        model.get_input_embeddings().weight.zero_()
        model.get_input_embeddings().weight[:, 0] = 1.0
        head = model.get_output_embeddings().weight
        head.zero_()
        head[eos, 0] = 1.0


def _stops_at(out_dir: str, eos: int, prompt: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    _make_eos_the_argmax(model, eos)
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=8, do_sample=False)
        # The same model with transformers' class default EOS (Llama 2, GPT-NeoX 2, Qwen2 none) never stops:
        # the check has teeth. (None is replaced by another id, since generate would fill it from the model.)
        default_eos = type(model.config)().eos_token_id
        assert default_eos != eos
        other = default_eos if default_eos is not None else (eos + 1) % model.config.vocab_size
        ran_on = model.generate(prompt, generation_config=GenerationConfig(eos_token_id=other, pad_token_id=eos,
                                                                           max_new_tokens=8, do_sample=False))
    assert got[0, prompt.shape[1]:].tolist() == [eos]
    assert ran_on.shape[1] == prompt.shape[1] + 8


@pytest.mark.slow
def test_exported_ids_follow_the_tokenizer_and_base_model(tmp_path):
    root = str(tmp_path)
    llama_o, qwen_o = os.path.join(root, "llama3_o"), os.path.join(root, "qwen2_o")
    llama_tok = build_tokenizer("llama3", os.path.join(root, "llama3_tok_check"))
    qwen_tok = build_tokenizer("qwen2", os.path.join(root, "qwen2_tok_check"))
    hf_to_megatron(build_base("llama3", root), llama_o)
    hf_to_megatron(build_base("qwen2", root), qwen_o)
    run_distributed(_train, 1, root, llama_o, qwen_o)
    lid, qid = llama_tok.convert_tokens_to_ids, qwen_tok.convert_tokens_to_ids
    assert lid("<|eot_id|>") > 250 and qid("<|im_end|>") > 250  # after the learnt vocabulary, like the real ones

    # Llama-3-like, DPO <- SFT <- converted model: the base generation_config is two starting points away.
    assert wio.read_meta(wio.resolve_tag_dir(f"{root}/l_dpo"))["init_from"].startswith(f"{root}/l_sft")
    out = megatron_to_hf(f"{root}/l_dpo", os.path.join(root, "llama3_export"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == \
        (lid("<|begin_of_text|>"), lid("<|eot_id|>"), None)
    assert gen["eos_token_id"] == [lid("<|end_of_text|>"), lid("<|eot_id|>")]
    assert gen["bos_token_id"] == lid("<|begin_of_text|>") and gen["temperature"] == 0.6 and gen["top_p"] == 0.9
    _stops_at(out, lid("<|eot_id|>"), torch.tensor([[lid("<|begin_of_text|>"), 40, 41, 42]]))

    # Qwen2-like, trained from scratch with the converted tokenizer: found next to the tokenizer.
    out = megatron_to_hf(f"{root}/q_sft", os.path.join(root, "qwen2_export"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (qid("<|im_end|>"), qid("<|endoftext|>"))
    assert gen["eos_token_id"] == [qid("<|im_end|>"), qid("<|endoftext|>")] and gen["repetition_penalty"] == 1.1
    _stops_at(out, qid("<|im_end|>"), torch.tensor([[40, 41, 42]]))

    # GPT-NeoX-like, converted only: EOS is id 0 (transformers' GPTNeoXConfig says 2).
    neox_o = os.path.join(root, "neox_o")
    hf_to_megatron(build_base("gpt_neox", root), neox_o)
    out = megatron_to_hf(neox_o, os.path.join(root, "neox_export"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 0, None)
    _stops_at(out, 0, torch.tensor([[40, 41, 42]]))


@pytest.mark.slow
def test_reward_model_pads_with_a_token_other_than_eos(tmp_path):
    """GPT-NeoX-like tokenizer: no pad, BOS == EOS. The export pads with <|padding|>, so transformers scores a
    right-padded batch at each sequence's EOS, which is where our model reads the reward."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = str(tmp_path)
    o = os.path.join(root, "neox_rm_o")
    hf_to_megatron(build_base("gpt_neox", root, reward=True), o)
    out = megatron_to_hf(o, os.path.join(root, "rm_export"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "<|padding|>" and tok.eos_token_id == 0
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    texts = ["count down from 12: 12 11 10" + tok.eos_token, "reverse: a b" + tok.eos_token]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][1, -1].item() == 1  # the shorter one is right-padded
    with torch.no_grad():
        got = model(**batch).logits[:, 0]
    full, _meta, ours_cfg = wio.read_weights(o)
    want = torch.stack([our_forward(ours_cfg, full, torch.tensor([tok(t)["input_ids"]]))[0, -1] for t in texts])
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # Padding with EOS (a common `tok.pad_token = tok.eos_token`) would score the token before EOS instead.
    eos_padded = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    model.config.pad_token_id = 0
    with torch.no_grad():
        wrong = model(input_ids=eos_padded, attention_mask=batch["attention_mask"]).logits[:, 0]
    assert not torch.allclose(wrong, want, atol=1e-3)
