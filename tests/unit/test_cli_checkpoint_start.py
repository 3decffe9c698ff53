"""Where a run starts: its own checkpoints resume in full, `checkpoint.load` of another run (another objective or
data) is a new stage unless `checkpoint.load_optimizer` says otherwise; a model mismatch names its keys (rope and
norm numerics included) and, in the run's own `checkpoint.save`, says the directory holds another run. RNG state
round-trips through `torch.load(weights_only=True)`."""
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from megatron.checkpoint import checkpointing as ckpt
from megatron.config import dump_config
from megatron.engines.build import starting_point
from megatron.testing.configs import tiny_test_config


def _fake_run(root, cfg, step=2, training_state=True):
    """A checkpoint directory in the real layout, minus the tensors (starting_point reads only these files)."""
    tag = os.path.join(root, ckpt.tag_for_step(step))
    os.makedirs(os.path.join(tag, "deepspeed") if training_state else tag)
    dump_config(cfg, os.path.join(tag, "config.yaml"))
    with open(os.path.join(tag, "meta.json"), "w") as fh:
        json.dump({"format": 1, "step": step, "consumed_samples": 4 * step, "tensor": 1, "pipeline": 1,
                   "world_size": 1, "init_from": None}, fh)
    with open(os.path.join(root, "latest"), "w") as fh:
        fh.write(os.path.basename(tag))
    return tag


def test_load_of_another_run_is_a_new_stage_by_default(tmp_path):
    sft_tag = _fake_run(str(tmp_path / "sft_ck"), tiny_test_config(str(tmp_path / "sft"), "sft"))
    load = f"checkpoint.load={tmp_path / 'sft_ck'}"
    # DPO from SFT: another objective -> weights only, step 0, the SFT model as initial weights and reference.
    dpo = tiny_test_config(str(tmp_path / "dpo"), "dpo", overrides=[load])
    assert dpo.checkpoint.load_optimizer is None
    assert starting_point(dpo) == (sft_tag, False, sft_tag)
    # The same objective on other data is another run too.
    other = tiny_test_config(str(tmp_path / "s2"), "sft", overrides=[load, "data.train_path=data/tiny/sft_valid.jsonl"])
    assert starting_point(other)[1] is False
    # The same objective and data: the same run continued from another directory -> full resume.
    same = tiny_test_config(str(tmp_path / "s3"), "sft", overrides=[load, f"checkpoint.save={tmp_path / 'new'}"])
    assert starting_point(same)[1] is True
    # An explicit load_optimizer decides either way.
    assert starting_point(tiny_test_config(str(tmp_path / "d"), "dpo",
                                           overrides=[load, "checkpoint.load_optimizer=true"]))[1] is True
    assert starting_point(tiny_test_config(str(tmp_path / "s"), "sft",
                                           overrides=[load, "checkpoint.load_optimizer=false"]))[1] is False


def test_own_checkpoints_resume_in_full_even_with_load_optimizer_false(tmp_path):
    save = str(tmp_path / "dpo_ck")
    cfg = tiny_test_config(str(tmp_path / "dpo"), "dpo", overrides=[f"checkpoint.save={save}",
                                                                     "checkpoint.load_optimizer=false"])
    init = str(tmp_path / "sft_ck" / "step_0000002")
    tag = _fake_run(save, cfg, step=3)
    with open(os.path.join(tag, "meta.json")) as fh:
        meta = json.load(fh)
    meta["init_from"] = init
    with open(os.path.join(tag, "meta.json"), "w") as fh:
        json.dump(meta, fh)
    assert starting_point(cfg) == (tag, True, init)


def test_converted_weights_are_always_a_new_stage(tmp_path):
    cfg = tiny_test_config(str(tmp_path / "a"), "sft")
    tag = _fake_run(str(tmp_path / "conv"), cfg, training_state=False)
    run = tiny_test_config(str(tmp_path / "b"), "sft", overrides=[f"checkpoint.load={tmp_path / 'conv'}",
                                                                  "checkpoint.load_optimizer=true"])
    assert starting_point(run) == (tag, False, tag)


def test_save_dir_of_another_model_says_so_and_how_to_choose_another(tmp_path):
    save = str(tmp_path / "ck")
    _fake_run(save, tiny_test_config(str(tmp_path / "old"), "sft", overrides=["model.hidden_size=128"]))
    cfg = tiny_test_config(str(tmp_path / "new"), "sft", overrides=[f"checkpoint.save={save}"])
    with pytest.raises(ckpt.CheckpointError) as err:
        starting_point(cfg)
    text = str(err.value)
    assert f"checkpoint.save={save} already holds another run" in text
    assert "--set checkpoint.save=NEW_DIR" in text and "model.hidden_size: checkpoint 128 vs config 64" in text
    assert "fix the model section" not in text


@pytest.mark.parametrize("override, key", [("model.rope_theta=500000.0", "model.rope_theta"),
                                           ("model.norm_eps=1.0e-6", "model.norm_eps"),
                                           ("model.rope_scaling={rope_type: linear, factor: 2.0}",
                                            "model.rope_scaling")])
def test_rope_and_norm_numerics_must_match(tmp_path, override, key):
    src = str(tmp_path / "src")
    _fake_run(src, tiny_test_config(str(tmp_path / "a"), "sft", overrides=[override]))
    cfg = tiny_test_config(str(tmp_path / "b"), "dpo", overrides=[f"checkpoint.load={src}"])
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint.load: .* different model:\n  {key}: checkpoint"):
        starting_point(cfg)
    # Weights-only loads check them too: a model trained with another rotary base is another model.
    same = tiny_test_config(str(tmp_path / "c"), "dpo", overrides=[f"checkpoint.load={src}", override])
    assert starting_point(same)[1] is False


def _draws():
    return (random.random(), float(np.random.rand()), float(np.random.randn()), float(torch.rand(1)))


def test_rng_state_loads_with_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = str(tmp_path / "rank00000.pt")
    torch.save({"rng": ckpt.rng_state()}, path)
    want = _draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = ckpt.load_rng_file(path)  # torch.load(weights_only=True) inside
    assert state is not None
    ckpt.set_rng_state(state)
    assert _draws() == want
    # The same file opens with a plain weights-only load (no pickled numpy arrays).
    torch.load(path, weights_only=True)


def test_rng_file_of_the_old_pickled_format_is_skipped_not_unpickled(tmp_path):
    path = str(tmp_path / "old.pt")
    torch.save({"rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert ckpt.load_rng_file(path) is None
