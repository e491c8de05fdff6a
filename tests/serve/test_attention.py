"""The one-query attention kernel (premoe.serve.attention): equal to SDPA to about one rounding
for grouped and plain heads, strided cache views, split and unsplit KV columns, masks per row,
broadcast or none; patched in, decode calls (eager, compiled, captured) take it and every other
call stays transformers' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from premoe.serve import attention
from tests.helpers import GPU, captured_step_kernels, run_triton_script


def test_kernel_under_the_interpreter() -> None:
    """The kernels' arithmetic, run by Triton's CPU interpreter (needs `triton`)."""
    stdout = run_triton_script(Path(__file__).with_name("attention_interpret_check.py"), 300)
    assert "decode attention ok" in stdout


def test_split_sizing() -> None:
    """Columns split to reach `PROGRAMS` (row, KV head, split) programs at small batches, never
    under `MIN_SPLIT_COLUMNS` a split, by length alone at large batches, never for fp32 or
    D > 128 caches (their one-block tiles spill)."""
    assert attention.PROGRAMS == 32 and attention.MIN_SPLIT_COLUMNS == 32
    blocks = attention._blocks
    assert blocks(1024, 128, 2, 4) == (8, 128, 128)  # batch 1, 4 KV heads: 32 programs
    assert blocks(256, 128, 2, 4) == (8, 32, 32)
    assert blocks(40, 128, 2, 4) == (2, 32, 32)  # not under 32 columns a split
    assert blocks(1024, 128, 2, 256) == (4, 256, 256)  # batch 64: by length alone
    assert blocks(1024, 128, 4, 4) == (4, 256, 64)  # fp32: by length, 64-column blocks
    assert blocks(1024, 256, 2, 4) == (4, 256, 64)  # D > 128 likewise
    assert blocks(20000, 128, 2, 4)[0] <= attention.MAX_SPLITS


def test_handles_only_what_it_computes() -> None:
    q, k = torch.zeros(1, 8, 1, 64), torch.zeros(1, 2, 10, 64)
    mask = torch.zeros(1, 1, 1, 10)
    assert not attention.handles(q, k, k, mask, 0.0, {})  # CPU
    assert not attention.handles(q, k, k, mask, 0.0, {"softcap": 30.0})


def test_handles_the_keywords_a_decoder_layer_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a tiny Qwen3-MoE's attention passes at a decode step reaches the kernel (on a GPU):
    flags and position ids do; anything that changes the attention does not."""
    from transformers.modeling_utils import AttentionInterface

    from premoe.serve.continuous import ContinuousDecoder
    from premoe.serve.decode import NullSink, SamplingParams
    from tests.helpers import tiny_model, tokenizer

    seen: list[dict] = []
    original = AttentionInterface._global_mapping["sdpa"]

    def spy(module, q, k, v, mask, dropout=0.0, scaling=None, **kw):  # noqa: ANN001, ANN202
        if q.shape[2] == 1:
            seen.append(kw)
        return original(module, q, k, v, mask, dropout, scaling, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    dec = ContinuousDecoder(tiny_model("qwen3_moe").eval(), tokenizer(), slots=2, max_len=64)
    dec.add(NullSink(), [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    with torch.no_grad():
        while dec.active():
            dec.step()
    assert seen and set(seen[0]) >= {"use_cache", "sliding_window", "position_ids"}
    q, k = torch.zeros(1, 8, 1, 64, dtype=torch.half), torch.zeros(1, 2, 10, 64, dtype=torch.half)
    mask = torch.zeros(1, 1, 1, 10, dtype=torch.half)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert attention.handles(q, k, k, mask, 0.0, seen[0])
    assert not attention.handles(q, k, k, mask, 0.0, {**seen[0], "s_aux": k})
    assert not attention.handles(q, k, k, mask, 0.0, {**seen[0], "sliding_window": 8})


def _sdpa_reference(q, k, v, mask, scale):  # -> [B, 1, Hq, D] float32
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1),
        attn_mask=None if mask is None else mask.float(), scale=scale,
    )  # fmt: skip
    return out.transpose(1, 2)


def _prepared() -> None:
    if not attention.prepare(torch.device("cuda")):
        pytest.skip("Triton cannot run here")


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("b", "hq", "hk", "n", "d"),
    [(1, 32, 4, 256, 128), (5, 8, 2, 700, 64), (2, 4, 4, 37, 80), (1, 16, 4, 9000, 128)],
)
def test_equals_sdpa(dtype: torch.dtype, b: int, hq: int, hk: int, n: int, d: int) -> None:
    _prepared()
    g = torch.Generator(device="cuda").manual_seed(b * n + d)
    cache = torch.randn(2, b + 1, hk, n + 3, d, dtype=dtype, device="cuda", generator=g)
    k, v = cache[0, :b, :, :n], cache[1, :b, :, :n]  # strided, as the slot cache's views
    q = torch.randn(b, 1, hq, d, dtype=dtype, device="cuda", generator=g).transpose(1, 2)
    pos = torch.randint(0, n, (b, 1), device="cuda", generator=g)
    cols = torch.arange(n, device="cuda")
    mask = torch.where(cols[None, :] <= pos, 0.0, torch.finfo(dtype).min).to(dtype)
    for m in (mask[:, None, None, :], None, mask[:1, None, None, :]):
        got = attention.decode_attention(q, k, v, m, d**-0.5)
        full = None if m is None else m.expand(b, 1, 1, n)
        want = _sdpa_reference(q, k, v, full, d**-0.5)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
        # a bf16 / fp16 rounding of the output, not more: compare with the rounded reference
        rounding = (want.to(dtype).float() - want).abs().max()
        assert (got.float() - want).abs().max() <= 2 * rounding + 1e-3


