"""Checkpoint I/O: lazy safetensors reads, atomic sharded writes."""

from __future__ import annotations

from premoe.io.atomic import atomic_output_dir, atomic_write_bytes, atomic_write_text
from premoe.io.reader import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SAFETENSORS_DTYPES,
    CheckpointReader,
)
from premoe.io.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, shard_name

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "SAFETENSORS_DTYPES",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "CheckpointReader",
    "ShardedWriter",
    "atomic_output_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "shard_name",
]
