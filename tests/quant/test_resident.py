"""Quantized resident experts: logits equal the dequantized model's, also after random in-place
swaps; the Triton GEMV (interpreter on CPU, real kernel on CUDA) agrees with the dequantized
weights within summation-order rounding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from premoe.errors import UsageError
from premoe.quant import kernels
from premoe.quant.codecs import dequantize
from premoe.quant.resident import QuantizedExperts, quantize_resident
from tests.helpers import GPU, run_triton_script
from tests.tiny import build_tiny

_OPTS = {"fp8": {"block": (16, 16)}, "int4": {"group_size": 16}}


def _experts_paths(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("mlp.experts")]


def _model(family: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    over = {"hidden_size": 64, "vocab_size": 128}
    if family in ("mixtral", "gpt_oss"):
        over["intermediate_size"] = 32
    else:
        over["moe_intermediate_size"] = 32
    m = build_tiny(family, seed, **over).to(dtype)
    m.config._experts_implementation = "eager"
    return m


def _dense_reference(model: torch.nn.Module, qr) -> torch.nn.Module:
    """A copy of `model` whose experts hold the dequantized slots and the stock forward."""
    ref = copy.deepcopy(model)
    for path, q in qr.layers.items():
        mod = ref.get_submodule(path)
        del mod._premoe_quant
        del mod.forward  # back to the class forward
        for name in q.projs:
            mod.register_parameter(name, torch.nn.Parameter(q.dense(name), requires_grad=False))
    return ref


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_resident_equals_dequantized_and_swaps(family: str, scheme: str) -> None:
    model = _model(family).eval()
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    full = _logits(model, x)
    qr = quantize_resident(model, _experts_paths(model), scheme, **_OPTS[scheme])
    for q in qr.layers.values():
        assert not any(n in dict(q.module.named_parameters(recurse=False)) for n in q.projs)
    got = _logits(model, x)
    assert torch.equal(got, _logits(_dense_reference(model, qr), x))
    rel = float((got - full).norm() / full.norm())
    assert rel < (0.03 if scheme == "fp8" else 0.08)

    # random swaps: slots take experts of another model (quantized host entries), in place
    donor = _model(family, seed=1)
    gen = torch.Generator().manual_seed(2)
    ptrs = {p: q.storage.data_ptr() for p, q in qr.layers.items()}
    for _ in range(3):
        for path, q in qr.layers.items():
            dmod = donor.get_submodule(path)
            slots = torch.randperm(q.num_experts, generator=gen)[:3].tolist()
            srcs = torch.randint(0, q.num_experts, (3,), generator=gen).tolist()
            for slot, e in zip(slots, srcs, strict=True):
                entry = q.entry_from_dense({n: getattr(dmod, n)[e] for n in q.projs})
                assert q.write_slot(slot, entry) == q.slot_bytes
                # the slot now decodes to exactly the entry's codec parts
                parts = q.parts_of_entry(entry)
                for n in q.projs:
                    w = dequantize(q.fmt, parts[n], q.qconfig(), dtype=q.dtype)
                    assert torch.equal(q.dense_slot(n, slot), w)
                    assert torch.equal(q.dense(n)[slot], w)  # stacked decode == per slot
        assert torch.equal(_logits(model, x), _logits(_dense_reference(model, qr), x))
    assert ptrs == {p: q.storage.data_ptr() for p, q in qr.layers.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_grouped_path_matches_eager(family: str) -> None:
    """The grouped-matmul path (CUDA's default for prefill) against the exact eager loop."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    model = _model(family).eval()
    qr = quantize_resident(model, _experts_paths(model), "int4", group_size=16)
    x = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    eager = _logits(model, x)
    for q in qr.layers.values():
        q.grouped = True
    grouped = _logits(model, x)
    assert (grouped - eager).abs().max() / eager.abs().max() < 2e-2


def test_resident_transposed_with_biases_gpt_oss() -> None:
    """gpt-oss: [E, K, N] parameters, interleaved gate/up, biases, keyword call."""
    model = _model("gpt_oss").eval()
    x = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    qr = quantize_resident(model, _experts_paths(model), "fp8", block=(16, 16))
    q = next(iter(qr.layers.values()))
    assert q.transposed and q.projs["gate_up_proj"].n == 64  # 2I output rows
    assert torch.equal(_logits(model, x), _logits(_dense_reference(model, qr), x))


def test_resident_int4_without_compressed_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where compressed-tensors is absent (a GPU box), the torch packer writes the same slots."""
    from premoe.quant import codecs

    if not codecs._has_compressed_tensors():
        pytest.skip("compares against compressed-tensors")
    a, b = _model("qwen3_moe"), _model("qwen3_moe")
    qa = quantize_resident(a, _experts_paths(a), "int4", group_size=16)
    monkeypatch.setattr(codecs, "_has_compressed_tensors", lambda: False)
    qb = quantize_resident(b, _experts_paths(b), "int4", group_size=16)
    for path in qa.layers:
        assert torch.equal(qa[path].storage, qb[path].storage)


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_entry_from_exported_parts_equals_slot(scheme: str) -> None:
    """An exported (per-expert gate, up, down) expert becomes the same slot bytes: the resident
    path can load quantized checkpoints that `ExpertQuantizer` wrote, without requantizing."""
    from premoe.quant.export import ExpertQuantizer

    model = _model("qwen3_moe")
    path = _experts_paths(model)[0]
    mod = model.get_submodule(path)
    gate_up, down = mod.gate_up_proj.detach().clone(), mod.down_proj.detach().clone()
    inter = gate_up.shape[1] // 2
    qr = quantize_resident(model, [path], scheme, **_OPTS[scheme])
    q = qr[path]
    ex = ExpertQuantizer(scheme, block=(16, 16), group_size=16)  # type: ignore[arg-type]
    names = ("weight", "weight_scale_inv") if scheme == "fp8" else ("weight_packed", "weight_scale")
    for e in (0, 5):
        parts = {}
        for proj, w in (
            ("gate", gate_up[e, :inter]),
            ("up", gate_up[e, inter:]),
            ("down", down[e]),
        ):
            parts[proj] = ex(f"x.experts.{e}.{proj}.weight", w, expert_weight=True)
        local = {
            proj: {n: out[f"x.experts.{e}.{proj}.{n}"] for n in names}
            for proj, out in parts.items()
        }
        gu = {n: torch.cat([local["gate"][n], local["up"][n]]) for n in names}
        entry = q.entry_from_parts({"gate_up_proj": gu, "down_proj": local["down"]})
        assert torch.equal(entry, q.read_slot(e))
    # one token: few experts hit, dequantized slot by slot (the same values)
    x = torch.randint(0, 100, (1, 1))
    assert torch.equal(_logits(model, x), _logits(_dense_reference(model, qr), x))


def test_resident_bytes_and_errors() -> None:
    model = _model("qwen3_moe")
    mod = model.get_submodule(_experts_paths(model)[0])
    e, n, k = mod.gate_up_proj.shape
    _, h, i = mod.down_proj.shape
    with pytest.raises(UsageError, match="does not divide"):
        QuantizedExperts(copy.deepcopy(mod), "int4", params=("gate_up_proj", "down_proj"),
                         group_size=48)  # fmt: skip
    with pytest.raises(UsageError, match="unknown quantization scheme"):
        quantize_resident(model, _experts_paths(model), "nf4")
    with pytest.raises(UsageError, match="no module or parameter"):
        quantize_resident(model, ["model.nope.experts"], "fp8")
    # parameter names resolve to their owner module
    qr = quantize_resident(model, [p + ".gate_up_proj" for p in _experts_paths(model)], "int4",
                           group_size=16)  # fmt: skip
    q = next(iter(qr.layers.values()))
    ideal = (n * k + h * i) // 2 + 2 * (n * k + h * i) // 16  # packed nibbles + bf16 scales
    assert ideal <= q.slot_bytes <= ideal + 4 * 16  # alignment padding only
    with pytest.raises(UsageError, match="uint8"):
        q.write_slot(0, torch.zeros(3, dtype=torch.uint8))


# ---- Triton kernel ---------------------------------------------------------------------------


def _run_check(script: str, timeout: int, interpret: bool = True) -> str:
    """Stdout of the check `script` beside this file (tests.helpers.run_triton_script)."""
    return run_triton_script(Path(__file__).with_name(script), timeout, interpret)


@pytest.mark.slow
def test_triton_gemv_interpreter() -> None:
    """The kernel's arithmetic, run by Triton's interpreter on the CPU (needs `triton`)."""
    stdout = _run_check("gemv_interpret_check.py", 300)
    assert "fp8 ok" in stdout and "int4 ok" in stdout
    assert "fp8 model ok" in stdout and "int4 model ok" in stdout
    assert "dense ok" in stdout and "linear ok" in stdout


@pytest.mark.slow
def test_triton_fused_interpreter() -> None:
    """The fused kernels (up + silu(gate) * up; down + routing weight + sum over k) against
    float64, then tiny models through them, run by Triton's interpreter (needs `triton`)."""
    stdout = _run_check("fused_interpret_check.py", 600)
    lines = ["fused kernels ok", "qwen3_moe greedy ok", "qwen3_moe bf16 ok",
             "fp8 resident fused ok", "int4 resident fused ok", "gpt_oss unfused ok"]  # fmt: skip
    for line in lines:
        assert line in stdout, stdout


@pytest.mark.slow
def test_triton_kernel_compiles_for_sm90() -> None:
    """Every kernel variant and table shape compiles for sm_90 with no GPU (needs `triton`)."""
    assert "sm_90 compile ok" in _run_check("sm90_compile_check.py", 900, interpret=False)


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("scheme", ["fp8", "int4"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_resident_cuda(family: str, scheme: str) -> None:
    if not kernels.available(torch.device("cuda")):
        pytest.skip("needs triton")
    model = _model(family).cuda().eval()
    x = torch.randint(
        0, 100, (1, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    qr = quantize_resident(model, _experts_paths(model), scheme, **_OPTS[scheme])
    ref = _dense_reference(model, qr)
    # decode-sized batch: the Triton GEMV; prefill-sized: dequantize + matmul (exact)
    for q in qr.layers.values():
        q.gemv_rows = 10**6
    got = _logits(model, x)
    want = _logits(ref, x)
    assert (got - want).abs().max() / want.abs().max() < 2e-2
    for q in qr.layers.values():
        q.gemv_rows = 0
    got = _logits(model, x)  # grouped matmuls over the dequantized slots
    assert (got - want).abs().max() / want.abs().max() < 2e-2
    # swaps stay in place and visible to the kernel
    for q in qr.layers.values():
        q.write_slot(0, q.read_slot(1).pin_memory())
    torch.cuda.synchronize()
    for q in qr.layers.values():
        q.gemv_rows = 10**6
    ref = _dense_reference(model, qr)
    got, want = _logits(model, x), _logits(ref, x)
    assert (got - want).abs().max() / want.abs().max() < 2e-2


@GPU[0]
@GPU[1]
@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_resident_cuda_compiled(scheme: str) -> None:
    """The real Triton op under torch.compile (inductor, one graph), before and after a swap."""
    if not kernels.available(torch.device("cuda")):
        pytest.skip("needs triton")
    model = _model("qwen3_moe").cuda().eval()
    qr = quantize_resident(model, _experts_paths(model), scheme, **_OPTS[scheme])
    x = torch.randint(0, 100, (1, 1), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(x, use_cache=False).logits.float()
        got = compiled(x, use_cache=False).logits.float()
        assert (got - want).abs().max() / want.abs().max() < 1e-2
        for q in qr.layers.values():
            entries = [q.read_slot(s) for s in range(q.num_experts)]
            for s in range(q.num_experts):
                q.write_slot(s, entries[(s + 1) % q.num_experts].pin_memory())
        torch.cuda.synchronize()
        want = model(x, use_cache=False).logits.float()
        got = compiled(x, use_cache=False).logits.float()
        assert (got - want).abs().max() / want.abs().max() < 1e-2
    torch._dynamo.reset()
