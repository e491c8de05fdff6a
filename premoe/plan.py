"""`plan`: what a pruned model costs, per keep count, from the checkpoint headers alone.

Shape legend: L MoE layers, E routed experts per layer, K experts kept per layer.

The resident size of a model that keeps K experts in every MoE layer is linear in K:

    resident(K) = fixed + K * (expert_per_k + router_per_k)

where `fixed` is every tensor that pruning copies unchanged (embeddings, attention, norms, dense
and shared-expert layers), `expert_per_k` the bytes of one expert summed over the MoE layers and
`router_per_k` one router row (plus bias entries) summed over the MoE layers. Only the safetensors
headers are read (shapes and dtypes); with a pattern store, the router weights are read too, to
check that the store was made for this model.

`SizeModel.file_bytes(K)` predicts the size of the exported `*.safetensors` files, headers
included, by replaying the export's tensor order and shard split.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.arch.keys import ExpertKey, RouterKey
from premoe.errors import CheckpointError, StoreError, StoreMismatchError, UsageError
from premoe.fingerprint import fingerprint_source
from premoe.io import DEFAULT_MAX_SHARD_BYTES
from premoe.policy import (
    budget_count,
    expert_order,
    group_exact_possible,
    human_bytes,
    kept_share,
    merge_sum,
    parse_bytes,
    take,
    union_order,
)
from premoe.prune.engines import engine_constraints
from premoe.quant.export import quantized_bytes
from premoe.source import ModelSource, resolve_model

log = logging.getLogger(__name__)


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

    def at_dtype(self, dtype: torch.dtype) -> ResidentSizes:
        """Resident sizes when loaded in `dtype` by premoe's loader (see the class doc)."""

        def total(kind: str) -> int:
            return sum(
                n * dtype.itemsize if is_float else nbytes
                for n, nbytes, is_float in self._dense.get(kind, [])
            )

        layers = max(1, self._moe_layers)
        return ResidentSizes(
            base_bytes=total("fixed"),
            expert_bytes=total("expert") // layers,
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

    def resident_at(self, k: int, precision: str) -> int:
        """Resident bytes with K experts kept per MoE layer, experts stored at `precision`."""
        self.check(k)
        return self.non_expert_bytes(k) + k * self.expert_per_k_at(precision)

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
    source: ModelSource, budget: int | str, dtype: torch.dtype, *, top_k: int | None = None
) -> int:
    """The largest uniform kept count whose model, loaded in `dtype`, fits `budget` bytes; a
    `UsageError` if even the routed count does not fit."""
    sizes = resident_sizes(source, dtype)
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


# ---- the store (contract of premoe.patterns.store) -----------------------------------------------


def open_store(store: Any, fingerprint: dict[str, Any] | None = None) -> Any:
    """A `PatternStore` from a path (or as given), checked against `fingerprint` if given."""
    if isinstance(store, str | Path):
        try:
            from premoe.patterns.store import PatternStore
        except ImportError as err:  # the store module ships separately
            raise StoreError(f"pattern stores are not available in this install ({err})") from None
        store = PatternStore.load(store)
    if fingerprint is not None:
        store.check_model(fingerprint)
    return store


def store_scores(
    store: Any, tasks: Sequence[str], metric: str = "tcess"
) -> dict[str, torch.Tensor]:
    """`{task: [L, E] scores}` from a store; unknown tasks and metrics are usage errors."""
    metrics = list(store.metrics)
    if metric not in metrics:
        raise UsageError(
            f"metric {metric!r} is not in the store; it has {', '.join(metrics) or 'none'}"
        )
    names = list(store.task_names)
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise UsageError(
            f"task {unknown[0]!r} is not in the store; it has {', '.join(names) or 'no tasks'}"
        )
    if len(set(tasks)) != len(tasks):
        raise UsageError(f"task given twice in {list(tasks)}")
    return {t: store.scores(t, metric=metric) for t in tasks}


def check_store_layers(store: Any, src: ModelSource) -> None:
    if list(store.moe_layers) != list(src.moe_layers) or int(store.num_experts) != src.num_experts:
        raise StoreMismatchError(
            f"the store has layers {list(store.moe_layers)} x {store.num_experts} experts, the "
            f"model {src.moe_layers} x {src.num_experts}; profile this model to make a store"
        )


# ---- plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanRow:
    keep: int
    expert_bytes: int
    non_expert_bytes: int
    resident_bytes: int
    file_bytes: int  # predicted exported *.safetensors size
    fraction: float  # resident / full model
    group_exact: bool
    coverage_min: float | None = None
    coverage_mean: float | None = None
    engine_ok: bool = True  # vLLM/SGLang accept this K (`premoe.prune.engines`)


