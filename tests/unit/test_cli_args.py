"""`--set` on every command line: several pairs after one flag, repeated flags, both mixed, in order."""
import os
import sys

import pytest

import deepy
from megatron.config import ConfigError, load_config
from megatron.testing.configs import REPO, TINY

sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_data  # noqa: E402

SFT = os.path.join(TINY, "sft.yml")


def test_deepy_accepts_pairs_after_one_flag_and_repeated_flags():
    args = deepy.parse(["train.py", SFT, "--set", "train.iters=7", "train.seed=3", "--set", "train.iters=9",
                        "--dry-run"])
    assert args.configs == [SFT] and args.dry_run
    assert args.overrides == ["train.iters=7", "train.seed=3", "train.iters=9"]
    cfg = load_config(args.configs, args.overrides)
    assert (cfg.train.iters, cfg.train.seed) == (9, 3)  # later overrides win, as with repeated flags


def test_deepy_dry_run_forwards_every_pair_to_the_workers(capsys):
    assert deepy.main(["train.py", SFT, "--set", "train.iters=7", "train.seed=3", "--dry-run"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[cmd.index("train.py"):] == ["train.py", SFT, "--set", "train.iters=7", "--set", "train.seed=3"]
    port = int(cmd[cmd.index("--master_port") + 1])
    assert 0 < port < 65536


def test_train_py_reads_pairs_after_one_flag(capsys):
    import train
    # The second pair is misspelt: reaching its error shows both pairs were read as overrides.
    assert train.main([SFT, "--set", "train.iters=2", "train.itres=5"]) == 2
    err = capsys.readouterr().err
    assert "--set train.itres=5: unknown key 'train.itres'" in err and "did you mean 'iters'" in err


def test_a_config_file_after_set_gets_a_hint():
    with pytest.raises(ConfigError, match=r"config files go before --set"):
        load_config([], ["train.iters=2", "more.yml"])


def test_tools_take_pairs_after_one_flag(capsys):
    args = preprocess_data.build_parser().parse_args(["--input", "x.jsonl", "--output-prefix", "o", "--set",
                                                      "data.kind=sft", "model.max_seq_len=64"])
    assert args.overrides == ["data.kind=sft", "model.max_seq_len=64"]
    from megatron.training.memory_report import main as memory_main
    assert memory_main([SFT, "--world-size", "2", "--set", "parallel.zero_stage=1",
                        "train.micro_batch_size=8"]) == 0
    assert "ZeRO 1, fp32, micro-batch 8 x" in capsys.readouterr().out
