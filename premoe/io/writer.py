"""Write a Hugging Face-style sharded safetensors checkpoint, atomically.

`ShardedWriter` buffers tensors and writes a shard whenever the next tensor would push the buffer
past `max_shard_bytes`, so memory stays near one shard. Everything, shards and any extra files
written into `writer.path`, goes into a temporary sibling folder that is renamed to the output
only when the `with` block succeeds (see `premoe.io.atomic`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save_file

from premoe.io.atomic import atomic_output_dir, default_mode
from premoe.io.reader import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

LOG = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Shard size limit, as `save_pretrained`'s default `max_shard_size="5GB"` (in GiB here)."""

_RESERVED_METADATA = frozenset({"format", "total_size", "total_parameters"})


def shard_name(index: int, count: int) -> str:
    """Hugging Face shard file name: `model.safetensors` alone, else `model-00001-of-00003...`."""
    if count == 1:
        return SAFE_WEIGHTS_NAME
    return f"model-{index:05d}-of-{count:05d}.safetensors"


class ShardedWriter:
    """Context manager that writes tensors into a new safetensors checkpoint folder.

    ```python
    with ShardedWriter(out_dir, metadata={"premoe_version": __version__}) as w:
        w.add("model.layers.0.mlp.gate.weight", tensor)
        (w.path / "config.json").write_text(config_json)
    ```

    Shards get the Hugging Face names (`model.safetensors`, or `model-0000i-of-0000N.safetensors`
    plus `model.safetensors.index.json`) and carry `{"format": "pt", **metadata}` in their
    headers. The writer keeps a reference to each added tensor until its shard is written, so
    do not modify a tensor after adding it. After a successful exit `total_bytes`,
    `total_parameters`, `shard_files` and `weight_map` describe what was written.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        meta = dict(metadata or {})
        not_str = [k for k, v in meta.items() if not (isinstance(k, str) and isinstance(v, str))]
        if not_str:
            raise TypeError(f"safetensors metadata keys and values must be str: {not_str}")
        reserved = sorted(_RESERVED_METADATA & meta.keys())
        if reserved:
            raise ValueError(f"metadata keys {reserved} are reserved by the writer")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = meta
        self.overwrite = overwrite
        self.total_bytes = 0
        self.total_parameters = 0
        self.shard_files: list[Path] = []
        self.weight_map: dict[str, str] = {}
        self._state = "new"  # new -> open -> closed | failed
        self._output: AbstractContextManager[Path] | None = None
        self._tmp: Path | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[str] = []

    @property
    def path(self) -> Path:
        """The folder to write into: the temporary folder while open, `out_dir` once closed."""
        if self._state == "closed":
            return self.out_dir
        if self._tmp is None or self._state != "open":
            raise RuntimeError("ShardedWriter.path is only available inside its `with` block")
        return self._tmp

    def __enter__(self) -> ShardedWriter:
        if self._state != "new":
            raise RuntimeError("a ShardedWriter can only be entered once; make a new one")
        output = atomic_output_dir(self.out_dir, overwrite=self.overwrite)
        self._tmp = output.__enter__()
        self._output = output
        self._state = "open"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        output = self._output
        if output is None or self._state != "open":
            return
        if exc is not None:
            self._fail()
            output.__exit__(exc_type, exc, tb)
            return
        try:
            self._finish()
        except BaseException as err:
            self._fail()
            output.__exit__(type(err), err, err.__traceback__)
            raise
        try:
            output.__exit__(None, None, None)
        except BaseException:
            self._fail()
            raise
        self._state = "closed"
        self.shard_files = [self.out_dir / name for name in self._final_names()]
        LOG.info(
            "wrote %s: %d tensors, %d bytes in %d shard(s)",
            self.out_dir,
            len(self.weight_map),
            self.total_bytes,
            len(self.shard_files),
        )

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue `tensor` under `key`; writes the buffered shard first if `tensor` won't fit."""
        if self._state != "open":
            raise RuntimeError("ShardedWriter.add must be called inside its `with` block")
        if key in self.weight_map or key in self._buffer:
            raise ValueError(f"tensor {key!r} was already added to {self.out_dir}")
        t = tensor.detach() if tensor.requires_grad else tensor
        if t.device.type != "cpu":
            t = t.to("cpu")
        if not t.is_contiguous() or t.untyped_storage().nbytes() > t.nbytes:
            # a view into a bigger tensor: copy it so the buffer holds only this shard's bytes
            t = t.clone(memory_format=torch.contiguous_format)
        size = t.nbytes
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = t
        self._buffer_bytes += size
        self.total_bytes += size
        self.total_parameters += t.numel()

    def _flush(self) -> None:
        """Write the buffered tensors as the next shard and drop them."""
        assert self._tmp is not None
        part = f"model-{len(self._parts) + 1:05d}.premoe-partial"
        path = self._tmp / part
        save_file(self._buffer, str(path), metadata={"format": "pt", **self.metadata})
        os.chmod(path, default_mode(is_dir=False))
        for key in self._buffer:
            self.weight_map[key] = part
        LOG.debug(
            "wrote shard %d: %d tensors, %d bytes",
            len(self._parts) + 1,
            len(self._buffer),
            self._buffer_bytes,
        )
        self._parts.append(part)
        self._buffer = {}
        self._buffer_bytes = 0

    def _final_names(self) -> list[str]:
        return [shard_name(i + 1, len(self._parts)) for i in range(len(self._parts))]

    def _finish(self) -> None:
        """Write the last shard, give shards their final names, write the index if sharded."""
        assert self._tmp is not None
        if self._buffer or not self._parts:
            self._flush()
        final = dict(zip(self._parts, self._final_names(), strict=True))
        for part, name in final.items():
            target = self._tmp / name
            if target.exists():
                raise FileExistsError(f"{target} was written by hand; it clashes with a shard")
            os.rename(self._tmp / part, target)
        self.weight_map = {key: final[part] for key, part in sorted(self.weight_map.items())}
        if len(self._parts) > 1:
            index = {
                "metadata": {
                    "total_size": self.total_bytes,
                    "total_parameters": self.total_parameters,
                    **self.metadata,
                },
                "weight_map": self.weight_map,
            }
            text = json.dumps(index, indent=2, sort_keys=False) + "\n"
            (self._tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(text, encoding="utf-8")

    def _fail(self) -> None:
        self._state = "failed"
        self._buffer = {}
        self._buffer_bytes = 0
