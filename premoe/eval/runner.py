"""`evaluate()`: what pruning costs, per task, per scoring method, per keep count.

For every task the full model is scored on the task's eval set (`harness`), then the pruned
model for every (method, K): the experts kept in every MoE layer are

- ``tcess``, ``frequency``, ``paper-logits``, ``reap``: the top K of the task's scores under that
  metric (the metric must be in the store);
- ``global``: the top K of all the store's tasks pooled (task-agnostic);
- ``random``: a seeded random K per layer (the same for every task).

The pruned model is built in process (``via="load"``: `ResidentModel`, one per K, swapping the
kept experts in place between methods and tasks; equals the exported checkpoint by invariant 2)
or written by `export_pruned` and read back with ``from_pretrained`` (``via="export"``).

Routing accuracy (TAER): every eval query is routed with the store's key (`premoe.route`), and
counts as right when it routes to its own task.

Precisions (``quantize``): every (method, K) is also scored with the kept experts resident in
fp8 or int4 (`ExpertQuantization`, `load_pruned(quantize=...)`; on the CPU the slots are
dequantized on the fly), and every row carries the bytes of its kept experts at that precision
(`SizeModel`), so that keep counts and precisions compare at equal memory.

Shape legend: L MoE layers, E experts per layer, K experts kept per layer.

One module because `evaluate` walks one grid (task x method x keep count) whose inputs,
keep sets and rows are checked and built here; scoring is in `harness`, plots in `plots`.
(Splitting `evaluate` itself is follow-up work for issue #14.)
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import premoe
from premoe.batching import pad_token_id
from premoe.calibrate import recalibrate as recalibrate_routers
from premoe.calibrate import router_overrides, store_corpus
from premoe.calibrate.recalibrate import batches, cap_tokens, check_corpus
from premoe.calibrate.routers import source_routers, write_routers
from premoe.calibrate.select import ReconOptions, recon_select
from premoe.errors import StoreError, UsageError
from premoe.eval.harness import (
    DEFAULT_MAX_NEW_TOKENS,
    EvalSet,
    Score,
    combine,
    demo_eval_set,
    load_eval_set,
    no_load_bars,
    score_many,
    subset,
    torch_threads,
)
from premoe.export import export_pruned
from premoe.export.export import check_expert_quantization
from premoe.fingerprint import fingerprint_source
from premoe.load import ResidentModel
from premoe.load.loader import ExpertQuantization, param_bytes
from premoe.load.miss import MassAccumulator, shadow_meter
from premoe.patterns.store import GLOBAL, METRICS, PatternStore
from premoe.plan import SizeModel, keep_ladder
from premoe.policy import select_experts, select_nonuniform
from premoe.prune import KeepSets
from premoe.quant.export import ExpertQuantizer, check_scheme
from premoe.quant.resident import STORAGE_BUFFER
from premoe.route import QueryKeyer
from premoe.route.retrieve import route_key
from premoe.runtime import dtype_name, pretrained_causal_lm, resolve_device, resolve_dtype
from premoe.source import load_tokenizer, resolve_model

log = logging.getLogger(__name__)

BASELINES: tuple[str, ...] = ("global", "random")
MODEL_METHODS: tuple[str, ...] = ("recon",)  # need the model and the task corpus, not only scores
NONUNIFORM = "nonuniform"  # ragged keep sets: in process only (exports stay uniform)
METHODS: tuple[str, ...] = (*METRICS, NONUNIFORM, *MODEL_METHODS, *BASELINES, "routed")
RECAL = "+recal"  # suffix of a method's rows with recalibrated routers
VIAS: tuple[str, ...] = ("load", "export")
NONE = "none"  # the precision of rows whose experts stay in the evaluated dtype
METHOD_DESCRIPTIONS = {
    "tcess": "top K of the task's TCESS",
    "frequency": "top K of the task's routed-selection share",
    "paper-logits": "top K of the task's mean top-1 router logits (reference code)",
    "reap": "top K of the task's REAP saliency",
    NONUNIFORM: "K x layers experts of the task's default-metric scores, spread over the layers "
    "(more where a layer's scores are spread: premoe.policy.select_nonuniform); K is the mean",
    "recon": "layer-sequential greedy reconstruction of every MoE block's output on the task's "
    "corpus, lower layers already pruned (premoe.calibrate.select)",
    "global": "top K of all tasks pooled (task-agnostic)",
    "random": "random K per layer (seeded)",
    "routed": "each query routed by the store's key (TAER), then the top K of that pattern",
}


@dataclass
class EvalProgress:
    """Progress of an evaluation: `done` of `total` scored rows; `stage` says what runs."""

    stage: str
    done: int
    total: int


Progress = Callable[[EvalProgress], None]


# ---- inputs ------------------------------------------------------------------------------------


def parse_keeps(text: str | Sequence[int] | None) -> list[int] | None:
    """`"4,8,16"` -> [4, 8, 16] (sorted, unique); None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--keep expects counts like 4,8,16, got {text!r}") from None
    else:
        values = [int(v) for v in text]
    if not values:
        raise UsageError("--keep is empty; give counts like 4,8,16")
    return sorted(set(values))


