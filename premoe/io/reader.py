"""Lazy, read-only access to a Hugging Face safetensors checkpoint folder.

`CheckpointReader` maps every tensor name to its shard from `model.safetensors.index.json` (or
from the shard headers when there is no index), opens a shard with `safe_open` only when one of
its tensors is asked for, and keeps the handle open. Shapes and dtypes come from the headers.
`get_rows` reads selected rows (experts) of a fused `[E, ...]` tensor through
`get_slice(key)[a:b]`, one slice per run of consecutive rows, so the other rows are never read.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import operator
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from premoe.errors import CheckpointError

LOG = logging.getLogger(__name__)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_REDOWNLOAD = "re-download or re-export the checkpoint"


def _build_dtypes() -> dict[str, torch.dtype]:
    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2": "float8_e5m2",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "F4": "float4_e2m1fn_x2",
    }
    found = {code: getattr(torch, name, None) for code, name in names.items()}
    return {code: dtype for code, dtype in found.items() if isinstance(dtype, torch.dtype)}


SAFETENSORS_DTYPES: dict[str, torch.dtype] = _build_dtypes()
"""safetensors header dtype codes ("BF16", "F8_E4M3", ...) to torch dtypes."""

# Header codes whose torch dtype packs several values per element: the header's last dimension
# counts values, the torch tensor's last dimension counts elements.
_PACKED = {"F4": 2}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _check_readable(shard: Path) -> None:
    """A `CheckpointError` that says why `shard` cannot be opened, when the OS says so (so an
    unreadable file is not reported as a corrupt one)."""
    try:
        os.close(os.open(shard, os.O_RDONLY))
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            why = "permission denied; make it readable (chmod a+r), the file itself may be fine"
        elif err.errno == errno.ENOENT:
            why = f"the file is missing (a dangling link?); {_REDOWNLOAD}"
        else:
            why = f"{err.strerror or type(err).__name__}"
        raise CheckpointError(f"cannot read shard {shard}: {why}") from None


class CheckpointReader:
    """Read tensors from a safetensors checkpoint folder without loading all of it.

    Accepts a folder with `model.safetensors`, a sharded folder with
    `model.safetensors.index.json`, or any folder of `*.safetensors` files (scanned when there is
    no index). Safe to share between threads. Use as a context manager or call `close()`.

    `bytes_read` counts the tensor bytes that `get` and `get_rows` have returned from disk.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._handles: dict[Path, Any] = {}
        self._shard_keys: dict[Path, frozenset[str]] = {}
        self._closed = False
        self._index: Path | None = None
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise CheckpointError(
                f"checkpoint folder {self.folder} {what}; pass the folder that holds the model's "
                "config.json and *.safetensors files"
            )
        single = self.folder / SAFE_WEIGHTS_NAME
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if single.is_file():
            self._key_to_shard = self._scan([single])
        elif index.is_file():
            self._index = index
            self._key_to_shard = self._read_index(index)
        else:
            self._key_to_shard = self._scan(self._find_shards())
        self._shards = sorted(set(self._key_to_shard.values()))
        self._sorted_keys = sorted(self._key_to_shard)  # the key set never changes
        LOG.debug(
            "opened checkpoint %s: %d tensors in %d shards",
            self.folder,
            len(self._key_to_shard),
            len(self._shards),
        )

    # ---- layout -----------------------------------------------------------------------------

    def _find_shards(self) -> list[Path]:
        shards = sorted(
            p for p in self.folder.glob("*.safetensors") if p.is_file() and p.name[0] != "."
        )
        if not shards:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (
                f"it holds only PyTorch .bin weights ({bins[0]}...); convert them with "
                "save_pretrained(..., safe_serialization=True)"
                if bins
                else "point at a Hugging Face checkpoint folder (model.safetensors or "
                f"{SAFE_WEIGHTS_INDEX_NAME} with its shards)"
            )
            raise CheckpointError(f"no *.safetensors files in {self.folder}; {hint}")
        return shards

    def _scan(self, shards: list[Path]) -> dict[str, Path]:
        """Map keys to shards by opening every shard's header."""
        key_to_shard: dict[str, Path] = {}
        for shard in shards:
            for key in self._keys_in(shard):
                if key in key_to_shard:
                    raise CheckpointError(
                        f"tensor {key!r} is in both {key_to_shard[key].name} and {shard.name} in "
                        f"{self.folder}; remove the stray file or add a {SAFE_WEIGHTS_INDEX_NAME}"
                    )
                key_to_shard[key] = shard
        return key_to_shard

    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot parse {index}: {_one_line(err)}; {_REDOWNLOAD}") from err
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f'{index} has no "weight_map" object mapping tensor names to shard files; '
                f"{_REDOWNLOAD}"
            )
        key_to_shard: dict[str, Path] = {}
        shards: dict[str, Path] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name:
                raise CheckpointError(
                    f"{index} maps tensor {key!r} to {name!r}, not a file name; {_REDOWNLOAD}"
                )
            if name not in shards:
                shard = self.folder / name
                if not shard.is_file():
                    raise CheckpointError(
                        f"shard {name} listed in {index} is missing from {self.folder}; "
                        f"{_REDOWNLOAD} (all shards are needed)"
                    )
                shards[name] = shard
            key_to_shard[key] = shards[name]
        return key_to_shard

    # ---- handles ----------------------------------------------------------------------------

    def _open(self, shard: Path) -> Any:
        """Open `shard` (or reuse its handle); caller holds the lock."""
        if self._closed:
            raise ValueError(f"CheckpointReader for {self.folder} is closed")
        handle = self._handles.get(shard)
        if handle is None:
            _check_readable(shard)
            try:
                handle = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(
                    f"cannot open shard {shard}: {_one_line(err)}; the file is truncated or "
                    f"corrupt, {_REDOWNLOAD}"
                ) from err
            self._handles[shard] = handle
            self._shard_keys[shard] = frozenset(handle.keys())
        return handle

    def _keys_in(self, shard: Path) -> frozenset[str]:
        with self._lock:
            self._open(shard)
            return self._shard_keys[shard]

    def _handle_for(self, key: str) -> Any:
        shard = self.shard_of(key)
        with self._lock:
            handle = self._open(shard)
            if key not in self._shard_keys[shard]:
                raise CheckpointError(
                    f"{shard.name} does not contain tensor {key!r} although {self._index} "
                    f"says it does; {_REDOWNLOAD}"
                )
            return handle

    def _slice(self, key: str) -> Any:
        return self._handle_for(key).get_slice(key)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def close(self) -> None:
        """Close every open shard. Tensors returned earlier stay valid."""
        with self._lock:
            handles, self._handles = self._handles, {}
            self._closed = True
        for handle in handles.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointReader({str(self.folder)!r}, tensors={len(self._key_to_shard)}, "
            f"shards={len(self._shards)})"
        )

    # ---- names and headers ------------------------------------------------------------------

    def keys(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._sorted_keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_to_shard

    def __len__(self) -> int:
        return len(self._key_to_shard)

    def shard_of(self, key: str) -> Path:
        """The shard file that holds `key`."""
        try:
            return self._key_to_shard[key]
        except KeyError:
            raise CheckpointError(
                f"tensor {key!r} is not in checkpoint {self.folder}; check the name against "
                "CheckpointReader.keys() (the checkpoint may be for another architecture)"
            ) from None

    def keys_by_shard(self) -> dict[Path, list[str]]:
        """Tensor names grouped by shard, shards in file order, names sorted."""
        grouped: dict[Path, list[str]] = {shard: [] for shard in self._shards}
        for key in self.keys():
            grouped[self._key_to_shard[key]].append(key)
        return grouped

    def shard_sizes(self) -> dict[Path, int]:
        """File size in bytes of every shard, in file order."""
        return {shard: shard.stat().st_size for shard in self._shards}

    def _header(self, key: str, piece: Any = None) -> tuple[str, tuple[int, ...]]:
        """dtype code and torch shape of `key` (`piece` is its `get_slice`, if already made)."""
        if piece is None:
            piece = self._slice(key)
        code = piece.get_dtype()
        shape = tuple(int(n) for n in piece.get_shape())
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {key!r} in {self.shard_of(key).name} has dtype {code}, which this torch "
                f"{torch.__version__} cannot hold; upgrade torch or convert the checkpoint"
            )
        if code in _PACKED and shape:
            shape = (*shape[:-1], shape[-1] // _PACKED[code])
        return code, shape

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of `key` as `get(key)` returns it, from the header (no data read)."""
        return self._header(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        """torch dtype of `key`, from the header (no data read)."""
        return SAFETENSORS_DTYPES[self._header(key)[0]]

    def nbytes(self, key: str) -> int:
        """Size in bytes of the data of `key`, from the header (no data read)."""
        code, shape = self._header(key)
        return math.prod(shape) * SAFETENSORS_DTYPES[code].itemsize

    # ---- data -------------------------------------------------------------------------------

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor `key` on CPU.

        The result may share pages with a private (copy-on-write) map of the file, so writing to
        it never changes the file.
        """
        tensor = self._handle_for(key).get_tensor(key)
        self._count(tensor.nbytes)
        return tensor

    def get_rows(
        self, key: str, rows: Sequence[int], *, dim: int = 0, block: int = 1
    ) -> torch.Tensor:
        """Rows `rows` of `key` along `dim` (0 or the last dim), in the order given.

        A row is `block` consecutive entries along `dim`: for a fused `[E*I, H]` tensor,
        `get_rows(key, experts, block=I)` returns `[len(experts)*I, H]`. Only the selected rows
        are read, one slice per run of consecutive rows (in ascending order; repeated rows are
        read once). The result is a new contiguous tensor.
        """
        piece = self._slice(key)
        code, shape = self._header(key, piece)
        if code in _PACKED:
            raise NotImplementedError(
                f"get_rows cannot slice {key!r}: safetensors does not slice packed dtype {code}; "
                "use get()"
            )
        ndim = len(shape)
        if ndim == 0 or dim not in (0, -1, ndim - 1):
            raise ValueError(
                f"get_rows reads along dim 0 or the last dim, got dim={dim} for {key!r} of "
                f"shape {shape}"
            )
        axis = 0 if dim == 0 else ndim - 1
        if block < 1 or shape[axis] % block:
            raise ValueError(f"block={block} does not divide dim {axis} of {key!r} (shape {shape})")
        n_rows = shape[axis] // block
        wanted = [operator.index(r) for r in rows]
        bad = [r for r in wanted if not 0 <= r < n_rows]
        if bad:
            raise ValueError(
                f"rows {bad} out of range for {key!r}: it has {n_rows} rows of {block} along "
                f"dim {axis}"
            )
        out_shape = list(shape)
        out_shape[axis] = len(wanted) * block
        out = torch.empty(out_shape, dtype=SAFETENSORS_DTYPES[code])
        positions: dict[int, list[int]] = {}
        for pos, row in enumerate(wanted):
            positions.setdefault(row, []).append(pos)
        lead = (slice(None),) * axis
        nread = 0
        for start, stop in row_runs(sorted(positions)):
            part = piece[(*lead, slice(start * block, stop * block))]
            nread += part.nbytes
            for row in range(start, stop):
                src = part.narrow(axis, (row - start) * block, block)
                for pos in positions[row]:
                    out.narrow(axis, pos * block, block).copy_(src)
        self._count(nread)
        return out


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct `rows` as maximal `[start, stop)` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs
