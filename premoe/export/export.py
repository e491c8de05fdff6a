"""Export a pruned Hugging Face checkpoint (or an expert list) without loading the full model.

Shape legend: E experts in the source, K kept per MoE layer, H hidden size.

`export_pruned` streams the source checkpoint shard by shard through
`premoe.prune.pruned_tensor` (per-expert tensors of dropped experts are never opened; fused
`[E, ...]` tensors and router rows are read row by row) into a `ShardedWriter`, whose buffer holds
at most one output shard. The kept byte ranges of the next source shard are hinted to the kernel
(`premoe.export.prefetch`), so cold reads happen in large requests, ahead of time.

Into the same temporary folder go the rewritten `config.json` (expert count, top-k and group
fields edited in the source's own JSON, so key names stay as the source has them), every small
non-weight file of the source (tokenizer, chat template, generation_config.json...), and
`premoe.json` (provenance). The folder is renamed into place only when everything succeeded.

`export_from_store` goes from a pattern store, task(s) and a policy to `export_pruned`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.arch.keys import ExpertKey
from premoe.errors import UsageError
from premoe.export.config_json import pruned_config_json
from premoe.export.expert_list import EXPERT_LIST_NAME, expert_list_lines, format_expert_list
from premoe.export.files import PROVENANCE_NAME, copy_extra_files
from premoe.export.prefetch import ShardPrefetcher
from premoe.fingerprint import fingerprint_source
from premoe.io import DEFAULT_MAX_SHARD_BYTES, ShardedWriter, atomic_output_dir
from premoe.io.atomic import Inputs, check_output_path
from premoe.plan import check_store_layers, open_store, store_scores
from premoe.policy import Selection, select_experts
from premoe.prune import (
    GroupPlan,
    KeepSets,
    pruned_tensor,
    pruned_tensor_names,
)
from premoe.prune.engines import engine_constraints
from premoe.prune.mtp import MTP_RULE, in_layers, mtp_keep
from premoe.quant.export import ExpertQuantizer
from premoe.sizes import SizeModel, shard_metadata
from premoe.source import ModelSource, resolve_model

log = logging.getLogger(__name__)

FORMATS = ("hf", "expert-list")

Progress = Callable[[int, int], None]
"""`progress(done_bytes, total_bytes)`, called after each tensor written."""


@dataclass
class ExportResult:
    out: Path
    format: str
    keep_count: int  # experts kept per MoE layer
    num_experts: int  # experts per MoE layer in the source
    moe_layers: int
    top_k: int  # routed count of the pruned model
    tensor_bytes: int  # bytes of tensor data written (0 for an expert list)
    file_bytes: int  # size of the written *.safetensors files
    source_bytes: int  # tensor bytes of the full source checkpoint
    bytes_read: int  # tensor bytes read from the source while streaming
    shards: int
    group_plan: GroupPlan
    seconds: float
    copied: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Size of the pruned model relative to the source (resident bytes)."""
        return self.tensor_bytes / self.source_bytes if self.source_bytes else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "format": self.format,
            "experts_kept": self.keep_count,
            "experts": self.num_experts,
            "moe_layers": self.moe_layers,
            "top_k": self.top_k,
            "bytes_written": self.tensor_bytes,
            "file_bytes": self.file_bytes,
            "source_bytes": self.source_bytes,
            "fraction": self.fraction,
            "bytes_read": self.bytes_read,
            "shards": self.shards,
            "group_exact": self.group_plan.exact,
            "group_reason": self.group_plan.reason,
            "seconds": self.seconds,
            "copied": self.copied,
        }


# ---- checks --------------------------------------------------------------------------------------


def check_output(out: str | Path, source: Path, *, overwrite: bool, inputs: Inputs = ()) -> Path:
    """Refuse, before any work, an `out` that is, contains or lies inside the source folder or
    another input (a store), an existing `out` (unless `overwrite`, and then only one premoe
    wrote) and an unwritable location (`premoe.io.atomic.check_output_path`)."""
    return check_output_path(
        out, overwrite=overwrite, inputs=[("source model folder", source), *inputs]
    )


# ---- export --------------------------------------------------------------------------------------