def parse_methods(text: str | Sequence[str] | None) -> list[str] | None:
    """`"tcess,random"` -> ["tcess", "random"] (order kept, checked)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        for m in str(item).split(","):
            m = m.strip().lower()
            if not m:
                continue
            if m not in METHODS:
                raise UsageError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
            if m not in out:
                out.append(m)
    if not out:
        raise UsageError(f"--method is empty; choose from {', '.join(METHODS)}")
    return out


def parse_precisions(text: str | Sequence[str] | None) -> list[str]:
    """`"none,fp8,int4"` -> ["none", "fp8", "int4"] (order kept, checked); None -> ["none"]."""
    if text is None:
        return [NONE]
    items = [text] if isinstance(text, str) else [str(t) for t in text]
    out: list[str] = []
    for p in (p.strip().lower() for item in items for p in item.split(",")):
        if p and p not in out:
            out.append(p if p == NONE else check_scheme(p))
    if not out:
        raise UsageError("--quantize is empty; give none, fp8 or int4 (comma-separated)")
    return out


def expert_quantizations(
    src: Any, precisions: Sequence[str], *, block: int, group_size: int, via: str
) -> dict[str, ExpertQuantization | None]:
    """{precision: how its experts stay resident} (None: dense), checked against the source
    before any model runs: an already-quantized source, or a block or group size that does not
    divide an expert weight, is a `UsageError` (the checks of ``premoe export --quantize``)."""
    out: dict[str, ExpertQuantization | None] = {}
    for p in precisions:
        if p == NONE:
            out[p] = None
            continue
        if via != "load":
            raise UsageError(
                f"--quantize {p} keeps the experts quantized in memory; use --via load"
            )
        q = ExpertQuantizer(check_scheme(p), block=(block, block), group_size=group_size)
        check_expert_quantization(src, q)
        out[p] = ExpertQuantization(q.scheme, q.block, q.group_size)
    return out


@dataclass(frozen=True)
class EvalSource:
    """An eval set file, for one task or (``by_task``) split by the rows' ``task`` field."""

    path: str
    by_task: bool = False


def parse_eval_sets(specs: Sequence[str], tasks: Sequence[str]) -> dict[str, EvalSource]:
    """``--eval-set [TASK=]FILE`` values -> {task: EvalSource}.

    A FILE without TASK= belongs to the only task, or (several tasks) holds rows of several
    tasks told apart by their ``task`` field. Tasks not covered are absent.
    """
    out: dict[str, EvalSource] = {}
    shared: str | None = None
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name.strip() and path.strip() and not Path(spec).exists():
            name = name.strip()
            if name not in tasks:
                raise UsageError(
                    f"--eval-set {spec!r} names task {name!r}, which is not among the tasks "
                    f"evaluated ({', '.join(tasks)})"
                )
            if name in out:
                raise UsageError(f"two eval sets for task {name!r}")
            out[name] = EvalSource(path.strip())
        else:
            if shared is not None:
                raise UsageError("give at most one --eval-set FILE without a TASK= prefix")
            shared = spec
    if shared is not None:
        for t in tasks:
            if t not in out:
                out[t] = EvalSource(shared, by_task=len(tasks) > 1)
    return out


EvalSetSpec = str | Path | EvalSource | EvalSet


def build_eval_sets(
    tasks: Sequence[str],
    eval_sets: Mapping[str, EvalSetSpec] | Sequence[str] | None,
    *,
    max_samples: int | None = None,
    seed: int = 0,
    default_n: int = 100,
) -> dict[str, EvalSet]:
    """The eval set of every task: given files (`parse_eval_sets` syntax or a mapping), else the
    bundled demo task's held-out split (`default_n` rows, or `max_samples`)."""
    if eval_sets is None:
        given: Mapping[str, EvalSetSpec] = {}
    elif isinstance(eval_sets, Mapping):
        unknown = [t for t in eval_sets if t not in tasks]
        if unknown:
            raise UsageError(f"eval set given for task {unknown[0]!r}, which is not evaluated")
        given = eval_sets
    else:
        given = parse_eval_sets(list(eval_sets), tasks)
    out: dict[str, EvalSet] = {}
    for t in tasks:
        src = given.get(t)
        if isinstance(src, EvalSet):
            out[t] = src
        elif src is None:
            out[t] = demo_eval_set(t, max_samples or default_n, seed)
        else:
            spec = src if isinstance(src, EvalSource) else EvalSource(str(src))
            out[t] = load_eval_set(
                t, spec.path, max_samples=max_samples, seed=seed, filter_task=spec.by_task
            )
    return out


