"""CheckpointReader on real safetensors checkpoints written by transformers and by ShardedWriter."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from premoe.errors import CheckpointError
from premoe.io import CheckpointReader, ShardedWriter
from tests.helpers import hf_qwen3_moe

ROW_BYTES = 256 * 256 * 4  # one row of the fused [64, 256, 256] fp32 tensor


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, read eagerly with safetensors itself."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Qwen3-MoE saved by transformers, once sharded (20 KB) and once whole."""
    model = hf_qwen3_moe()
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    model.save_pretrained(root / "single")
    return {"hf_sharded": root / "sharded", "hf_single": root / "single"}


@pytest.fixture(scope="module")
def writer_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mixed-dtype checkpoints written by ShardedWriter, sharded (4 KiB) and whole."""
    gen = torch.Generator().manual_seed(1)
    tensors = {
        f"model.layers.{i}.w{j}": torch.randn(8 + i, 16, generator=gen).to(dtype)
        for i in range(4)
        for j, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16])
    }
    tensors["model.step"] = torch.arange(5, dtype=torch.int64)
    tensors["model.scale"] = torch.tensor(0.5)
    root = tmp_path_factory.mktemp("writer")
    for name, limit in [("sharded", 4096), ("single", 2**30)]:
        with ShardedWriter(root / name, max_shard_bytes=limit) as w:
            for key, t in tensors.items():
                w.add(key, t)
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    assert (root / "single" / "model.safetensors").is_file()
    return {"writer_sharded": root / "sharded", "writer_single": root / "single"}


@pytest.fixture(params=["hf_sharded", "hf_single", "writer_sharded", "writer_single"])
def checkpoint(
    request: pytest.FixtureRequest, hf_folders: dict[str, Path], writer_folders: dict[str, Path]
) -> Path:
    return {**hf_folders, **writer_folders}[request.param]


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A 16 MiB fused expert tensor [64, 256, 256] fp32 next to a small one."""
    folder = tmp_path_factory.mktemp("fused")
    t = torch.randn(64, 256, 256, generator=torch.Generator().manual_seed(2))
    save_file(
        {"experts.down_proj": t, "router.weight": torch.ones(64, 8)}, folder / "model.safetensors"
    )
    return folder, t


def test_reader_returns_what_safetensors_loads(checkpoint: Path) -> None:
    expected = load_all(checkpoint)
    with CheckpointReader(checkpoint) as reader:
        assert reader.keys() == sorted(expected)
        assert len(reader) == len(expected)
        total = 0
        for key, want in expected.items():
            assert key in reader
            assert reader.shape(key) == tuple(want.shape)
            assert reader.dtype(key) == want.dtype
            assert reader.nbytes(key) == want.nbytes
            assert reader.bytes_read == total, "header queries must not read data"
            got = reader.get(key)
            total += want.nbytes
            assert got.dtype == want.dtype
            assert torch.equal(got, want), key
        assert reader.bytes_read == total
        assert "no.such.key" not in reader


