"""Rank layout and ParallelState.single(): checked against DeepSpeed's own topology (pure Python)."""
import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron.mpu import ParallelState, initialize_parallel, make_layout

SHAPES = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 2), (4, 2, 1), (2, 3, 4), (1, 4, 3), (8, 1, 2)]


@pytest.mark.parametrize("tp,pp,dp", SHAPES)
def test_layout_matches_deepspeed_topology(tp, pp, dp):
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    layout = make_layout(tp * pp * dp, tensor=tp, pipeline=pp)
    assert (layout.tp, layout.pp, layout.dp) == (tp, pp, dp)
    for rank in range(tp * pp * dp):
        c = topo.get_coord(rank)
        assert layout.coords(rank) == (c.pipe, c.data, c.model)
        assert layout.rank_of(c.pipe, c.data, c.model) == rank
        assert rank == c.pipe * dp * tp + c.data * tp + c.model
    norm = lambda groups: sorted(sorted(g) for g in groups)
    assert norm(layout.tp_groups()) == norm(topo.get_axis_comm_lists("model") or [[r] for r in range(tp * pp * dp)])
    assert norm(layout.dp_groups()) == norm(topo.get_axis_comm_lists("data") or [[r] for r in range(tp * pp * dp)])
    assert norm(layout.pp_groups()) == norm(topo.get_axis_comm_lists("pipe") or [[r] for r in range(tp * pp * dp)])
    # Model-parallel groups = all ranks with the same data coordinate (DeepSpeed's grid does the same).
    assert norm(layout.mp_groups()) == norm(topo.filter_match(data=d) for d in range(dp))
    # Every rank is in exactly one group of each kind.
    for groups in (layout.tp_groups(), layout.dp_groups(), layout.pp_groups(), layout.mp_groups()):
        assert sorted(r for g in groups for r in g) == list(range(tp * pp * dp))


@pytest.mark.parametrize("world,tp,pp", [(4, 3, 1), (6, 2, 2), (3, 1, 2), (8, 3, 3)])
def test_indivisible_world_size_raises(world, tp, pp):
    with pytest.raises(ValueError, match=f"world size {world}.*{tp}.*{pp}"):
        make_layout(world, tp, pp)


def test_non_positive_sizes_raise():
    with pytest.raises(ValueError):
        make_layout(4, 0, 1)


def test_single_state_without_torch_distributed():
    import torch.distributed as dist
    assert not dist.is_initialized()
    ps = ParallelState.single()
    assert (ps.rank, ps.world_size, ps.tp_size, ps.tp_rank, ps.pp_size, ps.dp_size) == (0, 1, 1, 0, 1, 1)
    assert ps.tp_group is None and ps.dp_group is None and ps.pp_group is None
    assert ps.tp_ranks == ps.dp_ranks == ps.pp_ranks == [0]
    assert ps.is_first_stage and ps.is_last_stage
    assert ps.get_model_parallel_world_size() == ps.get_data_parallel_world_size() == 1
    assert ps.get_tensor_model_parallel_rank() == ps.get_pipeline_model_parallel_rank() == 0
    assert ps.get_tensor_model_parallel_group() is None and ps.get_data_parallel_group() is None
    with pytest.raises(RuntimeError, match="torch.distributed"):
        initialize_parallel(1, 1)