# ---- keep sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What keep-set selection needs to know about the model."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    groups: tuple[int, int]


def check_methods(store: PatternStore, methods: Sequence[str], tasks: Sequence[str]) -> None:
    """Metric methods need their metric in the store; task methods need the task there."""
    for m in methods:
        if m in METRICS and m not in store.metrics:
            where = f" {store.path}" if store.path else ""
            raise StoreError(
                f"method {m!r} needs the {m} metric, which store{where} lacks (it has "
                f"{', '.join(store.metrics)}); re-profile with --metric {m} or drop it from "
                "--method"
            )
    if any(m in METRICS or m == NONUNIFORM for m in methods):
        missing = [t for t in tasks if t not in store.tasks]
        if missing:
            raise StoreError(
                f"task {missing[0]!r} is not in the store (it has {', '.join(store.tasks)}); "
                "profile it first, or evaluate only the global and random methods"
            )
    for m in (*MODEL_METHODS, NONUNIFORM):
        if m in methods and store.default_metric not in store.metrics:
            raise StoreError(f"method {m!r} needs a store with task scores")
    for m in ("global", "routed"):
        if m in methods and not store.tasks:
            raise StoreError(f"the {m} method needs a store with at least one task")


def check_keeps(keeps: Sequence[int], shape: ModelShape) -> None:
    for k in keeps:
        if k < shape.top_k:
            raise UsageError(
                f"--keep {k} is fewer than the {shape.top_k} experts routed per token; keep at "
                f"least {shape.top_k}"
            )
        if k > shape.num_experts:
            raise UsageError(
                f"--keep {k} is more than the model's {shape.num_experts} experts per layer"
            )


def method_keep(
    store: PatternStore | None,
    task: str,
    method: str,
    keep: int,
    shape: ModelShape,
    *,
    seed: int = 0,
    global_metric: str | None = None,
) -> KeepSets:
    """The keep sets a method gives for `task` at `keep` experts per layer."""
    if method not in METHODS or method in MODEL_METHODS:
        raise UsageError(
            f"method {method!r} has no store-only keep set; choose from "
            f"{', '.join(m for m in METHODS if m not in MODEL_METHODS)}"
        )
    kwargs: dict[str, Any] = {
        "num_experts": shape.num_experts,
        "routed": shape.top_k,
        "keep": keep,
        "groups": shape.groups,
        "seed": seed,
    }
    if method == "random":
        sel = select_experts(None, shape.layers, policy="random", **kwargs)
    else:
        if store is None:
            raise UsageError(f"method {method!r} needs a pattern store")
        if method == "global":
            metric = global_metric or store.default_metric
            sel = select_experts(
                None, shape.layers, policy="global", pooled=store.pooled_scores(metric), **kwargs
            )
        elif method == NONUNIFORM:
            if shape.groups[0] > 1:
                raise UsageError("the nonuniform method does not support group-limited routers")
            scores = store.scores(task, store.default_metric)  # [L, E]
            total = keep * len(shape.layers)
            cap = shape.num_experts
            return select_nonuniform(scores, shape.layers, total, routed=shape.top_k, cap=cap)
        else:
            sel = select_experts(store.scores(task, method), shape.layers, policy="task", **kwargs)
    return sel.keep


def describe_method(method: str) -> str:
    if method.endswith(RECAL):
        base = method[: -len(RECAL)]
        return f"{METHOD_DESCRIPTIONS[base]}; routers recalibrated to the full model (KL)"
    return METHOD_DESCRIPTIONS[method]


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN: undefined ratios become null."""
    return x if math.isfinite(x) else None


# ---- results -----------------------------------------------------------------------------------


@dataclass
class EvalRow:
    """The pruned model's score for one (task, method, K)."""

    task: str
    method: str
    keep: int
    score: Score
    full: Score  # the full model's score on the same set
    resident_bytes: int  # parameters of the pruned model as evaluated (its dtype)
    checkpoint_bytes: int  # resident bytes at the checkpoint's own dtype (`plan.SizeModel`)
    dropped_mass: float | None = None  # mean over tokens and layers (`premoe.load.miss`)
    precision: str = NONE  # the kept experts' precision: none (dense), fp8 or int4
    expert_bytes: int = 0  # the kept experts' bytes at `precision` (checkpoint dtype otherwise)

    @property
    def retained(self) -> float:
        """accuracy: pruned / full; perplexity: full / pruned (1.0 = no loss, lower is worse)."""
        if self.score.kind == "accuracy":
            return self.score.value / self.full.value if self.full.value > 0 else float("nan")
        return self.full.value / self.score.value if self.score.value > 0 else float("nan")

    def to_json(self, *, predictions: bool = False) -> dict[str, Any]:
        return {
            "task": self.task,
            "method": self.method,
            "keep": self.keep,
            "kind": self.score.kind,
            "value": self.score.value,
            "full": self.full.value,
            "retained": finite_or_none(self.retained),
            "n": self.score.n,
            "resident_bytes": self.resident_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "dropped_mass": self.dropped_mass,
            "precision": self.precision,
            "expert_bytes": self.expert_bytes,
            **({"predictions": self.score.predictions} if predictions else {}),
        }