def test_sharded_layout_matches_index(hf_folders: dict[str, Path]) -> None:
    folder = hf_folders["hf_sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with CheckpointReader(folder) as reader:
        by_shard = reader.keys_by_shard()
        assert len(by_shard) > 1
        assert list(by_shard) == sorted(by_shard)
        assert sorted(k for keys in by_shard.values() for k in keys) == reader.keys()
        for shard, keys in by_shard.items():
            assert keys == sorted(keys)
            for key in keys:
                assert reader.shard_of(key) == shard
                assert index["weight_map"][key] == shard.name
        sizes = reader.shard_sizes()
        assert list(sizes) == list(by_shard)
        assert sizes == {p: p.stat().st_size for p in by_shard}


def test_index_is_lazy_opens_only_needed_shards(hf_folders: dict[str, Path]) -> None:
    folder = hf_folders["hf_sharded"]
    with CheckpointReader(folder) as reader:
        assert reader._handles == {}
        key = "model.embed_tokens.weight"
        reader.get(key)
        assert list(reader._handles) == [reader.shard_of(key)]


def test_folder_without_index_is_scanned(tmp_path: Path, hf_folders: dict[str, Path]) -> None:
    folder = tmp_path / "noindex"
    shutil.copytree(hf_folders["hf_sharded"], folder)
    (folder / "model.safetensors.index.json").unlink()
    expected = load_all(folder)
    with CheckpointReader(folder) as reader:
        assert reader.keys() == sorted(expected)
        assert len(reader.keys_by_shard()) == len(list(folder.glob("*.safetensors")))
        for key, want in expected.items():
            assert torch.equal(reader.get(key), want)


def test_get_rows_reads_only_the_rows(fused: tuple[Path, torch.Tensor]) -> None:
    folder, t = fused
    with CheckpointReader(folder) as reader:
        assert reader.nbytes("experts.down_proj") == 64 * ROW_BYTES
        got = reader.get_rows("experts.down_proj", [5, 3, 40, 41])
        assert torch.equal(got, t[[5, 3, 40, 41]])
        assert got.is_contiguous()
        assert reader.bytes_read == 4 * ROW_BYTES
        assert reader.bytes_read < reader.nbytes("experts.down_proj") // 10


@pytest.mark.parametrize(
    "rows",
    [[7], [0, 1, 2, 3], [63, 0], [9, 8, 7], [4, 4, 2], []],
    ids=["one", "run", "ends", "descending", "repeat", "empty"],
)
def test_get_rows_any_order(fused: tuple[Path, torch.Tensor], rows: list[int]) -> None:
    folder, t = fused
    with CheckpointReader(folder) as reader:
        got = reader.get_rows("experts.down_proj", rows)
        assert torch.equal(got, t[rows])
        assert reader.bytes_read == len(set(rows)) * ROW_BYTES


def test_get_rows_last_dim(fused: tuple[Path, torch.Tensor]) -> None:
    folder, t = fused
    rows = [200, 3, 4, 100]
    with CheckpointReader(folder) as reader:
        got = reader.get_rows("experts.down_proj", rows, dim=-1)
        assert torch.equal(got, t[..., rows])
        assert reader.bytes_read == 4 * 64 * 256 * 4
        got2 = reader.get_rows("experts.down_proj", rows, dim=2)
        assert torch.equal(got2, got)


def test_get_rows_blocks(tmp_path: Path) -> None:
    experts, inter, hidden = 6, 4, 5
    gate_up = torch.randn(experts * inter, hidden)  # [E*I, H]
    down = torch.randn(hidden, experts * inter)  # [H, E*I]
    save_file({"gate_up": gate_up, "down": down}, tmp_path / "model.safetensors")
    keep = [4, 1, 2]

    def expert_rows(ids: list[int]) -> list[int]:
        return [e * inter + i for e in ids for i in range(inter)]

    with CheckpointReader(tmp_path) as reader:
        got = reader.get_rows("gate_up", keep, block=inter)
        assert got.shape == (len(keep) * inter, hidden)
        assert torch.equal(got, gate_up[expert_rows(keep)])
        assert reader.bytes_read == len(keep) * inter * hidden * 4
        got = reader.get_rows("down", keep, dim=-1, block=inter)
        assert torch.equal(got, down[:, expert_rows(keep)])


def test_get_rows_rejects_bad_arguments(fused: tuple[Path, torch.Tensor]) -> None:
    folder, _ = fused
    with CheckpointReader(folder) as reader:
        with pytest.raises(ValueError, match="out of range"):
            reader.get_rows("experts.down_proj", [64])
        with pytest.raises(ValueError, match="out of range"):
            reader.get_rows("experts.down_proj", [-1])
        with pytest.raises(ValueError, match="dim 0 or the last"):
            reader.get_rows("experts.down_proj", [0], dim=1)
        with pytest.raises(ValueError, match="does not divide"):
            reader.get_rows("experts.down_proj", [0], block=3)
        with pytest.raises(CheckpointError, match="nope"):
            reader.get_rows("nope", [0])
        assert reader.bytes_read == 0


def test_threads_share_a_reader(hf_folders: dict[str, Path]) -> None:
    folder = hf_folders["hf_sharded"]
    expected = load_all(folder)
    with CheckpointReader(folder) as reader, ThreadPoolExecutor(8) as pool:
        keys = list(expected) * 4
        for key, got in zip(keys, pool.map(reader.get, keys), strict=True):
            assert torch.equal(got, expected[key]), key
        assert reader.bytes_read == 4 * sum(t.nbytes for t in expected.values())


def test_close_keeps_returned_tensors(fused: tuple[Path, torch.Tensor]) -> None:
    folder, t = fused
    reader = CheckpointReader(folder)
    row = reader.get_rows("experts.down_proj", [1])
    whole = reader.get("router.weight")
    reader.close()
    assert torch.equal(row, t[[1]])
    assert torch.equal(whole, torch.ones(64, 8))
    with pytest.raises(ValueError, match="closed"):
        reader.get("router.weight")


# ---- errors -----------------------------------------------------------------------------------


def check_message(err: pytest.ExceptionInfo[CheckpointError], *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path / "absent")
    check_message(err, "absent", "does not exist")


def test_folder_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path / "file")
    check_message(err, "is not a folder")


