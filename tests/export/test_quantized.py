"""Pruning quantized and MTP checkpoints exactly (issue: real checkpoints).

For each hub format (tiny checkpoints written in exactly the published layout by
`tests.quantized`): the export keeps the format, moves every companion with its expert, renumbers
kept experts 0..K-1, slices routers, writes the kept share of the bytes, and (where transformers
can read the format offline) loads with plain `from_pretrained` and equals the full checkpoint
with routing masked to the kept experts, both dequantized by transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from premoe.arch.keys import ExpertKey
from premoe.errors import CheckpointError, UnsupportedArchitectureError
from premoe.export import export_pruned
from premoe.load import load_pruned, load_pruned_with_info, size_model
from premoe.profile import profile
from premoe.prune import KeepSets, masked_routing
from premoe.prune.quant_config import pruned_quant_config
from premoe.source import resolve_model
from tests.export.helpers import token_ids
from tests.helpers import (
    assert_one_line_error,
    assert_same_store,
    random_texts,
    run_cli,
    write_texts,
)
from tests.quantized import add_mtp, write_quantized

KEEP = [[1, 2, 5, 6], [0, 3, 4, 7]]  # 2 per group of 4: exact for n_group=2

# (family, format, options): transformers dequantizes these on the CPU
LOADABLE = [
    ("deepseek_v3", "fp8_block", {}),
    ("qwen3_moe", "fp8_block", {"scale_dtype": torch.bfloat16}),
    ("mixtral", "fp8_block", {}),
    ("qwen3_moe", "ct_int4_pack", {}),
    ("mixtral", "ct_fp8", {}),
    ("gpt_oss", "mxfp4", {}),
]
BYTES_ONLY = [("qwen3_moe", "gptq"), ("mixtral", "awq")]


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    cache = {}

    def make(family: str, fmt: str, mtp: bool = False, **opts):
        key = (family, fmt, mtp, tuple(sorted(opts.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{fmt}")
            src = tiny_checkpoint(family)
            if mtp:
                src = add_mtp(_copy(src, root / "dense"))
            cache[key] = write_quantized(src, root / "q", fmt, **opts)
        return cache[key]

    return make


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _keep(src) -> KeepSets:
    return KeepSets.from_mapping({n: KEEP[i % 2] for i, n in enumerate(src.moe_layers)})


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _check_bytes(src, out, keep: KeepSets) -> None:
    """Every kept expert's components are byte-identical under their new number; nothing of a
    dropped expert is left; routers sliced; the byte total is the kept share."""
    km = src.keymap
    got = _tensors(out)
    expected_bytes = 0
    for key in src.reader.keys():
        role = km.role(key)
        t = src.reader.get(key)
        if isinstance(role, ExpertKey) and role.expert is not None:
            kept = keep.layers[role.layer]
            if role.expert in kept:
                new = km.renumbered(role, kept.index(role.expert))
                assert torch.equal(got[new].view(torch.uint8), t.view(torch.uint8)), new
                expected_bytes += t.nbytes
            continue
        if role is None:
            assert torch.equal(got[key].view(torch.uint8), t.view(torch.uint8)), key
            expected_bytes += t.nbytes
            continue
        rows = list(keep.layers[role.layer])
        dim = getattr(role.tensor, "dim", 0)
        want = t.index_select(dim % t.dim(), torch.tensor(rows))
        assert torch.equal(got[key].view(torch.uint8), want.view(torch.uint8)), key
        expected_bytes += want.nbytes
    assert sum(t.nbytes for t in got.values()) == expected_bytes


@pytest.mark.parametrize(("family", "fmt", "opts"), LOADABLE)
def test_quantized_export_loads_and_equals_masked(family, fmt, opts, quantized, tmp_path) -> None:
    folder = quantized(family, fmt, **opts)
    src = resolve_model(folder)
    assert src.keymap.format.name == fmt
    keep = _keep(src)
    out = tmp_path / "pruned"
    result = export_pruned(src, keep, out)
    _check_bytes(src, out, keep)
    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((folder / "config.json").read_text())["quantization_config"]
    )
    assert result.provenance["weights"]["format"] == fmt

    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert src.arch.num_experts(pruned.config) == 4
    ids = token_ids(full.config)
    with torch.no_grad():
        with masked_routing(full, src.arch, keep):
            reference = full(ids, use_cache=False).logits
        unmasked = full(ids, use_cache=False).logits
        exported = pruned(ids, use_cache=False).logits
    assert (exported - reference).abs().max().item() <= 1e-5
    assert (unmasked - reference).abs().max().item() > 1e-4
    src.close()


@pytest.mark.parametrize(("family", "fmt"), BYTES_ONLY)
def test_gptq_awq_export_moves_every_companion(family, fmt, quantized, tmp_path) -> None:
    src = resolve_model(quantized(family, fmt))
    roles = map(src.keymap.role, src.reader.keys())
    comps = {r.component for r in roles if isinstance(r, ExpertKey)}
    assert {"qweight", "qzeros", "scales"} <= comps
    keep = _keep(src)
    export_pruned(src, keep, tmp_path / "pruned")
    _check_bytes(src, tmp_path / "pruned", keep)
    src.close()


def test_fp8_deepseek_mtp_pruned_to_same_k_or_dropped(quantized, tmp_path) -> None:
    folder = quantized("deepseek_v3", "fp8_block", mtp=True)
    src = resolve_model(folder)
    n = src.config.num_hidden_layers
    assert src.keymap.mtp_layers == [n]
    keep = _keep(src)
    result = export_pruned(src, keep, tmp_path / "with")
    mtp = result.provenance["mtp"]
    assert mtp["action"] == "pruned" and mtp["rule"] == "router-row-norm"
    mtp_keep = mtp["keep"][str(n)]
    assert len(mtp_keep) == 4 and sum(e < 4 for e in mtp_keep) == 2  # same count per group
    full_keep = KeepSets.from_mapping({**keep.layers, n: mtp_keep})
    _check_bytes(src, tmp_path / "with", full_keep)
    got = _tensors(tmp_path / "with")
    assert got[f"model.layers.{n}.mlp.gate.weight"].shape[0] == 4
    assert got[f"model.layers.{n}.mlp.gate.e_score_correction_bias"].shape == (4,)
    assert f"model.layers.{n}.mlp.experts.3.down_proj.weight_scale_inv" in got
    assert f"model.layers.{n}.mlp.experts.4.down_proj.weight" not in got
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "with", dtype=torch.float32)
    assert pruned.config.n_routed_experts == 4 and pruned.config.num_nextn_predict_layers == 1

    export_pruned(src, keep, tmp_path / "without", drop_mtp=True)
    config = json.loads((tmp_path / "without" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    assert not [k for k in _tensors(tmp_path / "without") if k.startswith(f"model.layers.{n}.")]
    src.close()


def test_cli_profile_export_reload_fp8_mtp_and_mxfp4(quantized, demo_suite, tmp_path, capsys):
    """profile -> export -> reload through the CLI, on fp8 DeepSeek-V3 + MTP and MXFP4 gpt-oss."""
    for family, fmt, mtp in (("deepseek_v3", "fp8_block", True), ("gpt_oss", "mxfp4", False)):
        folder = quantized(family, fmt, mtp=mtp)
        _add_tokenizer(folder)
        store, out = tmp_path / f"{family}-store", tmp_path / f"{family}-out"
        task = f"add={demo_suite['add']['profile']}"
        code, _, err = run_cli(
            ["profile", str(folder), "--task", task, "--out", str(store), "--max-samples", "8"],
            capsys,
        )
        assert code == 0, err
        code, text, err = run_cli(
            [
                "export",
                str(folder),
                "-s",
                str(store),
                "-t",
                "add",
                "--keep",
                "4",
                "-o",
                str(out),
                "--json",
            ],
            capsys,
        )
        assert code == 0, err
        summary = json.loads(text)
        assert summary["weights"]["format"] == fmt
        assert summary["mtp"]["action"] == ("pruned" if mtp else "none")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert model.config.num_local_experts if family == "gpt_oss" else True
        with torch.no_grad():
            logits = model(token_ids(model.config), use_cache=False).logits
        assert torch.isfinite(logits).all()


def _add_tokenizer(folder) -> None:
    from tests.helpers import tokenizer

    tokenizer().save_pretrained(folder)


# ---- refusals: one line, non-zero exit, nothing written --------------------------------------


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite(folder, fn):
    path = folder / "model.safetensors"
    state = _tensors(folder)
    fn(state)
    from safetensors.torch import save_file

    save_file(state, path, metadata={"format": "pt"})


def test_refusals(quantized, tmp_path, capsys) -> None:
    base = quantized("qwen3_moe", "fp8_block")
    cases = []

    unknown = _copy(base, tmp_path / "unknown-method")
    _edit_config(unknown, quantization_config={"quant_method": "hqq", "nbits": 4})
    cases.append((unknown, "quantization method 'hqq'"))

    bnb = _copy(base, tmp_path / "bnb")
    _edit_config(bnb, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    cases.append((bnb, "bitsandbytes"))

    companion = _copy(base, tmp_path / "companion")
    key = "model.layers.0.mlp.experts.2.up_proj.weight_zero_point"
    _rewrite(companion, lambda s: s.__setitem__(key, torch.zeros(2)))
    cases.append((companion, "weight_zero_point"))

    scale = _copy(base, tmp_path / "scale")
    key = "model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv"
    _rewrite(scale, lambda s: s.__setitem__(key, torch.ones(7, 7)))
    cases.append((scale, "scale (7, 7)"))

    extra = _copy(base, tmp_path / "fewer-experts")
    _edit_config(extra, num_local_experts=6)  # transformers 5 names it so in config.json
    cases.append((extra, "declares 6 experts"))

    for folder, needle in cases:
        out = tmp_path / f"out-{folder.name}"
        code, _, err = run_cli(
            ["export", str(folder), "--policy", "random", "--keep", "4", "-o", str(out)], capsys
        )
        assert_one_line_error(code, err, needle)
        assert not out.exists()
        with pytest.raises((CheckpointError, UnsupportedArchitectureError)):
            resolve_model(folder).keymap  # noqa: B018


def test_quant_config_rewrite_renumbers_and_drops_expert_entries() -> None:
    q = {
        "quant_method": "fp8",
        "modules_to_not_convert": [
            "lm_head",
            "model.layers.1.mlp.gate",
            "model.layers.1.mlp.experts.5.down_proj",  # kept as slot 2
            "model.layers.1.mlp.experts.3.down_proj",  # dropped
            "model.layers.3.mlp.experts.0.gate_proj",  # MTP layer dropped
            "re:.*experts\\.7\\..*",  # a pattern: stays
        ],
        "dynamic": {"-:model.layers.1.mlp.experts.6.up_proj": {}, "+:.*attn.*": {"bits": 8}},
    }
    out = pruned_quant_config(q, {1: (1, 2, 5, 6)}, dropped_layers=[3])
    assert out["modules_to_not_convert"] == [
        "lm_head",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.experts.2.down_proj",
        "re:.*experts\\.7\\..*",
    ]
    assert out["dynamic"] == {
        "-:model.layers.1.mlp.experts.3.up_proj": {},
        "+:.*attn.*": {"bits": 8},
    }


# ---- loading and profiling quantized checkpoints (dequantized on the CPU) ---------------------


@pytest.mark.parametrize(("family", "fmt", "opts"), LOADABLE)
def test_load_pruned_quantized_equals_its_export(family, fmt, opts, quantized, tmp_path) -> None:
    """Invariant 2 on quantized sources: the in-process pruned model (premoe's dequantization)
    holds exactly the weights of the export loaded by transformers (transformers'
    dequantization). Weights, not logits: transformers' compressed-tensors integration keeps
    forward hooks on the model it loads that change the float rounding (5e-5 on these logits)."""
    folder = quantized(family, fmt, **opts)
    src = resolve_model(folder)
    keep = _keep(src)
    export_pruned(src, keep, tmp_path / "pruned")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    loaded = load_pruned(src, keep, dtype=torch.float32)
    want, got = exported.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name
    src.close()


@pytest.mark.parametrize(("family", "fmt"), BYTES_ONLY)
def test_load_pruned_gptq_awq_close_to_dense(family, fmt, quantized, tiny_checkpoint) -> None:
    """GPTQ/AWQ (transformers needs gptqmodel for them): premoe's dequantized pruned model stays
    within int4 rounding of the dense original pruned the same way."""
    src = resolve_model(quantized(family, fmt))
    keep = _keep(src)
    dense = load_pruned(tiny_checkpoint(family), keep, dtype=torch.float32)
    q = load_pruned(src, keep, dtype=torch.float32)
    ids = token_ids(dense.config)
    with torch.no_grad():
        a, b = dense(ids, use_cache=False).logits, q(ids, use_cache=False).logits
    assert ((a - b).norm() / a.norm()).item() < 0.2
    src.close()


def test_sequential_profile_of_fp8_equals_normal(quantized, tmp_path) -> None:
    """`--sequential` dequantizes one layer at a time and gives the normal profile's store."""
    folder = quantized("deepseek_v3", "fp8_block", mtp=True)
    _add_tokenizer(folder)
    tasks = {"t": write_texts(tmp_path / "t.jsonl", random_texts(9, 3, alphabet="abc 123"))}
    opts = {"metrics": ["tcess", "reap"], "batch_size": 4, "device": "cpu", "max_length": 32}
    normal = profile(folder, tasks, out=tmp_path / "normal", **opts)
    seq = profile(folder, tasks, out=tmp_path / "seq", sequential=True, **opts)
    assert_same_store(normal, seq)


@pytest.mark.parametrize(("family", "fmt"), [("deepseek_v3", "fp8_block"), ("qwen3_moe", "gptq")])
def test_resident_size_counts_dequantized_bytes(family, fmt, quantized, tiny_checkpoint) -> None:
    """`plan --budget` / `serve --budget` count what will be resident: dense bytes in the load
    dtype (as for the dense source), not the quantized bytes on disk, and no MTP layer."""
    src = resolve_model(quantized(family, fmt, mtp=family == "deepseek_v3"))
    dense = resolve_model(tiny_checkpoint(family))
    keep = _keep(src)
    _, info = load_pruned_with_info(src, keep, dtype=torch.bfloat16)
    got = size_model(src, torch.bfloat16).resident(4)
    assert got == size_model(dense, torch.bfloat16).resident(4)
    assert got == pytest.approx(info.param_bytes, rel=0.01)  # (routers some families keep fp32)
    src.close()


# ---- quantize at export (issue: quantized experts as a memory lever) --------------------------


@pytest.mark.parametrize(("family", "scheme", "opts"), [
    ("qwen3_moe", "fp8", ["--block", "8"]),
    ("deepseek_v3", "int4", ["--group-size", "8"]),
    ("mixtral", "int4", ["--group-size", "16"]),
])  # fmt: skip
def test_cli_export_quantize(family, scheme, opts, tiny_dir, tmp_path, capsys) -> None:
    """`premoe export --quantize`: the export loads with plain transformers, only routed experts
    are quantized, and its logits stay close to the unquantized pruned export."""
    folder = tiny_dir(family)
    args = ["export", str(folder), "--policy", "random", "--keep", "4", "--json"]
    code, _, err = run_cli([*args, "-o", str(tmp_path / "plain")], capsys)
    assert code == 0, err
    code, text, err = run_cli(
        [*args, "-o", str(tmp_path / "q"), "--quantize", scheme, *opts], capsys
    )
    assert code == 0, err
    assert json.loads(text)["quantized"]["scheme"] == scheme
    src = resolve_model(tmp_path / "q")
    assert src.keymap.format.name == {"fp8": "fp8_block", "int4": "ct_int4_pack"}[scheme]
    quantized_keys = [k for k in src.reader.keys() if k.endswith(("_scale_inv", "_packed"))]
    assert quantized_keys and all(".experts." in k for k in quantized_keys)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = token_ids(plain.config)
    with torch.no_grad():
        a, b = plain(ids, use_cache=False).logits, q(ids, use_cache=False).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < (0.05 if scheme == "fp8" else 0.2), rel
    src.close()


def test_cli_export_quantize_refusals(quantized, tiny_dir, tmp_path, capsys) -> None:
    cases = [
        (quantized("qwen3_moe", "fp8_block"), ["--quantize", "int4"], "already fp8_block"),
        (tiny_dir("qwen3_moe"), ["--quantize", "int3"], "unknown quantization scheme"),
        (tiny_dir("qwen3_moe"), ["--quantize", "int4", "--group-size", "12"], "group size 12"),
        (tiny_dir("qwen3_moe"), ["--quantize", "fp8"], "block 128x128 does not divide"),
        (tiny_dir("gpt_oss"), ["--quantize", "fp8"], "fused on disk"),
    ]
    for i, (folder, opts, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, _, err = run_cli(
            ["export", str(folder), "--policy", "random", "--keep", "4", "-o", str(out), *opts],
            capsys,
        )
        assert_one_line_error(code, err, needle)
        assert not out.exists()


@pytest.mark.parametrize(
    ("scheme", "opts"), [("fp8", {"block": (8, 8)}), ("int4", {"group_size": 8})]
)
def test_load_pruned_keeps_experts_quantized(scheme, opts, tiny_checkpoint) -> None:
    """`load_pruned(quantize=...)`: experts resident quantized (their bytes counted as such), the
    logits close to the dense pruned model's (on the CPU the slots are dequantized on the fly)."""
    from premoe.load.loader import ExpertQuantization

    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    keep = _keep(src)
    dense, dinfo = load_pruned_with_info(src, keep, dtype=torch.float32)
    q, qinfo = load_pruned_with_info(
        src, keep, dtype=torch.float32, quantize=ExpertQuantization(scheme, **opts)
    )
    assert qinfo.quantized == scheme and qinfo.expert_bytes < dinfo.expert_bytes / 2
    assert qinfo.param_bytes < dinfo.param_bytes
    ids = token_ids(dense.config)
    with torch.no_grad():
        a, b = dense(ids, use_cache=False).logits, q(ids, use_cache=False).logits
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < (0.05 if scheme == "fp8" else 0.2), rel
    src.close()


@pytest.mark.parametrize("scheme", ["fp8", "int4"])
def test_resident_quantized_swaps_equal_a_fresh_load(scheme, tiny_checkpoint) -> None:
    """Invariant 3 with quantized slots: after swaps (through the host cache and from disk) the
    resident model equals a fresh quantized load of the current pattern; swaps write in place."""
    from premoe.load import HostExpertCache, ResidentModel
    from premoe.load.loader import ExpertQuantization

    q = ExpertQuantization(scheme, block=(8, 8), group_size=8)
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    first, second = (
        _keep(src),
        KeepSets.from_mapping(
            {n: [[0, 3, 6, 7], [1, 2, 5, 6]][i % 2] for i, n in enumerate(src.moe_layers)}
        ),
    )
    for cache in (None, HostExpertCache("1MiB")):
        res = ResidentModel(src, first, dtype=torch.float32, quantize=q, host_cache=cache)
        storage = {layer: qe.storage.data_ptr() for layer, qe in res._quant.items()}
        res.swap_to(second)
        res.swap_to(first)
        res.swap_to(second)
        assert {layer: qe.storage.data_ptr() for layer, qe in res._quant.items()} == storage
        fresh = load_pruned(src, second, dtype=torch.float32, quantize=q)
        ids = token_ids(fresh.config)
        with torch.no_grad():
            a, b = res.model(ids, use_cache=False).logits, fresh(ids, use_cache=False).logits
        assert torch.equal(a, b)
    src.close()


def test_cli_generate_with_quantized_experts(capsys) -> None:
    """`premoe generate --quantize`: the bundled demo model answers with int4/fp8 experts
    resident, holding fewer bytes than with bf16 experts."""
    from premoe.demo import MODEL_DIR
    from premoe.demo.tasks import generate as task_rows

    store = Path(__file__).resolve().parents[2] / "patterns" / "demo"
    prompt = task_rows("add", 1, 7, "eval")[0]["prompt"]
    base = ["generate", str(MODEL_DIR), "--store", str(store), prompt, "--keep", "16", "--json"]
    results = {}
    for name, opts in {
        "dense": [],
        "fp8": ["--quantize", "fp8", "--block", "32"],
        "int4": ["--quantize", "int4", "--group-size", "32"],
    }.items():
        code, text, err = run_cli([*base, *opts, "--max-new-tokens", "6"], capsys)
        assert code == 0, err
        results[name] = json.loads(text)
    assert results["fp8"]["resident_bytes"] < results["dense"]["resident_bytes"]
    assert results["int4"]["resident_bytes"] < results["fp8"]["resident_bytes"]
    assert results["fp8"]["text"] == results["dense"]["text"]
