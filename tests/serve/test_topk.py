"""The routers' one-kernel top-k (premoe.serve.topk) on CUDA: the values and indices of
`torch.topk`, ties to the lower index, -inf and NaN as torch orders them; patched in, routers'
calls (eager, compiled, captured in a CUDA graph) take it and every other call stays torch's."""

from __future__ import annotations

import pytest
import torch

from premoe.serve import topk
from tests.helpers import GPU

pytestmark = GPU


def _prepared() -> None:
    if not topk.prepare(torch.device("cuda")):
        pytest.skip("Triton cannot run here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t", "e", "k"), [(1, 128, 8), (7, 64, 2), (33, 256, 8), (3, 60, 6)])
def test_small_topk_equals_torch_topk(dtype: torch.dtype, t: int, e: int, k: int) -> None:
    _prepared()
    g = torch.Generator(device="cuda").manual_seed(t * e + k)
    x = torch.randn(t, e, device="cuda", generator=g).softmax(-1).to(dtype)  # [T, E]
    x[0, : e // 2] = float("-inf")  # a masked row: only its upper half can be chosen
    values, indices = topk.small_topk(x, k)
    want = torch.topk(x, k, dim=-1)
    torch.testing.assert_close(values, want.values, rtol=0, atol=0)
    assert torch.equal(x.gather(1, indices), values)  # bf16 ties may pick other equal entries
    assert all(len(set(row)) == k for row in indices.tolist())
    if dtype == torch.float32:
        assert torch.equal(indices, want.indices)


def test_ties_nan_and_inf() -> None:
    _prepared()
    x = torch.tensor(
        [
            [0.5, 0.5, 0.1, 0.5, float("-inf"), 0.2],
            [float("nan"), 1.0, float("inf"), -1.0, 0.0, 2.0],
            [float("-inf")] * 6,
        ],
        device="cuda",
    )
    values, indices = topk.small_topk(x, 3)
    assert indices.tolist() == [[0, 1, 3], [0, 2, 5], [0, 1, 2]]
    assert values[1, 0].isnan() and values[1, 1].item() == float("inf")
    assert values[2].tolist() == [float("-inf")] * 3


def test_patched_routes_router_calls_compiled_and_captured() -> None:
    _prepared()
    x = torch.randn(4, 128, device="cuda").softmax(-1)
    big = torch.randn(2, 5000, device="cuda")

    def router(z: torch.Tensor) -> torch.Tensor:
        w, i = torch.topk(z, 8, dim=-1)
        return w / w.sum(-1, keepdim=True) + i.float()

    want = router(x)
    original = torch.topk
    with topk.patched(torch.device("cuda")):
        assert torch.topk is not original
        eager = router(x)
        other = torch.topk(big, 3, dim=-1)  # too wide: torch's own
        compiled = torch.compile(router)(x)
        static = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            router(static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = router(static)
    assert torch.topk is original  # restored
    static.copy_(x.flip(0))
    graph.replay()
    torch.testing.assert_close(eager, want)
    torch.testing.assert_close(compiled, want)
    torch.testing.assert_close(out, router(x.flip(0)))
    assert torch.equal(other.indices, torch.topk(big, 3, dim=-1).indices)
