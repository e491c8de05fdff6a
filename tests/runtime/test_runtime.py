"""premoe.runtime: the one meaning of --device and --dtype (auto rules included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from premoe.errors import UsageError
from premoe.runtime import parse_dtype, resolve_device, resolve_dtype
from premoe.source import resolve_model


def test_device_auto_and_names() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device(" AUTO ").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu:7", "meta", "nonsense", torch.device("meta")):
        with pytest.raises(UsageError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UsageError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_dtype_names() -> None:
    assert parse_dtype("auto") is None and parse_dtype(None) is None
    for name, dt in (("bf16", torch.bfloat16), ("Float16", torch.float16), ("fp32", torch.float32)):
        assert parse_dtype(name) is dt
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(UsageError, match="unknown dtype"):
        parse_dtype("int3")


def _with_config_dtype(folder: Path, dest: Path, dtype: str | None) -> Path:
    """`folder`'s checkpoint (linked) with config.json's dtype set to `dtype` (None: removed)."""
    dest.mkdir()
    for f in folder.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if dtype is not None:
        config["dtype"] = dtype
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    ("config_dtype", "want"),
    [("bfloat16", torch.bfloat16), (None, torch.float32)],  # the tiny checkpoint is fp32
)
def test_dtype_auto_follows_config_then_checkpoint(
    config_dtype: str | None, want: torch.dtype, tiny_checkpoint, tmp_path: Path
) -> None:
    """auto: the config's dtype when it names one, else the checkpoint's first float tensor."""
    folder = _with_config_dtype(tiny_checkpoint("qwen3_moe"), tmp_path / "m", config_dtype)
    src = resolve_model(folder)
    try:
        assert getattr(src.config, "dtype", None) in (config_dtype, want, None)
        assert resolve_dtype("auto", src) is want
        assert resolve_dtype(None, src) is want
        assert resolve_dtype("fp16", src) is torch.float16
    finally:
        src.close()
