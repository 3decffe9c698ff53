"""How completions end (EOS, stop token ids, stop strings, max_new_tokens, model.max_seq_len), over-long prompts,
ragged batches, and prompt records (text, chat, ids) -> token ids."""
from __future__ import annotations

import os

import pytest

from megatron.config import ConfigError
from megatron.data import load_tokenizer
from megatron.generation import PromptTooLong, SamplingParams, generate
from megatron.generation.prompts import encode_prompt
from megatron.mpu import ParallelState
from megatron.testing.configs import DATA
from tests.unit.test_generation_sampling import PROMPTS, _tiny_model

TOKENIZER = os.path.join(DATA, "tokenizer")
PS = ParallelState.single()
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def test_eos_and_stop_token_ids_end_with_the_token(model):
    cfg, m = model
    free = generate(m, cfg, PS, PROMPTS[:2], GREEDY)
    ids = free[0][0].token_ids
    eos = ids[4]
    first = ids.index(eos)
    got = generate(m, cfg, PS, PROMPTS[:2], GREEDY, eos_token_ids=[eos])[0][0]
    assert got.token_ids == ids[:first + 1] and got.finish_reason == "stop"
    assert got.logprobs == pytest.approx(free[0][0].logprobs[:first + 1], abs=1e-5)
    ignored = generate(m, cfg, PS, PROMPTS[:2], SamplingParams(**{**GREEDY.__dict__, "ignore_eos": True}),
                       eos_token_ids=[eos])[0][0]
    assert ignored.token_ids == ids and ignored.finish_reason == "length"
    by_id = generate(m, cfg, PS, PROMPTS[:2], SamplingParams(**{**GREEDY.__dict__, "ignore_eos": True,
                                                                "stop_token_ids": [eos]}))[0][0]
    assert by_id.token_ids == ids[:first + 1] and by_id.finish_reason == "stop"


def test_max_new_tokens_and_max_seq_len(model):
    cfg, m = model
    out = generate(m, cfg, PS, PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=5, n=3))
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for r in out for c in r)
    near = [1] * (cfg.model.max_seq_len - 3)  # room for 3 tokens
    c = generate(m, cfg, PS, [near, [2, 3]], GREEDY)
    assert len(c[0][0].token_ids) == 3 and c[0][0].finish_reason == "length"
    assert len(c[1][0].token_ids) == 12


def test_over_long_prompt_is_a_clear_error(model):
    cfg, m = model
    with pytest.raises(PromptTooLong, match=r"prompt 1 has 64 tokens.*model.max_seq_len=64"):
        generate(m, cfg, PS, [[1, 2], [1] * 64], GREEDY)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(m, cfg, PS, [[]], GREEDY)


def test_ragged_batch_equals_each_prompt_alone(model):
    cfg, m = model
    for params in (GREEDY, SamplingParams(temperature=0.8, top_k=40, max_new_tokens=6, seed=3, n=2)):
        together = generate(m, cfg, PS, PROMPTS, params, batch_size=64)
        for i, p in enumerate(PROMPTS):
            alone = generate(m, cfg, PS, [p], params, prompt_indices=[i])[0]
            assert [c.token_ids for c in alone] == [c.token_ids for c in together[i]]


def test_stop_strings_cut_the_text(tok):
    cfg, m = _tiny_model(tok.vocab_size)  # 501 ids (padded to 512): every sampled id decodes
    prompt = tok.encode("count up from 3:")
    free = generate(m, cfg, PS, [prompt], GREEDY, detokenize=tok.decode)[0][0]
    text = free.text
    assert text == tok.decode(free.token_ids)
    # a stop string that first appears part-way through the free-running text
    stop = next(text[i:i + 3] for i in range(2, len(text) - 3) if text[i:i + 3].strip() and text[i:i + 3] not in text[:i + 2])
    at = text.index(stop)
    params = SamplingParams(**{**GREEDY.__dict__, "stop": [stop, "never-appears"]})
    got = generate(m, cfg, PS, [prompt], params, detokenize=tok.decode)[0][0]
    assert got.finish_reason == "stop" and got.text == text[:at]
    n = len(got.token_ids)  # ends with the token that completed the stop string
    assert got.token_ids == free.token_ids[:n] and stop in tok.decode(got.token_ids)
    assert stop not in tok.decode(got.token_ids[:-1])
    with pytest.raises(ValueError, match="detokenizer"):
        generate(m, cfg, PS, [prompt], params)


def test_prompt_records(tok):
    template = tok.chat_template
    text = encode_prompt({"prompt": "count up from 3:"}, tok, template, "x line 1")
    assert text == ([tok.bos_id] if tok.add_bos else []) + tok.encode("count up from 3:")
    msgs = [{"role": "user", "content": "count up from 3:"}]
    chat = encode_prompt({"messages": msgs}, tok, template, "x line 2")
    rendered = tok.render_chat(template, msgs, True)
    assert rendered.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert chat == tok.encode(rendered) and chat[0] == tok.bos_id and chat.count(tok.bos_id) == 1
    assert encode_prompt({"prompt_ids": [5, 6]}, tok, template, "x") == [5, 6]
    for bad, match in (({"prompt": "a", "messages": msgs}, "exactly one of"), ({"text": "a"}, "exactly one of"),
                       ({"prompt_ids": [10 ** 9]}, "outside the tokenizer"), ({"messages": "hi"}, "role, content"),
                       ({"prompt": 5}, "must be a string")):
        with pytest.raises(ConfigError, match=match):
            encode_prompt(bad, tok, template, "p.jsonl line 7")
    with pytest.raises(ConfigError, match="chat template"):
        encode_prompt({"messages": msgs}, tok, None, "p.jsonl line 8")


def test_sampling_params_validation():
    for key, value in (("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.0),
                       ("max_new_tokens", 0), ("stop", [""])):
        with pytest.raises(ConfigError, match=f"generation.{key}"):
            SamplingParams(**{key: value}).validate()


def test_pipeline_and_value_head_are_config_errors(model):
    cfg, m = model
    import copy
    bad = copy.deepcopy(cfg)
    bad.parallel.pipeline = 2
    with pytest.raises(ConfigError, match="parallel.pipeline=1"):
        generate(m, bad, PS, [[1]], GREEDY)
