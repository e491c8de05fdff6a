"""Export mechanics: streaming reads, shards, config, extra files, provenance, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from premoe.errors import CheckpointError, KeepSetError, OutputExistsError, UsageError
from premoe.export import export_from_store, export_pruned, read_expert_list
from premoe.plan import SizeModel
from premoe.prune import KeepSets, masked_routing
from premoe.source import resolve_model
from tests.export.helpers import sliced_model, token_ids
from tests.tiny import build_tiny


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A qwen3_moe checkpoint (16 experts, 3 layers) in many shards, with tokenizer-like files."""
    folder = tmp_path_factory.mktemp("sharded") / "src"
    model = build_tiny("qwen3_moe", seed=2, num_experts=16, num_hidden_layers=3)
    model.save_pretrained(folder, max_shard_size="60KB")
    (folder / "tokenizer.json").write_text('{"model": "tiny"}')
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}"}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "special_tokens_map.json").write_text("{}")
    (folder / "original").mkdir()
    (folder / "original" / "params.json").write_text("{}")
    (folder / "original" / "consolidated.00.pth").write_bytes(b"\0" * 64)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    (folder / ".hidden").write_text("x")
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_multi_shard_export_reads_only_kept_bytes(sharded, tmp_path) -> None:
    src = resolve_model(sharded)
    assert len(src.reader.shard_sizes()) >= 5
    keep = KeepSets.from_mapping({n: [0, 3, 9, 15] if n != 1 else [2, 4, 6, 8] for n in range(3)})
    before = src.reader.bytes_read
    result = export_pruned(src, keep, tmp_path / "out", max_shard_bytes=40_000)
    sizes = SizeModel.from_source(src)
    kept_bytes = sizes.resident(4)
    routers = sum(src.reader.nbytes(src.keymap.router_key(n)) for n in src.moe_layers)
    # the fingerprint reads the full router weights; everything else read is kept data
    assert src.reader.bytes_read - before == kept_bytes + routers
    assert result.bytes_read == kept_bytes == result.tensor_bytes
    assert kept_bytes < 0.5 * sizes.source_bytes
    assert result.shards >= 3
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()
    assert result.file_bytes == pytest.approx(sizes.file_bytes(4, max_shard_bytes=40_000), rel=0.01)
    # renumbered per-expert keys, same layout as the source
    first = out / f"model-00001-of-{result.shards:05d}.safetensors"
    with safe_open(str(first), "pt") as f:
        names = list(f.keys())
        assert f.metadata()["premoe_version"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index
    assert not any(".experts.4." in k for k in index)
    assert names
    full = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_ids(full.config)
    with torch.no_grad(), masked_routing(full, src.arch, keep):
        reference = full(ids, use_cache=False).logits
    with torch.no_grad():
        assert (pruned(ids, use_cache=False).logits - reference).abs().max().item() <= 1e-5
    src.close()


def test_extra_files_copied_weights_not(sharded, tmp_path) -> None:
    src = resolve_model(sharded)
    keep = KeepSets.uniform(src.moe_layers, range(4))
    result = export_pruned(src, keep, tmp_path / "out")
    out = tmp_path / "out"
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (sharded / name).read_bytes(), name
    assert (out / "original" / "params.json").is_file()
    assert not (out / "original" / "consolidated.00.pth").exists()
    assert not (out / "pytorch_model.bin").exists() and not (out / ".hidden").exists()
    assert "tokenizer.json" in result.copied
    assert listing(out) == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "original",
            "premoe.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    src.close()


def test_config_keeps_source_key_names(tmp_path, tiny_checkpoint) -> None:
    """A hub-style qwen3_moe config.json says `num_experts`; the export must too."""
    folder = tmp_path / "hub"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["num_experts"] = raw.pop("num_local_experts")
    raw["custom_field"] = {"kept": True}
    (folder / "config.json").write_text(json.dumps(raw))
    src = resolve_model(folder)
    export_pruned(src, KeepSets.uniform(src.moe_layers, [1, 2, 3]), tmp_path / "out", top_k=1)
    new = json.loads((tmp_path / "out" / "config.json").read_text())
    assert new["num_experts"] == 3 and "num_local_experts" not in new
    assert new["num_experts_per_tok"] == 1
    assert new["custom_field"] == {"kept": True}
    assert {k: v for k, v in new.items() if k not in ("num_experts", "num_experts_per_tok")} == {
        k: v for k, v in raw.items() if k not in ("num_experts", "num_experts_per_tok")
    }


def test_lower_top_k_equals_in_process(tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    src = resolve_model(folder)
    keep = KeepSets.uniform(src.moe_layers, [0, 5, 6])
    export_pruned(src, keep, tmp_path / "out", top_k=1)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert pruned.config.num_experts_per_tok == 1
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = sliced_model(full, src.arch, keep, top_k=1)
    ids = token_ids(full.config)
    with torch.no_grad():
        diff = (pruned(ids, use_cache=False).logits - ref(ids, use_cache=False).logits).abs()
    assert diff.max().item() <= 1e-5
    prov = json.loads((tmp_path / "out" / "premoe.json").read_text())
    assert prov["top_k"] == {"source": 2, "pruned": 1}


def test_group_fallback_recorded(tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint("deepseek_v3")
    src = resolve_model(folder)
    keep = KeepSets.uniform(src.moe_layers, [1, 4, 6])  # groups keep 1 and 2: not exact
    result = export_pruned(src, keep, tmp_path / "out")
    assert not result.group_plan.exact
    prov = json.loads((tmp_path / "out" / "premoe.json").read_text())
    assert prov["groups"]["exact"] is False and "unequal" in prov["groups"]["reason"]
    assert prov["groups"]["pruned"] == {"n_group": 1, "topk_group": 1}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_group"] == 1 and config["topk_group"] == 1
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = token_ids(full.config)
    with torch.no_grad(), masked_routing(full, src.arch, keep, single_group=True):
        reference = full(ids, use_cache=False).logits
    with torch.no_grad():
        assert (pruned(ids, use_cache=False).logits - reference).abs().max().item() <= 1e-5


def test_expert_list_format(tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "list"
    result = export_from_store(
        folder, None, [], out, keep=3, policy="random", seed=4, format="expert-list"
    )
    assert listing(out) == ["experts.jsonl", "premoe.json"]
    lines = [json.loads(x) for x in (out / "experts.jsonl").read_text().splitlines()]
    assert [x["layer"] for x in lines] == [0, 1]
    for line in lines:
        assert sorted(line["experts"]) == list(range(8)) and line["kept"] == 3
        assert line["scores"] is None  # random has no scores
    keep, ranking = read_expert_list(out)
    prov = json.loads((out / "premoe.json").read_text())
    assert keep.to_json() == prov["keep"]
    assert prov["kind"] == "expert-list" and prov["policy"]["seed"] == 4
    assert result.tensor_bytes == 0 and result.keep_count == 3
    assert ranking[0][:3] == prov["ranked"]["0"]


def test_random_policy_export_without_store(tiny_checkpoint, tmp_path) -> None:
    folder = tiny_checkpoint("mixtral")
    a = export_from_store(folder, None, [], tmp_path / "a", keep=3, policy="random", seed=1)
    b = export_from_store(folder, None, [], tmp_path / "b", budget=10**9, policy="random")
    assert a.keep_count == 3 and b.keep_count == 8
    prov = json.loads((tmp_path / "a" / "premoe.json").read_text())
    assert prov["policy"]["name"] == "random" and prov["policy"]["count"] == 3


# ---- refusals: one-line errors, nothing half-written ---------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"keep": 1}, UsageError, "fewer than the 2 experts routed"),
        ({"keep": 9}, UsageError, "more than the model's 8 experts"),
        ({"budget": "10KB"}, UsageError, "smaller than the model without any routed expert"),
        ({"budget": "60KB"}, UsageError, "fits fewer than the 2 experts"),
        ({"keep": 2, "top_k": 3}, UsageError, "--top-k must be between 1"),
        ({"keep": 2, "format": "gguf"}, UsageError, "unknown export format"),
        ({"keep": 2, "policy": "task"}, UsageError, "needs at least one --task"),
        ({"keep": 2, "policy": "global"}, UsageError, "needs a pattern store"),
    ],
)
def test_bad_input_refused(tiny_checkpoint, tmp_path, kwargs, error, message) -> None:
    folder = tiny_checkpoint("qwen3_moe")
    parent = tmp_path / "exports"
    parent.mkdir()
    kw = {"policy": "random", **kwargs}
    with pytest.raises(error, match=message) as info:
        export_from_store(folder, None, [], parent / "out", **kw)
    assert "\n" not in str(info.value)
    assert leftovers(parent) == []


def test_keep_sets_validated_before_writing(tiny_checkpoint, tmp_path) -> None:
    src = resolve_model(tiny_checkpoint("qwen3_moe"))
    parent = tmp_path / "exports"
    parent.mkdir()
    for keep in (
        KeepSets.uniform(src.moe_layers, [1]),  # fewer than routed
        KeepSets.uniform(src.moe_layers, [1, 8]),  # id out of range
        KeepSets.uniform([0], [1, 2]),  # misses a layer
        KeepSets.from_mapping({0: [1, 2], 1: [1, 2, 3]}),  # ragged
    ):
        with pytest.raises(KeepSetError):
            export_pruned(src, keep, parent / "out")
    assert leftovers(parent) == []


def test_output_exists_and_overwrite(tiny_checkpoint, tmp_path) -> None:
    src = resolve_model(tiny_checkpoint("olmoe"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    keep = KeepSets.uniform(src.moe_layers, [0, 1, 2])
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_pruned(src, keep, out)
    with pytest.raises(UsageError, match="premoe did not write"):  # not premoe's: never replaced
        export_pruned(src, keep, out, overwrite=True)
    assert listing(out) == ["mine.txt"]
    done = tmp_path / "done"
    export_pruned(src, keep, done)
    export_pruned(src, KeepSets.uniform(src.moe_layers, [0, 1, 3]), done, overwrite=True)
    assert "model.safetensors" in listing(done)
    assert leftovers(tmp_path) == ["done", "out"]


def test_output_inside_or_around_source_refused(tiny_checkpoint, tmp_path) -> None:
    folder = tmp_path / "models" / "src"
    shutil.copytree(tiny_checkpoint("olmoe"), folder)
    before = leftovers(folder)
    src = resolve_model(folder)
    keep = KeepSets.uniform(src.moe_layers, [0, 1, 2])
    with pytest.raises(UsageError, match="inside the source"):
        export_pruned(src, keep, folder / "pruned")
    with pytest.raises(UsageError, match="is the source"):
        export_pruned(src, keep, folder, overwrite=True)
    with pytest.raises(UsageError, match="contains the source"):
        export_pruned(src, keep, tmp_path / "models", overwrite=True)
    assert leftovers(folder) == before
    assert leftovers(tmp_path / "models") == ["src"]


def test_corrupt_source_leaves_nothing(sharded, tmp_path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(sharded, folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    last = shards[-1]
    last.write_bytes(last.read_bytes()[:200])  # truncated: header ok-ish, data gone
    parent = tmp_path / "exports"
    parent.mkdir()
    src = resolve_model(folder)
    keep = KeepSets.uniform(src.moe_layers, range(4))
    with pytest.raises(CheckpointError):
        export_pruned(src, keep, parent / "out", max_shard_bytes=40_000)
    assert leftovers(parent) == []


def test_interrupted_export_leaves_nothing(sharded, tmp_path) -> None:
    """An interruption after some shards were written leaves neither DIR nor temp folders."""
    parent = tmp_path / "exports"
    parent.mkdir()
    src = resolve_model(sharded)
    keep = KeepSets.uniform(src.moe_layers, range(8))
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if done > total // 2:
            assert any(parent.iterdir())  # the temporary folder exists mid-stream
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_pruned(src, keep, parent / "out", max_shard_bytes=20_000, progress=progress)
    assert len(seen) > 3
    assert leftovers(parent) == []


@pytest.mark.parametrize(("family", "layout"), [("qwen3_moe", "original"), ("gpt_oss", "original")])
def test_prefetch_ranges_are_the_kept_bytes(family, layout, tiny_checkpoint) -> None:
    """The read-ahead hints cover exactly the bytes export reads (per-expert and fused)."""
    from premoe.export.prefetch import kept_ranges
    from premoe.prune import pruned_tensor_names

    src = resolve_model(tiny_checkpoint(family, layout))
    keep = KeepSets.uniform(src.moe_layers, [1, 2, 6])
    wanted = set(pruned_tensor_names(src.keymap, src.reader, keep))
    total = 0
    for shard, keys in src.reader.keys_by_shard().items():
        ranges = kept_ranges(shard, [k for k in keys if k in wanted], src.keymap, keep)
        size = shard.stat().st_size
        assert all(0 < off and off + n <= size for off, n in ranges)
        total += sum(n for _, n in ranges)
    assert total == SizeModel.from_source(src).resident(3)