@dataclass(frozen=True)
class PrecisionRow:
    """At one expert precision: the largest keep count within the budget and what it keeps."""

    precision: str  # "source" | "fp8" | "int4"
    expert_per_k: int  # bytes of one kept expert, summed over MoE layers
    keep: int | None  # largest K within the budget; None when not even top-k fits
    resident_bytes: int | None
    coverage_min: float | None = None
    coverage_mean: float | None = None


@dataclass(frozen=True)
class Plan:
    model: str
    family: str
    num_experts: int
    top_k: int  # routed count of the pruned model
    moe_layers: list[int]
    full_bytes: int
    expert_per_k: int
    router_per_k: int
    fixed_bytes: int
    rows: list[PlanRow]
    budget: int | None = None
    fits: int | None = None  # largest K within the budget
    tasks: list[str] | None = None
    metric: str | None = None
    precisions: list[PrecisionRow] | None = None  # with a budget and `precisions`
    recommended: PrecisionRow | None = None
    dtype: str | None = None  # resident bytes in this load dtype (None: the checkpoint's bytes)
    engines: dict[str, Any] | None = None  # engine constraints of `fits` (with a budget)

    def row(self, keep: int) -> PlanRow:
        return next(r for r in self.rows if r.keep == keep)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["premoe_version"] = premoe.__version__
        return data


def keep_ladder(routed: int, num_experts: int, extra: Sequence[int] = ()) -> list[int]:
    """top-k, the powers of two between, E, and any `extra` counts."""
    ks = {routed, num_experts, *extra}
    p = 1
    while p < num_experts:
        if p > routed:
            ks.add(p)
        p *= 2
    return sorted(k for k in ks if routed <= k <= num_experts)


