"""The one size model: what a model pruned to K experts per MoE layer costs, from the
checkpoint headers alone (no tensor data read).

Shape legend: L MoE layers, E routed experts per layer, K experts kept per layer.

Sizes are linear in K:

    resident(K) = fixed + K * (expert_per_k + router_per_k)

where `fixed` is every tensor that pruning copies unchanged (embeddings, attention, norms, dense
and shared-expert layers), `expert_per_k` the bytes of one expert summed over the MoE layers and
`router_per_k` one router row (plus bias entries) summed over the MoE layers.

`SizeModel` answers for the checkpoint's own bytes (`resident`, `file_bytes`: what an export
writes, replaying its tensor order and shard split), for experts requantized to fp8/int4
(`resident_at`), and for what premoe's loader holds in a dtype (`at_dtype`: `load`, `generate`,
`serve --budget`). `plan`, `export`, `load` and `serve` all use it, so one budget gives one K.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.arch.keys import ExpertKey, RouterKey
from premoe.errors import CheckpointError, UsageError
from premoe.io import DEFAULT_MAX_SHARD_BYTES
from premoe.policy import budget_count, parse_bytes
from premoe.quant.export import quantized_bytes
from premoe.source import ModelSource


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data start offset, header dict) of a safetensors file, without opening its data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(
            f"cannot read the header of shard {path}: {err}; the file is truncated or corrupt, "
            "re-download or re-export the checkpoint"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {path} has no safetensors header")
    return 8 + n, header


def shard_metadata() -> dict[str, str]:
    """safetensors header metadata of exported shards (besides `format`)."""
    return {"premoe_version": premoe.__version__}


PRECISIONS: tuple[str, ...] = ("source", "fp8", "int4")
_FLOAT_BYTES = {"BF16": 2, "F16": 2, "F32": 4}  # safetensors codes that quantizers accept


@dataclass(frozen=True)
class Entry:
    """One tensor of the pruned checkpoint, as its header will describe it."""

    name: str
    code: str  # safetensors dtype code ("BF16")
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class ResidentSizes:
    """Resident bytes of a model pruned to K experts per MoE layer, loaded in one dtype:
    `resident(K) = base_bytes + K * per_k_bytes` (`SizeModel.at_dtype`)."""

    base_bytes: int  # every tensor pruning leaves unchanged (embeddings, attention, dense...)
    expert_bytes: int  # one expert of one MoE layer (all its tensors)
    router_row_bytes: int  # one router row (and bias entries) of one MoE layer
    moe_layers: int

    @property
    def per_k_bytes(self) -> int:
        return (self.expert_bytes + self.router_row_bytes) * self.moe_layers

    def resident(self, k: int) -> int:
        return self.base_bytes + k * self.per_k_bytes

    __call__ = resident


@dataclass
class SizeModel:
    """The one size model: bytes of a model pruned to K experts per MoE layer, from the
    checkpoint headers alone.

    `resident(K)` / `file_bytes(K)`: the checkpoint's own bytes (what `premoe export` writes and
    an engine loads, quantized formats included); `resident_at(K, precision)`: the experts
    requantized to fp8/int4 (`plan --budget` per precision); `at_dtype(dtype).resident(K)`: what
    premoe's loader holds (`load`, `generate`, `serve`): floating tensors in `dtype`, quantized
    weights at their dequantized size, MTP layers left out.
    """

    num_experts: int
    fixed_bytes: int  # tensors copied unchanged
    expert_per_k: int  # bytes of one kept expert, summed over MoE layers
    router_per_k: int  # bytes of one router row (and bias entries), summed over MoE layers
    source_bytes: int  # resident bytes of the full model (= resident(E))
    _entries: list[tuple[str, Any, str, tuple[int, ...], int]] = field(repr=False)
    # (name, role, dtype code, header shape, bytes) in export order
    _dense: dict[str, list[tuple[int, int, bool]]] = field(default_factory=dict, repr=False)
    # "fixed" / "router" / "expert" -> (numel, bytes on disk, floating) as the loader holds them
    _moe_layers: int = 0

    @classmethod
    def from_source(cls, src: ModelSource) -> SizeModel:
        km = src.keymap
        e = src.num_experts
        fixed = expert = router = 0
        entries = []
        for shard, keys in src.reader.keys_by_shard().items():
            _, header = read_header(shard)
            for key in keys:
                info = header.get(key)
                if info is None:
                    raise CheckpointError(
                        f"{shard.name} does not contain tensor {key!r} although the index says "
                        "it does; re-download or re-export the checkpoint"
                    )
                start, stop = (int(x) for x in info["data_offsets"])
                nbytes = stop - start
                role = km.role(key)
                if role is None:
                    fixed += nbytes
                elif isinstance(role, RouterKey):
                    router += nbytes
                else:
                    expert += nbytes
                entries.append((key, role, str(info["dtype"]), tuple(info["shape"]), nbytes))
        if expert % e or router % e:
            raise UsageError(
                f"expert tensors of {src.path} ({expert} bytes) do not split evenly over its "
                f"{e} experts; is config.json the one the checkpoint was saved with?"
            )
        model = cls(e, fixed, expert // e, router // e, fixed + expert + router, entries)
        model._dense = _dense_sizes(src)
        model._moe_layers = len(src.moe_layers)
        return model

    def at_dtype(
        self,
        dtype: torch.dtype,
        experts: str = "source",
        *,
        block: tuple[int, int] = (128, 128),
        group_size: int = 128,
    ) -> ResidentSizes:
        """Resident sizes when loaded in `dtype` by premoe's loader (see the class doc), with the
        routed experts dense (`experts="source"`) or kept quantized ("fp8", "int4":
        `load_pruned(quantize=...)`)."""

        def total(kind: str) -> int:
            return sum(
                n * dtype.itemsize if is_float else nbytes
                for n, nbytes, is_float in self._dense.get(kind, [])
            )

        layers = max(1, self._moe_layers)
        per_expert = (
            total("expert")
            if experts == "source"
            else self.expert_per_k_at(experts, block=block, group_size=group_size)
        )
        return ResidentSizes(
            base_bytes=total("fixed"),
            expert_bytes=per_expert // layers,
            router_row_bytes=total("router") // (layers * self.num_experts),
            moe_layers=self._moe_layers,
        )

    def expert_per_k_at(
        self, precision: str, *, block: tuple[int, int] = (128, 128), group_size: int = 128
    ) -> int:
        """Bytes of one kept expert (summed over MoE layers) stored at `precision`.

        "source" is the checkpoint as it is; "fp8" (128x128 blocks, fp32 scales) and "int4"
        (groups of `group_size`, scales in the weight's dtype) requantize every 2-D expert
        weight held in 16/32-bit floats, scales included; other expert tensors (biases, already
        quantized weights and their companions) keep their source bytes.
        """
        if precision == "source":
            return self.expert_per_k
        total = 0
        for _, role, code, shape, nbytes in self._entries:
            if not isinstance(role, ExpertKey):
                continue
            if role.expert is None:  # fused [E, ...]: one expert's slice
                per_shape, per_bytes = shape[1:], nbytes // self.num_experts
            elif role.expert == 0:  # per-expert tensors: count expert 0 (all share shapes)
                per_shape, per_bytes = shape, nbytes
            else:
                continue
            if len(per_shape) == 2 and code in _FLOAT_BYTES:
                rows, cols = per_shape
                total += quantized_bytes(
                    rows, cols, precision, block=block, group_size=group_size,
                    scale_bytes=_FLOAT_BYTES[code],
                )  # fmt: skip
            else:
                total += per_bytes
        return total

    def resident_at(
        self,
        k: int,
        precision: str,
        *,
        block: tuple[int, int] = (128, 128),
        group_size: int = 128,
    ) -> int:
        """Resident bytes with K experts kept per MoE layer, experts stored at `precision`."""
        self.check(k)
        per_k = self.expert_per_k_at(precision, block=block, group_size=group_size)
        return self.non_expert_bytes(k) + k * per_k

    def check(self, k: int) -> None:
        if not 0 <= k <= self.num_experts:
            raise UsageError(f"keep must be between 0 and {self.num_experts}, got {k}")

    def expert_bytes(self, k: int) -> int:
        """Bytes of the kept experts' weights."""
        self.check(k)
        return k * self.expert_per_k

    def non_expert_bytes(self, k: int) -> int:
        """Bytes of everything else: unchanged tensors plus the K router rows."""
        self.check(k)
        return self.fixed_bytes + k * self.router_per_k

    def resident(self, k: int) -> int:
        """Resident bytes with K experts kept in every MoE layer."""
        return self.expert_bytes(k) + self.non_expert_bytes(k)

    __call__ = resident

    def entries(self, k: int) -> Iterator[Entry]:
        """The tensors of a checkpoint pruned to K experts, in the order export writes them."""
        self.check(k)
        for name, role, code, shape, nbytes in self._entries:
            if role is None:
                yield Entry(name, code, shape, nbytes)
            elif isinstance(role, RouterKey):
                out = list(shape)
                out[role.tensor.dim] = k
                yield Entry(name, code, tuple(out), nbytes // self.num_experts * k)
            elif isinstance(role, ExpertKey) and role.expert is None:
                out = (k * shape[0] // self.num_experts, *shape[1:])
                yield Entry(name, code, out, nbytes // self.num_experts * k)
            elif role.expert < k:
                # per-expert tensors of experts 0..K-1 keep their names after renumbering
                yield Entry(name, code, shape, nbytes)

    def file_bytes(
        self,
        k: int,
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
    ) -> int:
        """Predicted total size of the exported `*.safetensors` files (headers included)."""
        meta = {"format": "pt", **(shard_metadata() if metadata is None else metadata)}
        shards: list[list[Entry]] = [[]]
        size = 0
        for entry in self.entries(k):  # the same greedy split as ShardedWriter
            if shards[-1] and size + entry.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry.nbytes
        return sum(_shard_file_bytes(entries, meta) for entries in shards)


def _dense_sizes(src: ModelSource) -> dict[str, list[tuple[int, int, bool]]]:
    """What the loader holds of each checkpoint tensor: (numel, bytes, floating) per kind;
    quantized weights counted dense (their companions not at all), MTP layers skipped."""
    km, reader = src.keymap, src.reader
    mtp = tuple(km.layer_prefix(m) + "." for m in km.mtp_layers)
    out: dict[str, list[tuple[int, int, bool]]] = {"fixed": [], "router": [], "expert": []}
    for key in reader.keys():
        role = km.role(key)
        if isinstance(role, ExpertKey) or (mtp and key.startswith(mtp)):
            continue  # experts: counted per stored weight below
        shape, dt = reader.shape(key), reader.dtype(key)
        if isinstance(role, RouterKey):
            out["router"].append((math.prod(shape), reader.nbytes(key), dt.is_floating_point))
            continue
        name, stored = km.plain_target(key)
        if name is None:
            continue  # a quantization companion
        if stored is not None:
            out["fixed"].append((math.prod(stored.dense_shape), 0, True))
        else:
            out["fixed"].append((math.prod(shape), reader.nbytes(key), dt.is_floating_point))
    for layer in src.moe_layers:
        for ti, t in enumerate(src.arch.experts):
            if km.layout == "per_expert":
                shapes = [km.stored(layer, ti, 0, p).dense_shape for p in range(len(t.per_expert))]
            else:
                shapes = [km.stored(layer, ti).dense_shape[1:]]
            out["expert"] += [(math.prod(s), 0, True) for s in shapes]
    return out


def resident_sizes(source: ModelSource, dtype: torch.dtype) -> ResidentSizes:
    """`SizeModel.from_source(source).at_dtype(dtype)`."""
    return SizeModel.from_source(source).at_dtype(dtype)


def keep_for_budget(
    source: ModelSource,
    budget: int | str,
    dtype: torch.dtype,
    *,
    top_k: int | None = None,
    quantize: Any = None,
) -> int:
    """The largest uniform kept count whose model, loaded in `dtype`, fits `budget` bytes; a
    `UsageError` if even the routed count does not fit. `quantize` (an `ExpertQuantization`:
    scheme, block, group_size) counts the experts as quantized resident slots."""
    model = SizeModel.from_source(source)
    sizes = (
        model.at_dtype(dtype)
        if quantize is None
        else model.at_dtype(
            dtype, quantize.scheme, block=quantize.block, group_size=quantize.group_size
        )
    )
    return budget_count(
        parse_bytes(budget),
        sizes.resident,
        source.num_experts,
        routed=source.top_k if top_k is None else top_k,
        groups=source.arch.groups(source.config),
    )


def _shard_file_bytes(entries: Sequence[Entry], meta: dict[str, str]) -> int:
    header = len(json.dumps({"__metadata__": meta}, separators=(",", ":"))) - 1
    offset = 0
    for e in entries:
        start, offset = offset, offset + e.nbytes
        header += (
            len(json.dumps(e.name))
            + len(e.code)
            + len(",".join(str(n) for n in e.shape))
            + len(str(start))
            + len(str(offset))
            + 44  # ,"":{"dtype":"","shape":[],"data_offsets":[,]}
        )
    header += 1  # closing brace
    return 8 + (header + 7) // 8 * 8 + offset