def _provenance(
    src: ModelSource,
    fingerprint: dict[str, Any],
    keep: KeepSets,
    plan: GroupPlan,
    top_k: int | None,
    fmt: str,
    extra: dict[str, Any] | None,
    selection: Selection | None,
) -> dict[str, Any]:
    n_group, topk_group = src.arch.groups(src.config)
    core: dict[str, Any] = {
        "premoe_version": premoe.__version__,
        "kind": "pruned-checkpoint" if fmt == "hf" else "expert-list",
        "format": fmt,
        "source": {"path": str(src.path), "fingerprint": fingerprint},
        "num_experts": {"source": src.num_experts, "pruned": keep.count},
        "top_k": {"source": src.top_k, "pruned": src.top_k if top_k is None else top_k},
        "groups": {
            "source": {"n_group": n_group, "topk_group": topk_group},
            "pruned": {"n_group": plan.n_group, "topk_group": plan.topk_group},
            "exact": plan.exact,
            "reason": plan.reason,
        },
        "keep": keep.to_json(),
    }
    if selection is not None:
        core["ranked"] = {str(k): v for k, v in sorted(selection.ranked.items())}
    return {**(extra or {}), **core}


def export_pruned(
    model: str | Path | ModelSource,
    keep: KeepSets | Selection,
    out: str | Path,
    *,
    top_k: int | None = None,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
    format: str = "hf",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
    fingerprint: dict[str, Any] | None = None,
    sizes: SizeModel | None = None,
    drop_mtp: bool = False,
    quantize: ExpertQuantizer | None = None,
    router_overrides: Mapping[str, torch.Tensor] | None = None,
) -> ExportResult:
    """Write `model` pruned to `keep` (original expert ids per MoE layer) to folder `out`.

    The export keeps the source's weight format (fp8 block, MXFP4, compressed-tensors, GPTQ,
    AWQ or dense): every expert tensor moves with all its quantization companions, nothing is
    cast. MTP layers the checkpoint holds are pruned to the same count (keep sets for them from
    `keep` if given, else `premoe.prune.mtp`'s rule), or removed with `drop_mtp`.
    `quantize` (`premoe.quant.export.ExpertQuantizer("fp8" | "int4")`) quantizes the routed
    experts of a dense source on the way out (fp8 block or compressed-tensors int4); the rest
    stays as it is.

    `format="hf"`: a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained` loads
    (same architecture, E' = keep count, routed count `top_k` if given). `format="expert-list"`:
    `experts.jsonl` (per-layer ranked expert lists; see `premoe.export.expert_list`). Both write
    `premoe.json`. `keep` may be a policy `Selection` (its ranking and scores go into the expert
    list and provenance; its `top_k` is used when `top_k` is None). `provenance` adds fields
    (tasks, metric, policy...) to `premoe.json`. Atomic: on any failure `out` is left as it was.
    `fingerprint` and `sizes` (`SizeModel.from_source`) are computed from `model` when not given.
    `router_overrides` (pruned checkpoint key -> tensor, `premoe.calibrate.router_overrides`)
    replaces router tensors (calibrated routers) instead of the sliced source rows; each must
    have the shape and dtype of the tensor it replaces.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    selection = keep if isinstance(keep, Selection) else None
    if selection is not None:
        keep = selection.keep
        top_k = selection.top_k if top_k is None else top_k
    assert isinstance(keep, KeepSets)
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    start = time.perf_counter()
    try:
        out = check_output(out, src.path, overwrite=overwrite)
        if quantize is not None:
            _check_quantizable(src, quantize)
        keep, mtp_info = _with_mtp(src, keep, drop_mtp)
        plan = keep.validate(src.arch, src.config, top_k=top_k)
        if fingerprint is None:
            fingerprint = fingerprint_source(src)
        if sizes is None:
            sizes = SizeModel.from_source(src)
        prov = _provenance(src, fingerprint, keep, plan, top_k, format, provenance, selection)
        k_routed = prov["top_k"]["pruned"]
        prov["weights"] = src.keymap.summary()
        prov["mtp"] = mtp_info
        prov["engines"] = engine_constraints(src.arch, src.config, keep.count, k_routed)
        for problem in prov["engines"]["problems"]:
            log.warning("vLLM/SGLang: %s", problem)
        common = dict(
            out=out,
            format=format,
            keep_count=keep.count,
            num_experts=src.num_experts,
            moe_layers=len(keep.layers),
            top_k=k_routed,
            source_bytes=sizes.source_bytes,
            group_plan=plan,
        )
        if format == "expert-list":
            lines = expert_list_lines(
                keep,
                src.num_experts,
                order=None if selection is None else selection.order,
                layers=None if selection is None else selection.layers,
                scores=None if selection is None else selection.scores,
            )
            with atomic_output_dir(out, overwrite=overwrite) as tmp:
                (tmp / EXPERT_LIST_NAME).write_text(format_expert_list(lines), encoding="utf-8")
                _write_json(tmp / PROVENANCE_NAME, prov)
            return ExportResult(
                **common,
                tensor_bytes=0,
                file_bytes=0,
                bytes_read=0,
                shards=0,
                seconds=time.perf_counter() - start,
                provenance=prov,
            )

        config_json = pruned_config_json(src, keep, plan, top_k=top_k, drop_mtp=drop_mtp)
        exact_size = keep.is_uniform and not drop_mtp and quantize is None
        total = sizes.resident(keep.count) if exact_size else 0
        read_before = src.reader.bytes_read
        done = 0
        with ShardedWriter(
            out, max_shard_bytes=max_shard_bytes, metadata=shard_metadata(), overwrite=overwrite
        ) as writer:
            # the wanted keys, shard by shard (the order of `iter_pruned_tensors`), so the kept
            # ranges of the next source shard can be hinted to the kernel in time
            wanted = set(pruned_tensor_names(src.keymap, src.reader, keep))
            if drop_mtp:
                wanted = {k for k in wanted if not in_layers(k, src.keymap, src.keymap.mtp_layers)}
            shard_keys = {
                shard: [k for k in keys if k in wanted]
                for shard, keys in src.reader.keys_by_shard().items()
            }
            prefetch = ShardPrefetcher(shard_keys, src.keymap, keep)
            replaced: set[str] = set()
            for shard, keys in shard_keys.items():
                if keys:
                    prefetch.entering(shard)
                for key in keys:
                    name, tensor = pruned_tensor(src.keymap, src.reader, keep, key)
                    if router_overrides and name in router_overrides:
                        tensor = _override(name, tensor, router_overrides[name])
                        replaced.add(name)
                    done += tensor.nbytes
                    if quantize is None:
                        writer.add(name, tensor)
                    else:
                        role = src.keymap.role(key)
                        is_expert = isinstance(role, ExpertKey) and role.expert is not None
                        for qname, qt in quantize(name, tensor, expert_weight=is_expert).items():
                            writer.add(qname, qt)
                    if progress is not None:
                        progress(done, total)
            missing = set(router_overrides or ()) - replaced
            if missing:
                raise UsageError(
                    f"router override for {sorted(missing)[0]!r}, which the pruned checkpoint "
                    "does not have"
                )
            if quantize is not None:
                config_json["quantization_config"] = quantize.quantization_config()
                prov["quantized"] = {
                    "scheme": quantize.scheme,
                    "block": list(quantize.block) if quantize.scheme == "fp8" else None,
                    "group_size": quantize.group_size if quantize.scheme == "int4" else None,
                    "symmetric": quantize.symmetric,
                    "summary": quantize.summary(),
                }
            _write_json(writer.path / "config.json", config_json)
            copied = copy_extra_files(src.path, writer.path)
            prov["bytes"] = {"tensors": writer.total_bytes, "source": sizes.source_bytes}
            _write_json(writer.path / PROVENANCE_NAME, prov)
        if exact_size and total and writer.total_bytes != total:
            log.warning("wrote %d tensor bytes, plan predicted %d", writer.total_bytes, total)
        return ExportResult(
            **common,
            tensor_bytes=writer.total_bytes,
            file_bytes=sum(p.stat().st_size for p in writer.shard_files),
            bytes_read=src.reader.bytes_read - read_before,
            shards=len(writer.shard_files),
            seconds=time.perf_counter() - start,
            copied=copied,
            provenance=prov,
        )
    finally:
        if not isinstance(model, ModelSource):
            src.close()


def check_expert_quantization(src: ModelSource, q: ExpertQuantizer) -> None:
    """Refuse quantizing `src`'s routed experts to `q` before any work (export, or experts kept
    quantized in memory: `premoe eval --quantize`): a source already quantized, or an fp8 block
    or int4 group size that does not divide a per-expert weight (`ExpertQuantizer.check`)."""
    km = src.keymap
    if km.format.quantized:
        raise UsageError(
            f"--quantize {q.scheme}: the source is already {km.format.name}-quantized and premoe "
            "does not re-quantize quantized experts; use it as it is (without --quantize), or "
            "quantize from the bf16/fp16 checkpoint"
        )
    if km.layout != "per_expert":
        return  # fused on disk: the in-memory quantizer checks its [E, N, K] shapes itself
    layer = src.moe_layers[0]
    for ti, t in enumerate(src.arch.experts):
        for part in range(len(t.per_expert)):
            rows, cols = km.stored(layer, ti, 0, part).dense_shape
            q.check(km.expert_key(layer, t, 0, part), rows, cols)


def _check_quantizable(src: ModelSource, q: ExpertQuantizer) -> None:
    """Refuse `--quantize` before any work when it cannot apply to every expert weight."""
    if src.keymap.layout != "per_expert" and not src.keymap.format.quantized:
        raise UsageError(
            f"--quantize needs per-expert expert weights; {src.arch.name} stores its experts "
            "fused on disk, which has no quantized hub layout premoe writes"
        )
    check_expert_quantization(src, q)


def _with_mtp(src: ModelSource, keep: KeepSets, drop: bool) -> tuple[KeepSets, dict[str, Any]]:
    """`keep` completed with keep sets for the checkpoint's MTP layers (or without them when
    they are dropped), and what was done, for premoe.json."""
    layers = src.keymap.mtp_layers
    base = {k: v for k, v in keep.layers.items() if k not in layers}
    if not layers:
        return keep, {"layers": [], "action": "none"}
    if drop:
        return KeepSets(base), {"layers": layers, "action": "dropped"}
    missing = [m for m in layers if m not in keep.layers]
    if not missing:
        return keep, {"layers": layers, "action": "pruned", "rule": "given"}
    n_group, _ = src.arch.groups(src.config)
    extra = mtp_keep(src.keymap, src.reader, keep.count, n_group)
    return KeepSets({**keep.layers, **extra}), {
        "layers": layers,
        "action": "pruned",
        "rule": MTP_RULE,
        "keep": {str(k): list(v) for k, v in extra.items()},
    }


def _override(name: str, tensor: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A router override, checked against the tensor it replaces."""
    if tuple(new.shape) != tuple(tensor.shape) or new.dtype != tensor.dtype:
        raise UsageError(
            f"router override {name!r} is {tuple(new.shape)} {new.dtype}, the pruned tensor "
            f"{tuple(tensor.shape)} {tensor.dtype}"
        )
    return new.detach().cpu().contiguous()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_from_store(
    model: str | Path | ModelSource,
    store: Any,
    tasks: Sequence[str],
    out: str | Path,
    *,
    keep: int | None = None,
    coverage: float | None = None,
    budget: int | str | None = None,
    top_k: int | None = None,
    metric: str = "tcess",
    policy: str = "task",
    merge: str = "sum",
    seed: int = 0,
    overwrite: bool = False,
    format: str = "hf",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
    drop_mtp: bool = False,
    quantize: ExpertQuantizer | None = None,
) -> ExportResult:
    """Choose keep sets from a pattern store's task scores with a policy, then `export_pruned`.

    `store`: a store folder or a loaded `PatternStore` (it must be of this model). `tasks`: one
    or more task names (merged by `merge`: "sum" or "union"); may be empty for the `global` and
    `random` policies. Exactly one of `keep`, `coverage`, `budget` (bytes or "24GiB").
    The `random` policy needs no store (pass None) unless `coverage` is asked for.
    """
    src = model if isinstance(model, ModelSource) else resolve_model(model)
    try:
        store_path = store if isinstance(store, str | Path) else getattr(store, "path", None)
        check_output(out, src.path, overwrite=overwrite, inputs=[("pattern store", store_path)])
        if format not in FORMATS:
            raise UsageError(
                f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
            )
        tasks = list(tasks)
        if policy == "task" and not tasks:
            raise UsageError("the task policy needs at least one --task")
        fingerprint = fingerprint_source(src)
        scores = None
        pooled = None
        store_info: dict[str, Any] | None = None
        if store is not None:
            store = open_store(store, fingerprint)
            check_store_layers(store, src)
            scores = store_scores(store, tasks, metric) if tasks else None
            if policy == "global":
                store_scores(store, [], metric)
                pooled = store.pooled_scores(metric)
            store_info = {"path": None if store_path is None else str(store_path)}
        elif policy != "random" or tasks:
            raise UsageError(f"the {policy} policy needs a pattern store (--store)")
        sizes = SizeModel.from_source(src)
        selection = select_experts(
            scores,
            src.moe_layers,
            num_experts=src.num_experts,
            routed=src.top_k,
            keep=keep,
            coverage=coverage,
            budget=budget,
            bytes_for=sizes.resident,
            top_k=top_k,
            policy=policy,
            pooled=pooled,
            merge=merge,
            groups=src.arch.groups(src.config),
            seed=seed,
        )
        provenance = {
            "tasks": tasks,
            "metric": metric if store is not None else None,
            "store": store_info,
            "policy": selection.provenance,
        }
        return export_pruned(
            src,
            selection,
            out,
            provenance=provenance,
            overwrite=overwrite,
            format=format,
            max_shard_bytes=max_shard_bytes,
            progress=progress,
            fingerprint=fingerprint,
            sizes=sizes,
            drop_mtp=drop_mtp,
            quantize=quantize,
        )
    finally:
        if not isinstance(model, ModelSource):
            src.close()