def test_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path)
    check_message(err, str(tmp_path), "no *.safetensors", "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path)
    check_message(err, "pytorch_model.bin", "safe_serialization")


def sharded_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_index_not_json(tmp_path: Path, hf_folders: dict[str, Path]) -> None:
    folder = sharded_copy(hf_folders["hf_sharded"], tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(folder)
    check_message(err, "model.safetensors.index.json", "re-download")


def test_index_without_weight_map(tmp_path: Path, hf_folders: dict[str, Path]) -> None:
    folder = sharded_copy(hf_folders["hf_sharded"], tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(folder)
    check_message(err, "model.safetensors.index.json", "weight_map", "re-download")


def test_index_names_missing_shard(tmp_path: Path, hf_folders: dict[str, Path]) -> None:
    folder = sharded_copy(hf_folders["hf_sharded"], tmp_path / "ckpt")
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(folder)
    check_message(err, victim.name, "missing", "re-download")


def test_unknown_key(hf_folders: dict[str, Path]) -> None:
    with CheckpointReader(hf_folders["hf_sharded"]) as reader:
        for call in (reader.get, reader.shape, reader.shard_of):
            with pytest.raises(CheckpointError) as err:
                call("model.layers.9.mlp.gate.weight")
            check_message(err, "'model.layers.9.mlp.gate.weight'", "keys()")


def test_index_points_at_wrong_shard(tmp_path: Path, hf_folders: dict[str, Path]) -> None:
    folder = sharded_copy(hf_folders["hf_sharded"], tmp_path / "ckpt")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wrong = sorted(set(index["weight_map"].values()))[-1]
    key = next(k for k, v in index["weight_map"].items() if v != wrong)
    index["weight_map"][key] = wrong
    index_path.write_text(json.dumps(index))
    with CheckpointReader(folder) as reader, pytest.raises(CheckpointError) as err:
        reader.get(key)
    check_message(err, wrong, repr(key), "re-download")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_shard(tmp_path: Path, hf_folders: dict[str, Path], damage: str) -> None:
    folder = sharded_copy(hf_folders["hf_sharded"], tmp_path / "ckpt")
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100] if damage == "truncated" else b"not a safetensors file")
    with CheckpointReader(folder) as reader:  # the index still parses; the shard is opened late
        key = reader.keys_by_shard()[victim][0]
        with pytest.raises(CheckpointError) as err:
            reader.get(key)
    check_message(err, victim.name, "corrupt", "re-download")


def test_corrupt_single_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{bad json")
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path)
    check_message(err, "model.safetensors", "corrupt")


def test_duplicate_key_without_index(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "one.safetensors")
    save_file({"a": torch.ones(2)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(tmp_path)
    check_message(err, "'a'", "one.safetensors", "two.safetensors")


def test_low_precision_dtypes(tmp_path: Path) -> None:
    tensors = {
        "e4m3": torch.randn(6, 4).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(6, 4).to(torch.float8_e5m2),
        "u8": torch.arange(24, dtype=torch.uint8).reshape(6, 4),
        "f4": torch.arange(24, dtype=torch.uint8).reshape(6, 4).view(torch.float4_e2m1fn_x2),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with CheckpointReader(tmp_path) as reader:
        for key, want in tensors.items():
            assert reader.dtype(key) == want.dtype
            assert reader.shape(key) == tuple(want.shape)
            assert reader.nbytes(key) == want.nbytes
            got = reader.get(key)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        rows = reader.get_rows("e4m3", [4, 1])
        assert torch.equal(rows.view(torch.uint8), tensors["e4m3"][[4, 1]].view(torch.uint8))
        with pytest.raises(NotImplementedError, match="F4"):
            reader.get_rows("f4", [0])
