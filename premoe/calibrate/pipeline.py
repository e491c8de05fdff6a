"""Quality pipeline: choose a task's keep sets, recalibrate its routers, store and export them.

`calibrate_pattern(model, store, task, keep=K)` is what ``premoe export --recalibrate`` runs:

1. the count K from the policy options (``keep``/``coverage``/``budget``, as `select_experts`);
2. the keep sets: ``select="recon"`` (default with recalibration: layer-sequential output-aware
   selection, `premoe.calibrate.select`) or the top K of a store metric (``tcess``, ``reap``...);
3. router recalibration on the task's corpus (`premoe.calibrate.recalibrate`);
4. optionally the calibrated routers are kept in the store (``save=True``), under
   ``{task}@{digest of the keep set}``, so load/serve can apply them per pattern
   (`premoe.calibrate.served.pattern_routers`; `load_calibrated` below for one keep set).

`export_calibrated` then writes the checkpoint with `export_pruned(..., router_overrides=...)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from premoe.batching import pad_token_id
from premoe.calibrate.layerwise import LayerwiseOptions, recalibrate_layerwise
from premoe.calibrate.recalibrate import (
    RecalibrateOptions,
    RecalibrateProgress,
    batches,
    cap_tokens,
    check_corpus,
    recalibrate,
    store_corpus,
)
from premoe.calibrate.routers import (
    CalibratedRouters,
    apply_routers,
    find_in_store,
    router_overrides,
    save_to_store,
)
from premoe.calibrate.select import ReconOptions, recon_select
from premoe.errors import UsageError
from premoe.export import export_pruned
from premoe.fingerprint import fingerprint_source
from premoe.load import load_pruned
from premoe.load.loader import as_source
from premoe.plan import SizeModel, check_store_layers, open_store, store_scores
from premoe.policy import Selection, select_experts
from premoe.runtime import pretrained_causal_lm, resolve_device, resolve_dtype
from premoe.source import load_tokenizer

log = logging.getLogger(__name__)

SELECTIONS: tuple[str, ...] = ("recon", "tcess", "frequency", "paper-logits", "reap")
DEFAULT_SELECTION = "recon"


@dataclass
class CalibratedPattern:
    """A task's keep sets and (unless recalibration was off) its calibrated routers."""

    task: str
    selection: Selection
    routers: CalibratedRouters | None
    stored_as: str | None
    seconds: dict[str, float]


def _corpus_for(store: Any, tasks: Sequence[str], tokenizer: Any, corpus: Any) -> list[list[int]]:
    """Token ids of the tasks' corpora: `corpus` (token lists, a path, or {task: path}), else
    the sources recorded in the store."""
    if corpus is not None and not isinstance(corpus, str | Path | dict):
        rows = [list(r) for r in corpus]
        check_corpus(rows)
        return rows
    out: list[list[int]] = []
    for t in tasks:
        given = corpus.get(t) if isinstance(corpus, dict) else corpus
        out += store_corpus(store, t, tokenizer, corpus=given)
    check_corpus(out)
    return out