@GPU[0]
@GPU[1]
def test_patched_takes_decode_calls_compiled_and_captured() -> None:
    _prepared()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    class Module(torch.nn.Module):
        num_key_value_groups = 4

    mod = Module()
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(2, 2, 300, 64, dtype=torch.bfloat16, device="cuda", generator=g)
    v = torch.randn_like(k)
    q = torch.randn(2, 8, 1, 64, dtype=torch.bfloat16, device="cuda", generator=g)
    mask = torch.zeros(2, 1, 1, 300, dtype=torch.bfloat16, device="cuda")
    mask[1, ..., 100:] = torch.finfo(torch.bfloat16).min
    q_long = torch.randn(2, 8, 5, 64, dtype=torch.bfloat16, device="cuda", generator=g)
    mask_long = torch.zeros(2, 1, 5, 300, dtype=torch.bfloat16, device="cuda")

    def attend(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fn = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", None)
        return fn(mod, q, k, v, mask, scaling=0.125)[0]

    want, want_long = attend(q, mask), attend(q_long, mask_long)
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with attention.patched(torch.device("cuda")):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not original
        eager, long = attend(q, mask), attend(q_long, mask_long)
        compiled = torch.compile(attend)(q, mask)
        static = q.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            attend(static, mask)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attend(static, mask)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original  # restored
    static.copy_(q.flip(0))
    graph.replay()
    assert torch.equal(long, want_long)  # a prefill chunk: transformers' own function
    for got, ref in ((eager, want), (compiled, want), (out, attend(q.flip(0), mask))):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """The attention, merge and route top-k kernels compile for sm_90 with no GPU (needs
    `triton`): what the interpreter does not check."""
    script = Path(__file__).with_name("sm90_compile_check.py")
    assert "sm_90 compile ok" in run_triton_script(script, 600, interpret=False)


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("compile", [False, True])
def test_decode_graphs_run_the_step_kernels(compile: bool) -> None:
    """A bf16 model's captured decode step (eager or compiled layers) runs the one-query
    attention kernel and the fused routers' kernel, and no sdpa kernel: the patches reach the
    layers' real calls (they once fell back to sdpa for every call, silently)."""
    _prepared()
    launches, dec = captured_step_kernels(compile)
    assert dec.fused_routers is not None
    names = set(launches)
    assert any("decode_attention_kernel" in n for n in names), sorted(names)
    assert any("route_topk_kernel" in n for n in names), sorted(names)
    sdpa = ("sdpa", "flash", "fmha", "efficient_attention")
    assert not any(word in n.lower() for n in names for word in sdpa), sorted(names)