@dataclass
class RoutingReport:
    """Held-out routing accuracy: does each eval query route to its own task?"""

    key: dict[str, Any]
    per_task: dict[str, dict[str, Any]]  # task -> {"n", "correct", "accuracy", "routed": {t: n}}
    routes: dict[str, list[str]] = field(default_factory=dict)  # task -> pattern of each query

    @property
    def n(self) -> int:
        return sum(int(v["n"]) for v in self.per_task.values())

    @property
    def correct(self) -> int:
        return sum(int(v["correct"]) for v in self.per_task.values())

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "accuracy": finite_or_none(self.accuracy),
            "n": self.n,
            "correct": self.correct,
            "per_task": self.per_task,
        }


@dataclass
class EvalReport:
    """Everything `evaluate` measured, with provenance. JSON: `to_json()`."""

    model: str
    fingerprint: dict[str, Any]
    store: str | None
    tasks: list[str]
    methods: list[str]
    keeps: list[int]
    num_experts: int
    top_k: int
    full: dict[str, Score]
    full_bytes: int
    full_checkpoint_bytes: int
    rows: list[EvalRow]
    routing: RoutingReport | None
    eval_sets: dict[str, dict[str, Any]]
    options: dict[str, Any]
    seconds: float
    premoe_version: str = field(default_factory=lambda: premoe.__version__)
    precisions: list[str] = field(default_factory=lambda: [NONE])

    def row(self, task: str, method: str, keep: int, precision: str = NONE) -> EvalRow:
        for r in self.rows:
            if (r.task, r.method, r.keep, r.precision) == (task, method, keep, precision):
                return r
        raise KeyError((task, method, keep, precision))

    def to_json(self, *, predictions: bool = False) -> dict[str, Any]:
        return {
            "premoe_version": self.premoe_version,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "store": self.store,
            "tasks": self.tasks,
            "methods": self.methods,
            "method_descriptions": {m: describe_method(m) for m in self.methods},
            "keeps": self.keeps,
            "precisions": self.precisions,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "full": {
                t: {
                    **s.to_json(predictions=predictions),
                    "resident_bytes": self.full_bytes,
                    "checkpoint_bytes": self.full_checkpoint_bytes,
                }
                for t, s in self.full.items()
            },
            "results": [r.to_json(predictions=predictions) for r in self.rows],
            "routing": None if self.routing is None else self.routing.to_json(),
            "eval_sets": self.eval_sets,
            "options": self.options,
            "seconds": self.seconds,
        }


# ---- running -----------------------------------------------------------------------------------


def resident_bytes(model: Any) -> int:
    """Parameters plus quantized expert slots (`premoe.quant.resident` keeps them in buffers)."""
    slots = sum(b.numel() for n, b in model.named_buffers() if n.endswith(STORAGE_BUFFER))
    return param_bytes(model) + slots


def precision_label(precision: str, source_dtype: str | None) -> str:
    """How a row's expert precision reads: ``none`` -> the checkpoint's dtype (bf16), else the
    scheme (int4). `source_dtype`: the report's ``options["source_dtype"]``."""
    return precision if precision != NONE else (source_dtype or "dense")


def keep_id(keep: KeepSets) -> tuple[Any, ...]:
    """A hashable identity of a keep set."""
    return tuple(sorted((int(layer), tuple(ids)) for layer, ids in keep.layers.items()))


