"""Layer-sequential profiling (`--sequential`) gives the normal mode's store on the same batches.

Real tiny models saved to disk (weights then read layer by layer from the checkpoint), real
corpora, real stores. Families: qwen3_moe (plain), deepseek_v3 (dense first layer, grouped
sigmoid router with correction bias), gpt_oss (sliding/full attention layer types: per-layer
masks) and qwen3_next (hybrid linear attention, shared expert).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from premoe.errors import UsageError
from premoe.patterns.store import PatternStore
from premoe.profile import load_task, profile
from premoe.profile.sequential import (
    ActivationStore,
    CheckpointWeights,
    flatten,
    run_profile_sequential,
    unflatten,
)
from premoe.source import resolve_model
from tests.helpers import (
    assert_one_line_error,
    assert_same_store,
    needs_cuda,
    random_texts,
    run_cli,
    tiny_model,
    tokenizer,
    write_texts,
)

METRICS = ["tcess", "frequency", "paper-logits", "reap"]


def _tasks(tmp_path: Path) -> dict[str, Path]:
    return {
        "alpha": write_texts(tmp_path / "a.jsonl", random_texts(13, 1, alphabet="abcdef +")),
        "digits": write_texts(tmp_path / "d.jsonl", random_texts(9, 2, alphabet="0123456789*")),
    }


@pytest.mark.parametrize(
    "family",
    ["qwen3_moe", "deepseek_v3", "gpt_oss", pytest.param("qwen3_next", marks=pytest.mark.slow)],
)
def test_sequential_equals_normal(family: str, tiny_dir, tmp_path: Path) -> None:
    folder = tiny_dir(family)
    tasks = _tasks(tmp_path)
    opts = {"metrics": METRICS, "batch_size": 4, "device": "cpu", "max_length": 48}
    normal = profile(folder, tasks, out=tmp_path / "normal", **opts)
    seq = profile(folder, tasks, out=tmp_path / "seq", sequential=True, **opts)
    assert_same_store(normal, seq)
    assert_same_store(PatternStore.load(tmp_path / "normal"), PatternStore.load(tmp_path / "seq"))
    # the scores are not trivially equal: the two tasks route differently
    assert not torch.allclose(seq.scores("alpha"), seq.scores("digits"), atol=1e-3)


def test_groups_of_layers_and_disk_spill_equal_normal(tiny_dir, tmp_path: Path) -> None:
    folder = tiny_dir("deepseek_v3")
    tasks = _tasks(tmp_path)
    opts = {"metrics": METRICS, "batch_size": 3, "device": "cpu", "max_length": 48}
    normal = profile(folder, tasks, **opts)
    spill = tmp_path / "spill"
    seq = profile(
        folder,
        tasks,
        sequential=True,
        sequential_layers=2,
        offload_dir=spill,
        host_budget="1KiB",  # everything goes to disk
        **opts,
    )
    assert_same_store(normal, seq)
    assert spill.is_dir() and not any(spill.iterdir())  # private files removed at the end


def test_one_layer_group_at_a_time_on_the_device(tiny_dir, tmp_path: Path) -> None:
    """With weights read from the checkpoint, at most `layers_at_once` decoder layers hold real
    tensors whenever a layer runs, and the embeddings are gone again by then."""
    folder = tiny_dir("deepseek_v3")  # 3 layers: dense, MoE, MoE
    tok = tokenizer()
    corpus = load_task("t", str(_tasks(tmp_path)["alpha"]), tok, max_length=48)
    src = resolve_model(folder)
    weights = CheckpointWeights(src, torch.device("cpu"), "auto")
    layers = weights.model.model.layers
    seen: list[tuple[int, list[int], bool]] = []

    def real(module: torch.nn.Module) -> bool:
        return all(p.device.type != "meta" for p in module.parameters())

    def pre(module, args, index):
        loaded = [i for i, layer in enumerate(layers) if real(layer)]
        seen.append((index, loaded, real(weights.model.model.embed_tokens)))

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: pre(m, a, i))
    run = run_profile_sequential(
        weights, src.arch, {"t": corpus}, tokenizer=tok, metrics=["tcess"], batch_size=4
    )
    weights.close()
    src.close()
    batches = run.stats.batches
    assert [s[0] for s in seen] == [0] * batches + [1] * batches + [2] * batches
    assert all(loaded == [index] for index, loaded, _ in seen)
    assert not any(embed for _, _, embed in seen)
    assert all(not real(layer) for layer in layers)  # everything released at the end
    assert run.stats.layer_groups == 3 and run.stats.tokens == corpus.tokens
    assert run.stats.model_bytes > 0 and run.stats.peak_device_bytes is None  # CPU


def test_loaded_model_object(tmp_path: Path) -> None:
    """An already-loaded model (host) profiles sequentially too; its weights are untouched."""
    model = tiny_model("qwen3_moe", seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = _tasks(tmp_path)
    opts = {"tokenizer": tokenizer(), "metrics": METRICS, "batch_size": 5, "device": "cpu"}
    normal = profile(model, tasks, **opts)
    seq = profile(model, tasks, sequential=True, **opts)
    assert_same_store(normal, seq)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_activation_budget_checked_before_the_model_runs(tiny_dir, tmp_path: Path) -> None:
    folder = tiny_dir("qwen3_moe")
    out = tmp_path / "store"
    with pytest.raises(UsageError, match="--offload-dir"):
        profile(folder, _tasks(tmp_path), out=out, sequential=True, host_budget="1KiB")
    assert not out.exists()
    with pytest.raises(UsageError, match="alternatives"):
        profile(folder, _tasks(tmp_path), sequential=True, device_map="auto")
    with pytest.raises(UsageError, match="--sequential-layers"):
        profile(folder, _tasks(tmp_path), sequential=True, sequential_layers=0)
    with pytest.raises(UsageError, match="--sequential only"):
        profile(folder, _tasks(tmp_path), offload_dir=tmp_path)


def test_activation_store_host_then_disk(tmp_path: Path) -> None:
    a, b = torch.randn(3, 4), torch.arange(6).view(2, 3)
    with ActivationStore(torch.device("cpu"), budget=a.numel() * 4, offload_dir=tmp_path) as st:
        st.put("x", [a])  # fits the budget: host
        st.put("y", [a * 2, b])  # does not: disk
        assert st.host_bytes == 48 and st.disk_bytes == 48 + 48
        st.put("y", [a * 3, b])  # stays on disk, rewritten
        x, (y0, y1) = st.get("x")[0], st.get("y")
        assert torch.equal(x, a) and torch.equal(y0, a * 3) and torch.equal(y1, b)
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    assert not list(tmp_path.rglob("*.safetensors"))


def test_flatten_round_trip() -> None:
    cos, sin = torch.randn(2), torch.randn(2)
    value = [(cos, sin), {"m": cos, "n": None}, False, 3]
    leaves, spec = flatten(value)
    assert len(leaves) == 3
    back = unflatten(spec, [t * 2 for t in leaves])
    assert torch.equal(back[0][0], cos * 2) and torch.equal(back[1]["m"], cos * 2)
    assert back[1]["n"] is None and back[2] is False and back[3] == 3


def test_cli_sequential(tiny_dir, tmp_path: Path, capsys) -> None:
    folder = tiny_dir("qwen3_moe")
    tasks = _tasks(tmp_path)
    args = [f"--task={n}={p}" for n, p in tasks.items()] + ["--device", "cpu"]
    code, _, err = run_cli(
        ["-q", "profile", str(folder), *args, "--out", str(tmp_path / "n")], capsys
    )
    assert code == 0, err
    code, out, err = run_cli(
        [
            "-q",
            "profile",
            str(folder),
            *args,
            "--sequential-layers",
            "2",
            "--out",
            str(tmp_path / "s"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "store" in out
    assert_same_store(PatternStore.load(tmp_path / "n"), PatternStore.load(tmp_path / "s"))
    code, _, err = run_cli(
        ["profile", str(folder), *args, "--sequential", "--device-map", "auto", "--out", "x"],
        capsys,
    )
    assert_one_line_error(code, err, "--device-map")


# ---- GPU (run with `pytest -m gpu` on a CUDA machine) --------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cuda_sequential_equals_normal_with_less_memory(family: str, tmp_path: Path) -> None:
    """On CUDA: same store as the normal mode, peak device memory well under the model's size
    (8 layers of 32 big experts; the embeddings are small)."""
    from tests.helpers import save_with_tokenizer

    big = {"num_hidden_layers": 8, "hidden_size": 256, "intermediate_size": 512}
    experts = {"moe_intermediate_size": 512}
    if family == "gpt_oss":
        experts = {"intermediate_size": 512}
    count_key = {"qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}
    overrides = {**big, **experts, count_key.get(family, "num_local_experts"): 32}
    if family == "deepseek_v3":
        overrides.update(n_group=2, topk_group=1, first_k_dense_replace=1)
    folder = save_with_tokenizer(tiny_model(family, **overrides), tmp_path / "m")
    tasks = _tasks(tmp_path)
    opts = {"metrics": METRICS, "batch_size": 4, "device": "cuda", "max_length": 48}
    torch.cuda.reset_peak_memory_stats()
    normal = profile(folder, tasks, **opts)
    normal_peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seq = profile(folder, tasks, sequential=True, **opts)
    seq_peak = torch.cuda.max_memory_allocated()
    assert_same_store(normal, seq)
    assert seq_peak < 0.5 * normal_peak, (seq_peak, normal_peak)
