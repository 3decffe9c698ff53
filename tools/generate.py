#!/usr/bin/env python
"""Generate completions for a JSONL file of prompts with one of our checkpoints or a Hugging Face model.

    python tools/generate.py CONFIG.yml [MORE.yml ...] [--set key=value ...]             # 1 process
    python deepy.py tools/generate.py CONFIG.yml [MORE.yml ...] [--set key=value ...]    # N ranks

The model: `checkpoint.load` (a checkpoint of ours, any saved tensor/pipeline layout, re-sharded on load; its
own model section is used) or `generation.hf_model` (a Hugging Face directory, converted on the fly on every
rank). Tokenizer: `data.tokenizer`, else the checkpoint's. Sampling and files: the `generation:` section
(input, output, n, temperature, top_p, top_k, min_p, max_new_tokens, stop, ignore_eos, seed, batch_size).
Layouts: `parallel.tensor` shards the model; the remaining ranks are data-parallel and split the prompts;
`parallel.zero_stage: 3` gathers the weights once; `parallel.pipeline` must be 1.

At the end one JSON line goes to stdout: tokens_per_s (generated tokens / generation wall time, model load
excluded), prompts, completions, generated_tokens, seconds, skipped (prompts too long for model.max_seq_len,
kept in the output with `skipped`), output. Exit code 0 on success, 2 on a config or checkpoint error.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def _model_source(cfg, workdir: str):
    """(tag dir of the weights, checkpoint root) from generation.hf_model or checkpoint.load."""
    from megatron.checkpoint import weights_io as wio
    from megatron.config import ConfigError

    if cfg.generation.hf_model:
        from megatron.interop.convert import hf_to_megatron
        out = os.path.join(workdir, "hf_import")
        return hf_to_megatron(cfg.generation.hf_model, out, tp=1), out
    if cfg.checkpoint.load:
        tag_dir = wio.resolve_tag_dir(cfg.checkpoint.load)
        return tag_dir, os.path.dirname(os.path.abspath(tag_dir))
    raise ConfigError("no model: set checkpoint.load (a checkpoint of ours, any layout) or generation.hf_model "
                      "(a Hugging Face model directory)")


def _check_unpipelined(cfg) -> None:
    """Generation runs unpipelined: a clear error (naming what works) before anything else fails."""
    from megatron.config import ConfigError

    if cfg.parallel.pipeline > 1:
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline}: generation runs unpipelined; set "
                          "parallel.pipeline=1 (checkpoints of any pipeline layout load re-sharded). Tensor "
                          "parallelism, data-parallel ranks and ZeRO-3 all work")


def _adopt_checkpoint_model(cfg, tag_dir: str, world: int):
    """cfg with the checkpoint's model section (the weights decide the shape), unpipelined, re-validated."""
    from megatron.checkpoint import weights_io as wio
    from megatron.config import derive_and_validate

    _check_unpipelined(cfg)
    saved = wio.read_config(tag_dir)
    cfg = copy.deepcopy(cfg)
    cfg.model = copy.deepcopy(saved.model)
    cfg.parallel.sequence_parallel = False  # one-token steps cannot be split along the sequence; same weights
    cfg.reference.load = None
    if not cfg.data.tokenizer:
        cfg.data.tokenizer = saved.data.tokenizer
    return derive_and_validate(cfg, world), saved


def _eos_ids(tokenizer, root: str):
    """EOS of the tokenizer plus those of the model's generation_config.json (converted HF models)."""
    ids = {tokenizer.eos_id}
    path = os.path.join(root, "hf", "generation_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            eos = json.load(fh).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def run(cfg) -> dict:
    """Generate for every record of generation.input and write generation.output; returns the summary (rank 0)."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from megatron.config import ConfigError
    from megatron.data import load_tokenizer
    from megatron.data.chat_template import resolve_chat_template
    from megatron.engines.build import build_policy, device_for_rank, freeze_as_reference
    from megatron.generation import SamplingParams, generate
    from megatron.generation.records import encode_records, read_records, write_output
    from megatron.mpu import initialize_parallel
    from megatron.mpu.distributed import init_distributed

    gen = cfg.generation
    params = SamplingParams.from_config(gen)  # bad values and files fail before anything loads
    records = read_records(gen.input)
    if not gen.output:
        raise ConfigError("key 'generation.output' is not set: give the JSONL file to write completions to")
    init_distributed(cfg.parallel.backend)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with tempfile.TemporaryDirectory(prefix="generate_") as workdir:
        tag_dir, root = _model_source(cfg, workdir)
        cfg, _saved = _adopt_checkpoint_model(cfg, tag_dir, world)
        if not cfg.data.tokenizer and os.path.isdir(os.path.join(root, "tokenizer")):
            cfg.data.tokenizer = os.path.join(root, "tokenizer")
        ps = initialize_parallel(cfg.parallel.tensor, 1)
        model = freeze_as_reference(cfg, ps, build_policy(cfg, ps, tag_dir), device_for_rank(), deepspeed)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        eos = _eos_ids(tokenizer, root)
    template = resolve_chat_template(cfg.data.chat_template, tokenizer.chat_template)
    # Every rank encodes every record, so a bad record stops all ranks alike (none waits in a collective).
    encoded, skipped = encode_records(records, range(len(records)), tokenizer, template, cfg.model.max_seq_len,
                                      gen.input)
    mine = range(ps.dp_rank, len(records), ps.dp_size)  # strided: every rank gets a mix of lengths
    prompts = {i: encoded[i] for i in mine if i in encoded}
    skipped = {i: why for i, why in skipped.items() if i in mine}
    is_main = ps.rank == 0
    bar = None
    if is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts) * params.n, desc=f"generate (rank 0 of {ps.dp_size} data-parallel)",
                   unit="seq", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    order = sorted(prompts)
    t0 = time.perf_counter()
    out = generate(model, cfg, ps, [prompts[i] for i in order], params, prompt_indices=order,
                   eos_token_ids=eos, batch_size=gen.batch_size, detokenize=tokenizer.decode,
                   progress=bar.update if bar is not None else None)
    seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if bar is not None:
        bar.close()
    share = ({i: c for i, c in zip(order, out)}, skipped) if ps.tp_rank == 0 else ({}, {})
    shares = [share]
    if dist.is_initialized() and world > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        shares = [None] * world
        dist.gather_object(share, shares if is_main else None, dst=0)
    if not is_main:
        return {}
    completions, skips = {}, {}
    for done, skip in shares:
        completions.update(done)
        skips.update(skip)
    write_output(gen.output, records, completions, skips)
    tokens = sum(len(c.token_ids) for cs in completions.values() for c in cs)
    wall = float(seconds[0])
    return {"tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0, "prompts": len(completions),
            "completions": sum(len(cs) for cs in completions.values()), "generated_tokens": tokens,
            "seconds": round(wall, 3), "skipped": len(skips), "output": os.path.abspath(gen.output)}


def main(argv=None) -> int:
    from megatron.interop.hf_config import ConversionError
    from megatron.training.worker_main import run_worker

    return run_worker(__doc__, run, argv, errors=(ConversionError,), precheck=_check_unpipelined)


if __name__ == "__main__":
    sys.exit(main())
