"""RNGTracker: forking leaves the default stream untouched, named streams advance and checkpoint."""
import pytest
import torch

from megatron.mpu import MODEL_PARALLEL_RNG, ParallelState, RNGTracker, model_parallel_seed


def test_fork_restores_default_state_and_uses_named_seed():
    torch.manual_seed(7)
    expected_default = torch.rand(5)
    torch.manual_seed(99)
    expected_a1, expected_a2 = torch.rand(3), torch.rand(3)

    torch.manual_seed(7)
    tracker = RNGTracker()
    tracker.add("a", 99)  # adding must not advance or reseed the default stream
    with tracker.fork("a"):
        a1 = torch.rand(3)
    with tracker.fork("a"):
        a2 = torch.rand(3)  # continues where the previous fork stopped
    torch.testing.assert_close(torch.rand(5), expected_default)
    torch.testing.assert_close(a1, expected_a1)
    torch.testing.assert_close(a2, expected_a2)


def test_fork_restores_on_exception_and_checkpoint_roundtrip():
    tracker = RNGTracker()
    tracker.add("a", 1)
    saved = tracker.get_states()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with tracker.fork("a"):
            torch.rand(2)
            raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork("a"):
        after_exception = torch.rand(4)  # the 2 draws made before the exception were kept
    tracker.set_states(saved)  # rewind: the same numbers again (recomputation / resume)
    with tracker.fork("a"):
        rewound = torch.rand(6)
    torch.manual_seed(1)
    reference = torch.rand(6)
    torch.testing.assert_close(after_exception, reference[2:])
    torch.testing.assert_close(rewound, reference)
    with pytest.raises(ValueError):
        tracker.add("a", 3)
    with pytest.raises(ValueError):
        tracker.add("b", 1)
    with pytest.raises(KeyError):
        with tracker.fork("missing"):
            pass


def test_model_parallel_seed_differs_per_tp_rank():
    ps0 = ParallelState.single()
    ps1 = ParallelState.single()
    ps1.tp_rank, ps1.tp_size = 1, 2
    draws = []
    for ps in (ps0, ps1):
        torch.manual_seed(11)
        tracker = model_parallel_seed(11, ps)
        with tracker.fork(MODEL_PARALLEL_RNG):
            draws.append(torch.rand(4))
        draws.append(torch.rand(4))  # default stream after the fork
    assert not torch.equal(draws[0], draws[2])
    torch.testing.assert_close(draws[1], draws[3])
    torch.manual_seed(11)
    torch.testing.assert_close(torch.rand(4), draws[1])