def plan(
    model: str | Path | ModelSource,
    *,
    store: Any = None,
    tasks: Sequence[str] = (),
    metric: str = "tcess",
    merge: str = "sum",
    budget: int | str | None = None,
    top_k: int | None = None,
    keeps: Sequence[int] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    precisions: Sequence[str] = (),
    dtype: torch.dtype | None = None,
) -> Plan:
    """Resident bytes per keep count (a ladder of K plus `keeps`), from checkpoint headers.

    With `store`, each row also gives the kept share of the scores (min and mean over layers)
    of `tasks` (merged by `merge`), or of all tasks pooled when no task is given. With
    `budget`, `Plan.fits` is the largest K that fits (and is added to the rows).

    With `budget` and `precisions` (a subset of `PRECISIONS`), `Plan.precisions` gives, per
    expert precision, the largest K that fits the same budget and the score coverage it keeps
    (K / E without a store), and `Plan.recommended` the choice: the highest precision whose
    mean coverage is within `RECOMMEND_SLACK` of the best (quantization error is invisible to
    coverage, so precision breaks near-ties). A budget that only a quantized precision fits is
    then no error (`fits` is None).

    `dtype`: count resident bytes as premoe's loader holds them in that dtype (`load`,
    `generate`, `serve --budget` use the same numbers, so one budget gives one K everywhere);
    None counts the checkpoint's own bytes (what an export and an engine hold). Every row says
    whether vLLM/SGLang accept its K; `engines` details the constraints of `fits`.
    """
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    try:
        sizes = SizeModel.from_source(src)
        dense = sizes.at_dtype(dtype) if dtype is not None else None
        resident_of = sizes.resident if dense is None else dense.resident

        def resident_at(k: int, precision: str) -> int:
            return resident_of(k) if precision == "source" else sizes.resident_at(k, precision)

        e, routed = src.num_experts, src.top_k
        if top_k is not None and not 1 <= top_k <= routed:
            raise UsageError(f"--top-k must be between 1 and the model's {routed}, got {top_k}")
        k_routed = routed if top_k is None else top_k
        groups = src.arch.groups(src.config)
        bad = [k for k in keeps if not k_routed <= k <= e]
        if bad:
            raise UsageError(f"keep counts {bad} are outside {k_routed}..{e} (top-k..experts)")
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise UsageError(f"unknown precision {unknown[0]!r}; use {', '.join(PRECISIONS)}")
        fits = None
        budget_bytes = None
        prec_fits: dict[str, int | None] = {}
        if budget is not None:
            budget_bytes = parse_bytes(budget)
            for prec in precisions:
                try:
                    prec_fits[prec] = budget_count(
                        budget_bytes,
                        lambda k, prec=prec: resident_at(k, prec),
                        e,
                        routed=k_routed,
                        groups=groups,
                    )
                except UsageError:
                    prec_fits[prec] = None
            if not any(prec_fits.values()) or "source" not in precisions or dense is not None:
                fits = budget_count(budget_bytes, resident_of, e, routed=k_routed, groups=groups)
            else:
                fits = prec_fits.get("source")
        cover_scores: list[torch.Tensor] = []
        order = None
        if store is not None:
            store = open_store(store, fingerprint_source(src))
            check_store_layers(store, src)
            if tasks:
                by_task = store_scores(store, tasks, metric)
                if merge == "union" and len(by_task) > 1:
                    order = union_order([expert_order(s) for s in by_task.values()])
                    cover_scores = list(by_task.values())
                else:
                    merged = merge_sum(list(by_task.values()))
                    order, cover_scores = expert_order(merged), [merged]
            else:
                store_scores(store, [], metric)  # checks the metric
                pooled = store.pooled_scores(metric)
                order, cover_scores = expert_order(pooled), [pooled]

        def coverage(k: int) -> tuple[float | None, float | None]:
            if order is None:
                return None, None
            kept = take(order, k, groups=groups, routed=k_routed)
            share = torch.stack([kept_share(s, kept) for s in cover_scores]).min(dim=0)
            return float(share.values.min()), float(share.values.mean())

        rows = []
        for k in keep_ladder(k_routed, e, [*keeps, *([fits] if fits else [])]):
            cov_min, cov_mean = coverage(k)
            resident = resident_of(k)
            experts = (
                sizes.expert_bytes(k)
                if dense is None
                else k * dense.expert_bytes * dense.moe_layers
            )
            rows.append(
                PlanRow(
                    keep=k,
                    expert_bytes=experts,
                    non_expert_bytes=resident - experts,
                    resident_bytes=resident,
                    file_bytes=sizes.file_bytes(k, max_shard_bytes=max_shard_bytes),
                    fraction=resident / resident_of(e),
                    group_exact=group_exact_possible(k, e, groups, k_routed),
                    coverage_min=cov_min,
                    coverage_mean=cov_mean,
                    engine_ok=engine_constraints(src.arch, src.config, k, k_routed)["ok"],
                )
            )
        if fits is not None:
            log.info("largest keep count within %s: %d", human_bytes(budget_bytes or 0), fits)
        prec_rows: list[PrecisionRow] | None = None
        recommended = None
        if prec_fits:
            prec_rows = []
            for prec, k in prec_fits.items():
                cov_min, cov_mean = coverage(k) if k else (None, None)
                prec_rows.append(
                    PrecisionRow(
                        precision=prec,
                        expert_per_k=dense.expert_bytes * dense.moe_layers
                        if dense is not None and prec == "source"
                        else sizes.expert_per_k_at(prec),
                        keep=k,
                        resident_bytes=resident_at(k, prec) if k else None,
                        coverage_min=cov_min,
                        coverage_mean=cov_mean,
                    )
                )
            recommended = recommend(prec_rows, e)
        return Plan(
            model=str(src.path),
            family=src.arch.name,
            num_experts=e,
            top_k=k_routed,
            moe_layers=list(src.moe_layers),
            full_bytes=resident_of(e),
            expert_per_k=sizes.expert_per_k,
            router_per_k=sizes.router_per_k,
            fixed_bytes=sizes.fixed_bytes,
            rows=rows,
            budget=budget_bytes,
            fits=fits,
            tasks=list(tasks) if store is not None else None,
            metric=metric if store is not None else None,
            precisions=prec_rows,
            recommended=recommended,
            dtype=None if dtype is None else str(dtype).removeprefix("torch."),
            engines=None if not fits else engine_constraints(src.arch, src.config, fits, k_routed),
        )
    finally:
        if not isinstance(model, ModelSource):
            src.close()


RECOMMEND_SLACK = 0.01  # mean coverage a higher precision may give up and still be recommended


def recommend(rows: Sequence[PrecisionRow], num_experts: int) -> PrecisionRow | None:
    """The highest-precision row whose mean coverage (K / E without a store) is within
    `RECOMMEND_SLACK` of the best row's; rows are given from highest to lowest precision."""
    fitting = [r for r in rows if r.keep]
    if not fitting:
        return None

    def score(r: PrecisionRow) -> float:
        return r.coverage_mean if r.coverage_mean is not None else (r.keep or 0) / num_experts

    best = max(score(r) for r in fitting)
    return next(r for r in fitting if score(r) >= best - RECOMMEND_SLACK)


__all__ = [
    "PRECISIONS",
    "RECOMMEND_SLACK",
    "Entry",
    "Plan",
    "PlanRow",
    "PrecisionRow",
    "SizeModel",
    "check_store_layers",
    "keep_ladder",
    "open_store",
    "plan",
    "read_header",
    "recommend",
    "shard_metadata",
    "store_scores",
]