def routing_accuracy(
    store: PatternStore,
    model: Any,
    tokenizer: Any,
    eval_sets: Mapping[str, EvalSet],
    *,
    batch_size: int = 64,
) -> RoutingReport:
    """Route every eval query of the store's tasks with the store's key; count own-task hits.

    Uses `route_key` with its defaults (similarity threshold, pooled fallback): a query that
    falls back to the pooled pattern counts as wrong. `RoutingReport.routes` keeps every
    query's pattern (tasks not in the store are routed too, but not counted).
    """

    keyer = QueryKeyer.for_store(store, model, tokenizer, check=False)
    per_task: dict[str, dict[str, Any]] = {}
    routes: dict[str, list[str]] = {}
    for task, es in eval_sets.items():
        queries = es.queries
        got: list[str] = []
        for start in range(0, len(queries), batch_size):
            keys = keyer.keys(queries[start : start + batch_size])  # [B, D]
            got.extend(route_key(store, key).task for key in keys)
        routes[task] = got
        if task not in store.tasks:
            continue
        counts: dict[str, int] = {}
        for r in got:
            counts[r] = counts.get(r, 0) + 1
        n = len(queries)
        correct = counts.get(task, 0)
        per_task[task] = {
            "n": n,
            "correct": correct,
            "accuracy": correct / n if n else None,
            "routed": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
    return RoutingReport(dict(store.key), per_task, routes)


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.done, self.total, self.progress = 0, total, progress
        self.stage = ""

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(EvalProgress(self.stage, self.done, self.total))


@dataclass
class _Unit:
    """Rows scored together under one keep set: a task's set, or the part of it routed to one
    pattern (method ``routed``)."""

    name: str
    task: str
    evalset: EvalSet
    rows: list[int]  # indices into the task's eval set


def evaluate(
    model: str | Path,
    store: str | Path | PatternStore | None,
    tasks: Sequence[str],
    *,
    keeps: Sequence[int] | str | None = None,
    methods: Sequence[str] | str | None = None,
    eval_sets: Mapping[str, EvalSetSpec] | Sequence[str] | None = None,
    max_samples: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    via: str = "load",
    seed: int = 0,
    batch_size: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    routing: bool = True,
    global_metric: str | None = None,
    threads: int | None = None,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
    recalibrate: bool = False,
    recalibrate_options: Any = None,
    calibration: Mapping[str, Any] | None = None,
    recon_options: Any = None,
    recalibrate_methods: Sequence[str] | None = None,
    quantize: Sequence[str] | str | None = None,
    block: int = 128,
    group_size: int = 128,
) -> EvalReport:
    """Score the full model and every (method, K) pruned model on every task's eval set.

    `model`: checkpoint folder or hub id. `store`: pattern store of this model (folder or
    loaded); needed by every method but ``random``. `tasks`: task names. `keeps`: counts per
    MoE layer (default: top-k, powers of two, E). `methods`: default every metric in the store,
    then ``global`` and ``random``; ``routed`` routes every query with the store's key and
    uses the chosen pattern's scores (`global_metric`, default tcess). `eval_sets`:
    `{task: file or EvalSet}`, or ``[TASK=]FILE`` strings; a task without one uses the bundled
    demo task's held-out split. `max_samples` caps rows per task (seeded subset). `via`:
    ``load`` (in process) or ``export`` (write a checkpoint, read it back with
    from_pretrained; `workdir` holds it, default a temp folder). `threads`: torch CPU threads
    while it runs. `quantize`: precisions of the kept experts, ``"none,fp8,int4"`` (default
    none): every (method, K) is scored at each, fp8 in `block` x `block` blocks, int4 in groups
    of `group_size` (``via="load"`` only). All inputs are checked before any model runs.
    """

    # Model methods (``recon``) and ``recalibrate`` (every method but routed gains a
    # ``METHOD+recal`` row: its keep sets with routers recalibrated on the task's corpus, see
    # premoe.calibrate) need each task's corpus: `calibration` {task: source or token lists},
    # else the source the store recorded.
    with torch_threads(threads), no_load_bars():
        t0 = time.perf_counter()
        tasks = list(tasks)
        if not tasks:
            raise UsageError("give at least one --task to evaluate")
        if len(set(tasks)) != len(tasks):
            raise UsageError(f"a task is given twice in {tasks}")
        if via not in VIAS:
            raise UsageError(f"unknown --via {via!r}; choose load or export")
        precisions = parse_precisions(quantize)

        src = resolve_model(model)
        try:
            fingerprint = fingerprint_source(src)
            st: PatternStore | None = None
            if store is not None:
                st = store if isinstance(store, PatternStore) else PatternStore.load(store)
                st.check_model(fingerprint)
            shape = ModelShape(
                tuple(src.moe_layers), src.num_experts, src.top_k, src.arch.groups(src.config)
            )
            chosen = parse_methods(methods)
            if chosen is None:
                chosen = [*st.metrics, *BASELINES] if st is not None else ["random"]
            if st is None and any(m != "random" for m in chosen):
                raise UsageError("methods other than random need a pattern store (--store)")
            if NONUNIFORM in chosen and via != "load":
                raise UsageError(
                    "the nonuniform method keeps a different count per layer, which only "
                    "--via load evaluates (exports stay uniform)"
                )
            if "routed" in chosen and not routing:
                raise UsageError("the routed method needs routing; do not turn routing off")
            if st is not None:
                check_methods(st, chosen, tasks)
                if global_metric is not None and global_metric not in st.metrics:
                    raise StoreError(
                        f"metric {global_metric!r} is not in the store "
                        f"(it has {', '.join(st.metrics)})"
                    )
            gmetric = None if st is None else (global_metric or st.default_metric)
            ks = parse_keeps(keeps) or keep_ladder(shape.top_k, shape.num_experts)
            check_keeps(ks, shape)
            sets = build_eval_sets(tasks, eval_sets, max_samples=max_samples, seed=seed)
            dev = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, src)
            tokenizer = load_tokenizer(src.path)
            sizes = SizeModel.from_source(src)
            quant = expert_quantizations(
                src, precisions, block=block, group_size=group_size, via=via
            )

            def expert_bytes(k: int, precision: str) -> int:
                stored = "source" if precision == NONE else precision
                per_k = sizes.expert_per_k_at(stored, block=(block, block), group_size=group_size)
                return k * per_k

            def checkpoint_bytes(k: int, precision: str) -> int:
                if precision == NONE:
                    return sizes.resident(k)
                return sizes.resident_at(k, precision, block=(block, block), group_size=group_size)

            def keep_for(task: str, method: str, k: int) -> KeepSets:
                return method_keep(st, task, method, k, shape, seed=seed, global_metric=gmetric)

            # every fixed keep set up front: bad combinations fail before any model runs
            fixed = [m for m in chosen if m != "routed" and m not in MODEL_METHODS]
            plan = {(t, m, k): keep_for(t, m, k) for k in ks for t in tasks for m in fixed}
            model_methods = [m for m in chosen if m in MODEL_METHODS]
            corpora: dict[str, list[list[int]]] = {}
            if model_methods or recalibrate:
                corpora = _calibration_corpora(st, tasks, tokenizer, calibration)

            counter = _Counter(0, progress)

            masses: dict[str, float] = {}  # unit name -> dropped mass of its last run

            def run(net: Any, units: Sequence[_Unit], meter: Any = None) -> dict[str, Score]:
                if meter is not None:  # one unit at a time: a dropped mass per unit
                    out: dict[str, Score] = {}
                    for u in units:
                        acc = MassAccumulator(len(meter.layers), 1, meter.device, pool=True)
                        meter.target = acc
                        out.update(run(net, [u]))
                        meter.target = None
                        masses[u.name] = acc.summary(0).mean
                    return out
                got = score_many(
                    net,
                    tokenizer,
                    [u.evalset for u in units],
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    progress=counter,
                )
                return {u.name: sc for u, sc in zip(units, got, strict=True)}

            # the full model (and routing, which needs no expert but uses the full model's layers)

            whole = {t: _Unit(t, t, sets[t], list(range(len(sets[t])))) for t in tasks}
            counter.total = sum(len(s) for s in sets.values())
            counter.stage = "full model"
            full_model = pretrained_causal_lm(
                src.path, dtype=torch_dtype, device_map={"": str(dev)}
            ).eval()
            full_bytes = param_bytes(full_model)
            full = run(full_model, list(whole.values()))
            route_report = None
            if routing and st is not None and st.tasks:
                counter.stage = "routing"
                route_report = routing_accuracy(st, full_model, tokenizer, sets)
            for m in model_methods:  # recon: needs the full model and the corpus
                counter.stage = f"selecting ({m})"
                for t in tasks:
                    for k in ks:
                        plan[(t, m, k)] = _model_keep(
                            full_model, src, corpora[t], k, tokenizer, recon_options
                        )
            calibrated: dict[tuple[str, str, int], Any] = {}
            if recalibrate:
                for (t, m, k), keep in list(plan.items()):
                    if m in ("random", NONUNIFORM) or (
                        recalibrate_methods is not None and m not in recalibrate_methods
                    ):
                        continue
                    counter.stage = f"recalibrating {t} {m} K={k}"
                    calibrated[(t, m + RECAL, k)] = recalibrate_routers(
                        src,
                        keep,
                        corpora[t],
                        options=recalibrate_options,
                        device=dev,
                        dtype=torch_dtype,
                        teacher=full_model,
                    )
                    plan[(t, m + RECAL, k)] = keep
            del full_model

            # (task, method, K) -> [(unit, keep set)]
            work: dict[tuple[str, str, int], list[tuple[_Unit, KeepSets]]] = {
                key: [(whole[key[0]], keep)] for key, keep in plan.items()
            }
            # recalibrated rows: their own unit (name -> calibrated routers), never shared
            unit_routers: dict[str, Any] = {}
            for key, cal in calibrated.items():
                t, m, k = key
                unit = _Unit(f"{t}:{m}:{k}", t, sets[t], list(range(len(sets[t]))))
                unit_routers[unit.name] = cal
                work[key] = [(unit, plan[key])]

            def kid_of(unit: _Unit, keep: KeepSets) -> tuple[Any, ...]:
                return (*keep_id(keep), unit.name if unit.name in unit_routers else None)

            if "routed" in chosen:
                assert route_report is not None
                for t in tasks:
                    by_pattern: dict[str, list[int]] = {}
                    for i, r in enumerate(route_report.routes[t]):
                        by_pattern.setdefault(r, []).append(i)
                    for k in ks:
                        work[(t, "routed", k)] = [
                            (
                                _Unit(f"{t}->{r}", t, subset(sets[t], idx), idx),
                                keep_for(r, "global" if r == GLOBAL else gmetric or "tcess", k),
                            )
                            for r, idx in by_pattern.items()
                        ]
            # units sharing a keep set run together: K -> keep id -> (keep set, units)
            groups: dict[int, dict[tuple[Any, ...], tuple[KeepSets, dict[str, _Unit]]]] = {}
            for (_t, _m, k), parts in work.items():
                for unit, keep in parts:
                    slot = groups.setdefault(k, {}).setdefault(kid_of(unit, keep), (keep, {}))
                    slot[1].setdefault(unit.name, unit)
            counter.total += len(precisions) * sum(
                len(u.evalset)
                for by in groups.values()
                for _, us in by.values()
                for u in us.values()
            )

            # (unit name, K, precision, keep id) -> (score, resident bytes) / dropped mass
            results: dict[tuple[str, int, str, tuple[Any, ...]], tuple[Score, int]] = {}
            full_routers = source_routers(src) if unit_routers else {}
            mass_of: dict[tuple[str, int, str, tuple[Any, ...]], float] = {}
            with tempfile.TemporaryDirectory(prefix="premoe-eval-", dir=workdir) as tmp:
                for k, prec in ((k, p) for k in ks for p in precisions):
                    resident: Any = None
                    try:
                        for n_group, (kid, (keep, units)) in enumerate(groups[k].items()):
                            counter.stage = f"{k} experts kept ({n_group + 1}/{len(groups[k])})"
                            if prec != NONE:
                                counter.stage += f", {prec}"
                            if via == "load":
                                if resident is None or any(
                                    len(v) != resident.layer_slots[n]
                                    for n, v in keep.layers.items()
                                ):  # first, or other per-layer counts (nonuniform): a new one
                                    if resident is not None:
                                        resident.close()
                                    resident = ResidentModel(
                                        src,
                                        keep,
                                        device=dev,
                                        dtype=torch_dtype,
                                        quantize=quant[prec],
                                    )
                                    resident.model.eval()
                                else:
                                    resident.swap_to(keep)
                                net = resident.model
                                if unit_routers:  # calibrated or source rows, every layer
                                    write_routers(
                                        net,
                                        src.arch,
                                        keep,
                                        full_routers,
                                        _routers_of(units, unit_routers),
                                    )
                            else:
                                net = _export_and_load(
                                    src,
                                    keep,
                                    Path(tmp),
                                    torch_dtype,
                                    dev,
                                    _routers_of(units, unit_routers),
                                )
                            nbytes = resident_bytes(net)
                            meter = None
                            if resident is not None and via == "load":
                                meter = shadow_meter(net, src, keep.layers)
                                meter.attach()
                            try:
                                scored = run(net, list(units.values()), meter)
                            finally:
                                if meter is not None:
                                    meter.detach()
                            for name, sc in scored.items():
                                results[(name, k, prec, kid)] = (sc, nbytes)
                                if meter is not None:
                                    mass_of[(name, k, prec, kid)] = masses[name]
                            del net
                    finally:
                        if resident is not None:
                            resident.close()
            rows: list[EvalRow] = []
            shown = [*chosen, *[m + RECAL for m in chosen if (tasks[0], m + RECAL, ks[0]) in work]]
            for t, m, k, prec in (
                (t, m, k, p) for t in tasks for m in shown for k in ks for p in precisions
            ):
                parts = work[(t, m, k)]
                got = [results[(u.name, k, prec, kid_of(u, keep))] for u, keep in parts]
                if len(parts) == 1 and parts[0][0].name == t:
                    sc = got[0][0]
                else:
                    sc = combine(
                        [(g[0], u.rows) for g, (u, _) in zip(got, parts, strict=True)],
                        len(sets[t]),
                    )
                mass = [mass_of.get((u.name, k, prec, kid_of(u, keep))) for u, keep in parts]
                weights = [len(u.rows) for u, _ in parts]
                dropped = (
                    None
                    if any(x is None for x in mass)
                    else sum(float(x) * w for x, w in zip(mass, weights, strict=True))
                    / max(1, sum(weights))
                )
                rows.append(
                    EvalRow(
                        t,
                        m,
                        k,
                        sc,
                        full[t],
                        got[0][1],
                        checkpoint_bytes(k, prec),
                        dropped,
                        precision=prec,
                        expert_bytes=expert_bytes(k, prec),
                    )
                )
            return EvalReport(
                model=str(model),
                fingerprint=fingerprint,
                store=None if st is None or st.path is None else str(st.path),
                tasks=tasks,
                methods=shown,
                keeps=ks,
                num_experts=shape.num_experts,
                top_k=shape.top_k,
                full=full,
                full_bytes=full_bytes,
                full_checkpoint_bytes=sizes.resident(shape.num_experts),
                rows=rows,
                routing=route_report,
                eval_sets={
                    t: {"source": s.source, "kind": s.kind, "n": len(s)} for t, s in sets.items()
                },
                options={
                    "via": via,
                    "seed": seed,
                    "max_samples": max_samples,
                    "device": str(dev),
                    "dtype": str(torch_dtype).removeprefix("torch."),
                    "threads": threads,
                    "batch_size": batch_size,
                    "max_new_tokens": max_new_tokens,
                    "global_metric": gmetric,
                    "quantize": {"block": block, "group_size": group_size}
                    if precisions != [NONE]
                    else None,
                    "source_dtype": dtype_name(resolve_dtype("auto", src)),
                    "stop": "eos or newline",
                    "match": "exact, surrounding whitespace ignored",
                },
                seconds=time.perf_counter() - t0,
                precisions=precisions,
            )
        finally:
            src.close()


