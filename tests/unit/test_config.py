"""The typed config: YAML merge order, --set overrides, strict errors, derived values, round trip."""
import pytest

from megatron.config import ConfigError, dump_config, load_config, load_dumped_config


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_merge_order_and_overrides(tmp_path):
    a = _write(tmp_path, "a.yml", "model:\n  hidden_size: 128\n  num_layers: 4\ntrain:\n  iters: 10\n")
    b = _write(tmp_path, "b.yml", "model:\n  num_layers: 8\noptimizer:\n  lr: 1e-5\n")
    cfg = load_config([a, b], ["train.iters=20", "model.rope_scaling={rope_type: linear, factor: 2.0}"])
    assert cfg.model.hidden_size == 128          # from a only
    assert cfg.model.num_layers == 8             # b overrides a
    assert cfg.train.iters == 20                 # --set overrides both
    assert cfg.optimizer.lr == 1e-5 and isinstance(cfg.optimizer.lr, float)  # YAML 1.1 "1e-5" string -> float
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    cfg2 = load_config([b, a])
    assert cfg2.model.num_layers == 4            # order matters


def test_unknown_key_wrong_type_and_bad_choice(tmp_path):
    path = _write(tmp_path, "typo.yml", "model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert path in str(err.value) and "'model.hiden_size'" in str(err.value)
    assert "did you mean 'hidden_size'" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*did you mean 'train'"):
        load_config([], ["trian.iters=3"])
    with pytest.raises(ConfigError, match=r"--set train.iters=many: key 'train.iters' expects int, got 'many'"):
        load_config([], ["train.iters=many"])
    with pytest.raises(ConfigError, match=r"'model.norm': 'rmsnrom' is not one of .*did you mean 'rmsnorm'"):
        load_config([], ["model.norm=rmsnrom"])


def test_derived_values_and_non_dividing_sizes():
    cfg = load_config([], ["parallel.tensor=2", "parallel.pipeline=2", "train.micro_batch_size=2",
                           "train.global_batch_size=16", "model.vocab_size=50000"], world_size=8)
    d = cfg.derived
    assert (d.data_parallel, d.grad_accum) == (2, 4)   # 8 / (2*2); 16 / (2*2)
    assert d.padded_vocab_size == 50176 and d.padded_vocab_size % 256 == 0 and d.padded_vocab_size >= 50000
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tensor \* parallel.pipeline "
                                          r"= 2 \* 2 = 4"):
        load_config([], ["parallel.tensor=2", "parallel.pipeline=2"], world_size=6)
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible by train.micro_batch_size \* "
                                          r"data_parallel = 4 \* 2 = 8"):
        load_config([], ["train.micro_batch_size=4", "train.global_batch_size=10"], world_size=2)
    with pytest.raises(ConfigError, match=r"model.num_kv_heads=2 is not divisible by parallel.tensor=4"):
        load_config([], ["model.num_kv_heads=2", "parallel.tensor=4", "model.num_attention_heads=4"], world_size=4)
    with pytest.raises(ConfigError, match=r"zero_stage=3 cannot be combined with parallel.pipeline=2.*zero_stage=1"):
        load_config([], ["parallel.pipeline=2", "parallel.zero_stage=3"], world_size=2)


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config([], ["model.hidden_size=96", "model.num_attention_heads=6", "train.seed=7",
                           "deepspeed={zero_optimization: {reduce_bucket_size: 1000}}",
                           "launcher.extra_args=[--foo, bar]"], world_size=1)
    path = str(tmp_path / "dump.yml")
    dump_config(cfg, path)
    back = load_dumped_config(path)
    assert back == cfg and back.derived == cfg.derived and back.derived.head_dim == 16


def test_pipeline_partition_is_checked_at_load():
    cfg = load_config([], ["model.num_layers=3", "parallel.pipeline=2", "parallel.pipeline_partition=2,1"],
                      world_size=2)
    assert cfg.parallel.pipeline_partition == "2,1"
    with pytest.raises(ConfigError, match=r"pipeline_partition='2,2'.*summing to model.num_layers=3, e.g. '2,1'"):
        load_config([], ["model.num_layers=3", "parallel.pipeline=2", "parallel.pipeline_partition=2,2"], world_size=2)
