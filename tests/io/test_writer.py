"""ShardedWriter and the atomic output helpers, on real files."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from premoe.errors import OutputExistsError, UnsafeOutputError
from premoe.io import (
    CheckpointReader,
    ShardedWriter,
    atomic_output_dir,
    atomic_write_bytes,
    atomic_write_text,
)
from tests.helpers import hf_qwen3_moe

INDEX = "model.safetensors.index.json"


class Boom(Exception):
    pass


def vec(n: int, value: float = 0.0) -> torch.Tensor:
    """A float32 vector of `n` values, `4 * n` bytes."""
    return torch.full((n,), float(value), dtype=torch.float32)


def header_bytes(path: Path) -> int:
    """Size of a safetensors file's header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def load_by_index(folder: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint the way transformers does: follow the index's weight_map."""
    index = json.loads((folder / INDEX).read_text())
    shards = {name: load_file(folder / name) for name in set(index["weight_map"].values())}
    return {key: shards[name][key] for key, name in index["weight_map"].items()}


def test_shards_split_at_byte_limit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    tensors = {f"t{i}": vec(100, i) for i in range(5)}  # 400 bytes each
    with ShardedWriter(out, max_shard_bytes=1000) as w:
        for key, t in tensors.items():
            w.add(key, t)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, INDEX])
    assert w.shard_files == [out / n for n in names]
    assert w.total_bytes == 2000
    assert [sorted(load_file(out / n)) for n in names] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    for name in names:
        assert (out / name).stat().st_size - header_bytes(out / name) <= 1000

    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == 2000
    assert index["weight_map"] == {
        "t0": names[0],
        "t1": names[0],
        "t2": names[1],
        "t3": names[1],
        "t4": names[2],
    }
    loaded = load_by_index(out)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ShardedWriter(out, max_shard_bytes=1000) as w:
        w.add("small0", vec(50))
        w.add("big", vec(1000))  # 4000 bytes, over the limit
        w.add("small1", vec(50))
        w.add("small2", vec(50))
    index = json.loads((out / INDEX).read_text())
    by_file: dict[str, list[str]] = {}
    for key, name in index["weight_map"].items():
        by_file.setdefault(name, []).append(key)
    assert sorted(by_file.values()) == [["big"], ["small0"], ["small1", "small2"]]
    assert index["metadata"]["total_size"] == w.total_bytes == 4600


def test_single_shard_has_hf_name_and_no_index(tmp_path: Path) -> None:
    out = tmp_path / "out"
    gate = torch.randn(8, 32, dtype=torch.bfloat16)
    with ShardedWriter(out) as w:
        w.add("model.layers.0.mlp.gate.weight", gate)
        (w.path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert w.shard_files == [out / "model.safetensors"]
    assert w.path == out
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.0.mlp.gate.weight"], gate)


def test_metadata_in_shard_headers_and_index(tmp_path: Path) -> None:
    out = tmp_path / "out"
    meta = {"premoe_version": "0.1.0", "source": "tiny"}
    with ShardedWriter(out, max_shard_bytes=500, metadata=meta) as w:
        for i in range(3):
            w.add(f"t{i}", vec(100))
    assert len(w.shard_files) == 3
    for shard in w.shard_files:
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt", **meta}
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"] == {"total_size": 1200, "total_parameters": 300, **meta}


def test_temp_folder_is_a_hidden_sibling(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with ShardedWriter(out) as w:
        assert w.path.parent == tmp_path
        assert w.path.name.startswith(".out.premoe-tmp-")
        assert w.path.is_dir()
        assert not out.exists()
    assert out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Boom), ShardedWriter(out, max_shard_bytes=100) as w:
        for i in range(5):
            w.add(f"t{i}", vec(50))  # each flushes a shard to the temp folder
        (w.path / "config.json").write_text("{}")
        assert len(list(w.path.iterdir())) >= 5
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "premoe.json").write_text("{}")  # premoe's own output: overwrite may replace it
    with pytest.raises(Boom), ShardedWriter(out, overwrite=True) as w:
        w.add("t", vec(4))
        raise Boom
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["premoe.json"]


def test_existing_output_is_refused_before_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    writer = ShardedWriter(out)
    with pytest.raises(OutputExistsError) as err:
        writer.__enter__()
    message = str(err.value)
    assert "--overwrite" in message and str(out) in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    (out / "premoe.json").write_text("{}")
    with ShardedWriter(out, overwrite=True) as w:
        w.add("t", vec(4, 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["t"], vec(4, 7.0))


def test_overwrite_source_while_reading_it(tmp_path: Path) -> None:
    """Rewriting a checkpoint onto itself works: the old files are renamed, not rewritten."""
    out = tmp_path / "ckpt"
    with ShardedWriter(out) as w:
        w.add("a", vec(8, 1.0))
        w.add("b", vec(8, 2.0))
        (w.path / "premoe.json").write_text("{}")
    with CheckpointReader(out) as reader, ShardedWriter(out, overwrite=True) as w:
        w.add("a", reader.get("a") * 10)
        w.add("b", reader.get("b"))
    loaded = load_file(out / "model.safetensors")
    assert torch.equal(loaded["a"], vec(8, 10.0)) and torch.equal(loaded["b"], vec(8, 2.0))


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="'t'"), ShardedWriter(out, max_shard_bytes=8) as w:
        w.add("t", vec(4))
        w.add("u", vec(4))  # flushes "t"
        w.add("t", vec(4))
    assert list(tmp_path.iterdir()) == []


def test_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    with ShardedWriter(out) as w:
        w.add("transposed", base.T)
        w.add("row", base[3])
        w.add("grad", torch.ones(3, requires_grad=True))
    loaded = load_file(out / "model.safetensors")
    assert torch.equal(loaded["transposed"], base.T)
    assert torch.equal(loaded["row"], base[3])
    assert torch.equal(loaded["grad"], torch.ones(3))
    assert w.total_bytes == 64 * 4 + 8 * 4 + 3 * 4


def test_flush_frees_buffered_tensors(tmp_path: Path) -> None:
    with ShardedWriter(tmp_path / "out", max_shard_bytes=1000) as w:
        t = vec(200)
        ref = weakref.ref(t)
        w.add("first", t)
        del t
        gc.collect()
        assert ref() is not None  # still buffered
        w.add("second", vec(200))  # 800 + 800 > 1000: "first" is written out
        gc.collect()
        assert ref() is None


def test_writer_output_loads_in_transformers(tmp_path: Path) -> None:
    """Copy a transformers checkpoint through reader and writer; transformers loads it back."""
    model = hf_qwen3_moe()
    model.save_pretrained(tmp_path / "src")
    with (
        CheckpointReader(tmp_path / "src") as reader,
        ShardedWriter(
            tmp_path / "dst", max_shard_bytes=20_000, metadata={"premoe_version": "test"}
        ) as w,
    ):
        for key in reader.keys():
            w.add(key, reader.get(key))
        (w.path / "config.json").write_bytes((tmp_path / "src" / "config.json").read_bytes())
    assert len(w.shard_files) > 1
    copy = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    want = model.state_dict()
    got = copy.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_writer_checks_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        ShardedWriter(tmp_path / "o", max_shard_bytes=0)
    with pytest.raises(ValueError, match="reserved"):
        ShardedWriter(tmp_path / "o", metadata={"total_size": "1"})
    with pytest.raises(TypeError, match="str"):
        ShardedWriter(tmp_path / "o", metadata={"n": 1})  # type: ignore[dict-item]
    w = ShardedWriter(tmp_path / "o")
    with pytest.raises(RuntimeError, match="with"):
        w.add("t", vec(1))
    assert list(tmp_path.iterdir()) == []


# ---- atomic helpers ---------------------------------------------------------------------------


def test_atomic_output_dir_creates_parents_and_renames(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("1")
        assert not out.exists()
    assert (out / "x").read_text() == "1"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_atomic_output_dir_never_overwrites_what_premoe_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(OutputExistsError):
        atomic_output_dir(out).__enter__()
    with pytest.raises(UnsafeOutputError, match="did not write"):
        atomic_output_dir(out, overwrite=True).__enter__()
    assert out.read_text() == "a file"
    with atomic_output_dir(out, overwrite=True, require_marker=False) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    atomic_write_text(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]

    with pytest.raises(TypeError):  # fails mid-write: the old file stays, the temp file goes
        atomic_write_bytes(path, object())  # type: ignore[arg-type]
    assert path.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_exact_fit_stays_in_one_shard(tmp_path: Path) -> None:
    with ShardedWriter(tmp_path / "out", max_shard_bytes=800) as w:
        for i in range(3):
            w.add(f"t{i}", vec(100))  # 400 + 400 == 800 fits; the third does not
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert list(index["weight_map"].values()) == [
        "model-00001-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