def _routers_of(units: Mapping[str, _Unit], unit_routers: Mapping[str, Any]) -> Any:
    """The calibrated routers of a group of units (None: the source's routers)."""
    for name in units:
        if name in unit_routers:
            return unit_routers[name]
    return None


def _calibration_corpora(
    store: PatternStore | None,
    tasks: Sequence[str],
    tokenizer: Any,
    calibration: Mapping[str, Any] | None,
) -> dict[str, list[list[int]]]:
    """Token ids of every task's calibration corpus (given, else as the store recorded it)."""

    out: dict[str, list[list[int]]] = {}
    for t in tasks:
        given = (calibration or {}).get(t)
        if given is not None and not isinstance(given, str | Path):
            out[t] = [list(r) for r in given]
            check_corpus(out[t], f"calibration corpus of task {t!r}")
        else:
            out[t] = store_corpus(store, t, tokenizer, corpus=given)
    return out


def _model_keep(
    model: Any, src: Any, corpus: list[list[int]], k: int, tokenizer: Any, options: Any
) -> KeepSets:
    """Keep sets of the ``recon`` method (`premoe.calibrate.select.recon_select`)."""

    opts = options or ReconOptions()
    data = batches(
        cap_tokens(corpus, opts.max_tokens), opts.batch_size, pad_token_id(tokenizer, src.config)
    )
    return recon_select(model, src.arch, src.moe_layers, data, k, options=opts).keep


def _export_and_load(
    src: Any,
    keep: KeepSets,
    tmp: Path,
    dtype: torch.dtype,
    device: torch.device,
    routers: Any = None,
) -> Any:
    """`export_pruned` into a fresh folder under `tmp` (with calibrated `routers` as
    overrides), then `from_pretrained` it."""

    out = tmp / f"export-{len(list(tmp.iterdir()))}"
    overrides = None if routers is None else router_overrides(src, routers)
    export_pruned(src, keep, out, router_overrides=overrides)
    net = pretrained_causal_lm(out, dtype=dtype, device_map={"": str(device)})
    return net.eval()


__all__ = [
    "BASELINES",
    "METHODS",
    "NONE",
    "METHOD_DESCRIPTIONS",
    "EvalProgress",
    "EvalReport",
    "EvalRow",
    "EvalSource",
    "ModelShape",
    "RoutingReport",
    "build_eval_sets",
    "check_keeps",
    "check_methods",
    "evaluate",
    "method_keep",
    "parse_eval_sets",
    "parse_keeps",
    "parse_methods",
    "parse_precisions",
    "precision_label",
    "routing_accuracy",
]
