"""One-row linear layers as the Triton GEMV (premoe.serve.gemv_linear): only one-row 16-bit
calls without bias on CUDA take it, every other call is the function it replaced; patched in, a
captured decode step runs it for every linear layer (q/k/v, o_proj, router, a narrow LM head) and
decodes what cuBLAS's step decodes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from premoe.quant import kernels
from premoe.serve import gemv_linear
from tests.helpers import GPU, captured_step_kernels


def test_cpu_calls_keep_the_function_they_replace() -> None:
    calls: list[tuple[int, ...]] = []

    def fallback(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return F.linear(x, w, b)

    wrapped = gemv_linear.over(fallback)
    assert gemv_linear.over(fallback) is wrapped  # one function per fallback (dynamo guards)
    assert gemv_linear.over(wrapped) is wrapped
    x, w = torch.randn(1, 1, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    with gemv_linear.patched(torch.device("cpu")):  # no kernel on the CPU: nothing patched
        assert F.linear is not wrapped
        assert torch.equal(wrapped(x, w), F.linear(x, w))
    assert calls == [(1, 1, 8)]


def _prepared() -> None:
    if not kernels.prepare(torch.device("cuda")):
        pytest.skip("Triton cannot run here")


@GPU[0]
@GPU[1]
def test_one_row_calls_take_the_gemv_others_stay() -> None:
    _prepared()
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    real, original = F.linear, kernels.gemv_linear
    seen: list[str] = []

    def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        seen.append("gemv")
        return original(x, w, b)  # not kernels.gemv_linear: that is this function during the test

    w, wide = rand(300, 512), rand(gemv_linear.MAX_OUT + 8, 64)
    cases = {  # name: (x, weight, bias, takes the GEMV)
        "one row": (rand(1, 1, 512), w, None, True),
        "fp16": (rand(1, 512, dtype=torch.float16), w.half(), None, True),
        "two rows": (rand(2, 1, 512), w, None, False),
        "bias": (rand(1, 512), w, rand(300), True),
        "bias view with a stride": (rand(1, 512), w, rand(600)[::2], False),
        "fp32": (rand(1, 512, dtype=torch.float32), w.float(), None, False),
        "LM head width": (rand(1, 64), wide, None, False),
        "weight view with a stride": (rand(1, 256), w[:, ::2], None, False),
    }
    kernels.gemv_linear = gemv  # type: ignore[assignment]
    try:
        with gemv_linear.patched(torch.device("cuda")):
            assert F.linear is not real
            for name, (x, weight, bias, takes) in cases.items():
                seen.clear()
                got = F.linear(x, weight, bias)
                assert seen == (["gemv"] if takes else []), name
                want = real(x, weight, bias)
                assert got.shape == want.shape and got.dtype == want.dtype, name
                if not takes:  # the very call it replaced
                    assert torch.equal(got, want), name
                    continue
                # the GEMV: fp32 sums rounded once, so one rounding from the exact product
                exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
                step = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-10
                assert ((got.double() - exact).abs() <= exact.abs() * step + 1e-3).all(), name
    finally:
        kernels.gemv_linear = original
    assert F.linear is real  # restored


@GPU[0]
@GPU[1]
def test_captured_decode_step_runs_the_gemv_for_every_linear_layer() -> None:
    """The GEMV adds 3 launches per layer (q/k/v fused, o_proj, router) and 1 for the tiny LM
    head to a captured step, and the step decodes what the cuBLAS step decodes."""
    _prepared()
    from premoe.serve.decode import NullSink

    class Text(NullSink):
        text = ""

        def on_delta(self, text: str, completion_tokens: int) -> None:
            self.text += text

    runs: dict[bool, tuple[int, str]] = {}
    for enabled in (False, True):
        gemv_linear.ENABLED = enabled
        sink = Text()
        try:
            launches, dec = captured_step_kernels(sink=sink)
        finally:
            gemv_linear.ENABLED = True
        runs[enabled] = (sum(n for k, n in launches.items() if "moe_gemv_kernel" in k), sink.text)
    layers = dec.model.config.num_hidden_layers
    assert runs[True][0] - runs[False][0] == 3 * (3 * layers + 1), runs
    assert runs[True][1] == runs[False][1]