def calibrate_pattern(
    model: str | Path | Any,
    store: Any,
    tasks: str | Sequence[str],
    *,
    keep: int | None = None,
    coverage: float | None = None,
    budget: int | str | None = None,
    select: str = DEFAULT_SELECTION,
    recalibrate_routers: bool = True,
    options: RecalibrateOptions | None = None,
    recon: ReconOptions | None = None,
    corpus: Any = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    save: bool = False,
    progress: Callable[[RecalibrateProgress], None] | None = None,
    sequential: bool = False,
) -> CalibratedPattern:
    """Keep sets (and calibrated routers) for `tasks` of a store (module doc).

    `sequential`: for models that do not fit `device`: the routers are fitted layer by layer with
    one decoder layer on the device at a time (`recalibrate_layerwise` streaming the checkpoint;
    each MoE block's output matched, `options.steps` / `options.lr` per layer); the keep sets
    then come from a store metric (``recon`` needs the whole model).

    `corpus`: the calibration corpus, as token-id lists, a task source path, or {task: path};
    default: each task's corpus as recorded in the store. `save`: keep the routers in `store`
    and write it back to its folder (one task only).
    """

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise UsageError("recalibration needs a --task")
    if select not in SELECTIONS:
        raise UsageError(f"unknown selection {select!r}; choose from {', '.join(SELECTIONS)}")
    if sequential and select == "recon":
        raise UsageError(
            "sequential recalibration selects by a store metric (recon needs the whole model "
            "on one device): choose --select tcess (or reap, paper-logits, frequency)"
        )
    opts = (options or RecalibrateOptions()).check()
    src, owned = as_source(model)
    try:
        st = open_store(store, fingerprint_source(src))
        check_store_layers(st, src)
        if save and len(names) != 1:
            raise UsageError("calibrated routers are stored per task: give one --task to save")
        tokenizer = load_tokenizer(src.path)
        rows = _corpus_for(st, names, tokenizer, corpus)  # fails early on a missing corpus
        metric = select if select != "recon" else st.default_metric
        scores = store_scores(st, names, metric)
        sizes = SizeModel.from_source(src)
        base = select_experts(
            scores,
            src.moe_layers,
            num_experts=src.num_experts,
            routed=src.top_k,
            keep=keep,
            coverage=coverage,
            budget=budget,
            bytes_for=sizes.resident,
            groups=src.arch.groups(src.config),
        )
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, src)
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        teacher = None
        selection = base
        if select == "recon" or (recalibrate_routers and not sequential):
            teacher = pretrained_causal_lm(src.path, dtype=dt, device_map={"": str(dev)}).eval()
        if select == "recon":
            assert teacher is not None
            pad = pad_token_id(tokenizer, src.config)
            r = recon or ReconOptions()
            data = batches(cap_tokens(rows, r.max_tokens), r.batch_size, pad)
            selection = recon_select(teacher, src.arch, src.moe_layers, data, base.count, options=r)
            selection.provenance["count_from"] = base.provenance["count_from"]
            times["select"] = time.perf_counter() - t0
        routers = None
        stored = None
        if recalibrate_routers:
            t1 = time.perf_counter()
            if sequential:  # one decoder layer on the device at a time, from the checkpoint
                lw = LayerwiseOptions(steps=opts.steps, lr=opts.lr, seed=opts.seed)
                pad = pad_token_id(tokenizer, src.config)
                data = batches(cap_tokens(rows, lw.max_tokens), opts.batch_size, pad)
                routers = recalibrate_layerwise(
                    src, src.arch, selection.keep, data, options=lw, device=dev, dtype=dt
                )
            else:
                routers = recalibrate(
                    src,
                    selection.keep,
                    rows,
                    options=opts,
                    device=dev,
                    dtype=dt,
                    teacher=teacher,
                    progress=progress,
                )
            times["recalibrate"] = time.perf_counter() - t1
            if save:
                stored = save_to_store(st, names[0], routers)
                if st.path is not None:
                    st.save(st.path, overwrite=True)
        del teacher
        return CalibratedPattern("+".join(names), selection, routers, stored, times)
    finally:
        if owned:
            src.close()


def export_calibrated(
    model: str | Path | Any,
    pattern: CalibratedPattern,
    out: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
    **export_kwargs: Any,
) -> Any:
    """`export_pruned` of a calibrated pattern: its keep sets, its routers as overrides."""

    src, owned = as_source(model)
    try:
        overrides = None if pattern.routers is None else router_overrides(src, pattern.routers)
        prov = {
            **(provenance or {}),
            "selection": pattern.selection.provenance,
            "recalibration": None
            if pattern.routers is None
            else {
                **pattern.routers.info,
                "stored_as": pattern.stored_as,
                "router_tensors": sorted(overrides or {}),
            },
        }
        return export_pruned(
            src,
            pattern.selection,
            out,
            provenance=prov,
            router_overrides=overrides,
            **export_kwargs,
        )
    finally:
        if owned:
            src.close()


def load_calibrated(
    model: str | Path | Any,
    store: Any,
    task: str,
    keep: Any,
    *,
    top_k: int | None = None,
    **load_kwargs: Any,
) -> Any:
    """`load_pruned(model, keep)` with the task's stored calibrated routers for this keep set
    applied (the plain pruned model when the store has none for it)."""

    src, owned = as_source(model)
    try:
        net = load_pruned(src, keep, top_k=top_k, **load_kwargs)
        routers = find_in_store(open_store(store), task, keep, top_k)
        if routers is not None:
            apply_routers(net, src.arch, routers)
        return net
    finally:
        if owned:
            src.close()


__all__ = [
    "DEFAULT_SELECTION",
    "SELECTIONS",
    "CalibratedPattern",
    "calibrate_pattern",
    "export_calibrated",
    "load_calibrated",
]
