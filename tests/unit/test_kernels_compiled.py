"""The `compiled` kernels (torch.compile, inductor on CPU, dynamic shapes): the same log-probs and gradients as the
plain twins (fp32 1e-5) for the Llama preset (RMSNorm, SwiGLU, rotary), and a
packed row of a new width (or row count) reuses the compiled code instead of recompiling."""
import pytest
import torch

from tests.unit.test_kernels_model import _run, unpacked_batch
from tests.unit.test_model_presets import build_cfg, packed_batch

pytestmark = pytest.mark.slow  # inductor compiles a few small graphs: tens of seconds on a 2-core CPU

COMPILED = ["model.kernel_ops.norm=compiled", "model.kernel_ops.rotary=compiled", "model.kernel_ops.mlp=compiled"]


def _compile_count() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("preset", ["llama"])  # RMSNorm, SwiGLU, full rotary; one preset: compiling is slow
def test_compiled_equals_eager_and_does_not_recompile_for_a_new_width(preset):
    pytest.importorskip("torch._inductor")
    torch._dynamo.reset()
    # widths 20, then 12: neither equals a head or rotary size (dynamo unifies equal sizes at the first compile
    # and then guards on that equality, which is not what this test is about)
    ids, pos, seg = (torch.nn.functional.pad(t, (0, 4)) for t in packed_batch())  # 2 rows of 20
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    ref = _run(build_cfg(preset, "model.kernels=eager"), ids, pos, seg, weights)
    out = _run(build_cfg(preset, "model.kernels=eager", *COMPILED), ids, pos, seg, weights)
    real = seg != 0
    assert (out[0] - ref[0])[real].abs().max() < 1e-5 and (out[1] - ref[1])[real].abs().max() < 1e-5
    for name, g in ref[2].items():
        assert (out[2][name] - g).abs().max() < 1e-5, (preset, name)
    compiled = _compile_count()
    assert compiled > 0
    # other layouts and widths (3 rows of 12, then 3 rows of 14): the token dims are marked dynamic before the
    # first compile, so no new graph (a single-row batch would compile once more: torch specialises size 1)
    eager_cfg = build_cfg(preset, "model.kernels=eager")
    compiled_cfg = build_cfg(preset, "model.kernels=eager", *COMPILED)
    for width in (12, 14):
        ids2, pos2, seg2 = (t[:, :width].contiguous() for t in unpacked_batch())
        w2 = torch.randn(ids2.shape, generator=torch.Generator().manual_seed(width))
        ref2, out2 = _run(eager_cfg, ids2, pos2, seg2, w2), _run(compiled_cfg, ids2, pos2, seg2, w2)
        assert (out2[0] - ref2[0])[seg2 != 0].abs().max() < 1e-5
        assert _compile_count() == compiled, f"{tuple(ids2.shape)} recompiled"
