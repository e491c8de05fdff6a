"""`run_demo()`: the whole premoe pipeline on the bundled demo model, on a CPU, in a few minutes.

Steps, every number computed in the run:

1. write the task suite (`premoe.demo.tasks.write_suite`): profiling corpora and held-out
   eval sets, as JSONL;
2. profile the tasks into a pattern store (all four metrics from one pass), or reuse a given
   store after checking its fingerprint;
3. route a few held-out prompts (TAER: the first MoE router's input, no expert involved);
4. export a pruned checkpoint for one task (`export_from_store`), read it back with plain
   ``from_pretrained`` and score it;
5. evaluate the full model, and the pruned model at every keep count with: the task's own
   TCESS pattern, the pattern TAER routes each query to, the pattern of all tasks pooled
   (task-agnostic) and random experts (`premoe.eval.evaluate`), plus held-out routing accuracy;
6. at equal memory: the task's own pattern with the kept experts resident in int4, at half and
   at all of the experts, beside a quarter of them in the checkpoint's dtype (`evaluate(...,
   quantize="int4")`): which mix of experts kept and precision wins at the same memory;
7. plot accuracy versus experts kept and the store's patterns.

Everything is written into one output folder, atomically (``tasks/``, ``store/``,
``export-TASK-kK/``, ``plots/``, ``demo.json``).

One module because the demo is one pipeline whose steps write each other's inputs in order;
it reads top to bottom as the README describes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import premoe
from premoe.calibrate import RecalibrateOptions
from premoe.calibrate.pipeline import calibrate_pattern, export_calibrated
from premoe.demo import MODEL_DIR
from premoe.demo import tasks as demo_tasks
from premoe.errors import ModelNotFoundError, OutputExistsError, PremoeError, UsageError
from premoe.eval.harness import load_eval_set, no_load_bars, score, torch_threads
from premoe.eval.plots import PlotUnavailableError, check_matplotlib, plot_eval, plot_patterns
from premoe.eval.runner import NONE, evaluate, precision_label
from premoe.export import export_from_store
from premoe.export.export import check_expert_quantization
from premoe.fingerprint import fingerprint_source, same_model
from premoe.io.atomic import atomic_output_dir, atomic_write_text, check_output_path
from premoe.patterns.store import PatternStore
from premoe.plan import keep_ladder
from premoe.profile import profile
from premoe.quant.export import ExpertQuantizer, check_scheme
from premoe.route import QueryKeyer, route
from premoe.runtime import pretrained_causal_lm
from premoe.source import resolve_model

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("premoe-demo")
#: The pattern store shipped with the source tree for the bundled model (absent from wheels).
SHIPPED_STORE: Path = Path(__file__).resolve().parents[2] / "patterns" / "demo"
METRICS: tuple[str, ...] = ("tcess", "frequency", "paper-logits", "reap")
METHODS: tuple[str, ...] = ("tcess", "routed", "global", "random")
METHOD_LABELS = {
    "full": "full model",
    "tcess": "TCESS, the task's own pattern",
    "routed": "TCESS, pattern picked by TAER",
    "global": "all tasks pooled (task-agnostic)",
    "random": "random experts",
}
STEPS: tuple[str, ...] = (
    "suite",
    "profile",
    "route",
    "export",
    "evaluate",
    "equal-memory",
    "plots",
)
EQUAL_MEMORY_METHOD = "tcess"  # the pattern compared across precisions
GROUP_SIZES: tuple[int, ...] = (128, 64, 32, 16, 8)  # int4 group sizes tried, largest first


@dataclass(frozen=True)
class DemoOptions:
    """Sizes of a demo run. `quick()` is the reduced run the tests use."""

    n_profile: int = 256  # profiling samples per task
    n_eval: int = 100  # held-out eval prompts per task
    keep: int | None = None  # the headline keep count (None: a quarter of the experts)
    keeps: tuple[int, ...] | None = None  # the plot's sweep (None: top-k, powers of 2, all)
    export_task: str = "add"
    seed: int = 0
    threads: int | None = 1  # torch CPU threads (one is fastest for this model on a busy CPU)
    dtype: str = "fp32"  # bf16 weights run in fp32 on the CPU (bf16 CPU kernels are slower)
    batch_size: int = 128
    recalibrate_steps: int = 200  # the export task also goes through `export --recalibrate`
    # (recon selection + router recalibration); 0 skips it
    equal_memory: str | None = "int4"  # scheme of the equal-memory rows (None skips them)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoOptions:
        return cls(
            **{"n_profile": 64, "n_eval": 24, "keeps": (), "recalibrate_steps": 0, **overrides}
        )

    def headline(self, num_experts: int, top_k: int) -> int:
        """The summary's keep count: `keep`, or a quarter of the experts (at least top-k)."""
        return self.keep if self.keep is not None else max(top_k, num_experts // 4)

    def sweep(self, num_experts: int, top_k: int) -> list[int]:
        """Keep counts evaluated: the headline one and `keeps` (default: the plan ladder)."""

        extra = keep_ladder(top_k, num_experts) if self.keeps is None else self.keeps
        ks = {self.headline(num_experts, top_k), *extra}
        return sorted(k for k in ks if top_k <= k <= num_experts)


@dataclass
class DemoProgress:
    """`step` (one of `STEPS`) is running: number `index` (1-based) of `steps`."""

    step: str
    index: int
    steps: int
    detail: str = ""


Progress = Callable[[DemoProgress], None]


@dataclass
class DemoResult:
    """What a demo run measured and wrote. JSON: `to_json()` (also written as demo.json)."""

    out: Path
    out_note: str  # how the output folder was chosen
    model: str
    fingerprint: dict[str, Any]
    options: dict[str, Any]
    tasks: list[str]
    num_experts: int
    top_k: int
    keep: int
    store: dict[str, Any]
    examples: list[dict[str, Any]]
    export: dict[str, Any]
    summary: list[dict[str, Any]]
    routing: dict[str, Any]
    equal_memory: list[dict[str, Any]]
    evaluation: dict[str, Any]
    plots: dict[str, str]
    timings: dict[str, float]
    seconds: float
    premoe_version: str = field(default_factory=lambda: premoe.__version__)

    def to_json(self) -> dict[str, Any]:
        return {
            "premoe_version": self.premoe_version,
            "out": str(self.out),
            "out_note": self.out_note,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "options": self.options,
            "tasks": self.tasks,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "keep": self.keep,
            "store": self.store,
            "examples": self.examples,
            "export": self.export,
            "summary": self.summary,
            "routing": self.routing,
            "equal_memory": self.equal_memory,
            "evaluation": self.evaluation,
            "plots": self.plots,
            "timings": self.timings,
            "seconds": self.seconds,
        }


def choose_out(out: str | Path | None, overwrite: bool) -> tuple[Path, str]:
    """The output folder and a line saying how it was chosen.

    An explicit `out` that exists is refused unless `overwrite`; the default ``./premoe-demo``,
    if it exists, is left alone and a fresh timestamped sibling is used instead.
    """
    if out is not None:
        path = Path(out)
        if os.path.lexists(path) and not overwrite:
            raise OutputExistsError(
                f"output {path} already exists; pass --overwrite to replace it or choose "
                "another --out"
            )
        return path, ("replacing " if os.path.lexists(path) else "") + f"{path}"
    if not os.path.lexists(DEFAULT_OUT) or overwrite:
        return DEFAULT_OUT, f"{DEFAULT_OUT}" + (" (replaced)" if DEFAULT_OUT.exists() else "")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{stamp}")
    n = 1
    while os.path.lexists(path):
        n += 1
        path = DEFAULT_OUT.with_name(f"{DEFAULT_OUT.name}-{stamp}-{n}")
    return path, f"{path} ({DEFAULT_OUT} exists and was left as it is)"


def _load_full(model_dir: Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    net = pretrained_causal_lm(model_dir, dtype=dtype).eval()
    return net, tok


def _model_dir(model: str | Path | None) -> Path:

    path = Path(model) if model is not None else MODEL_DIR
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"no model at {path}"
            + (
                " (the bundled demo model is missing from this install; reinstall premoe from a "
                "source checkout, or train it with examples/train_demo.py)"
                if model is None
                else ""
            )
        )
    return path


def profile_demo_store(
    model: str | Path,
    profile_files: dict[str, Path],
    *,
    batch_size: int = 128,
    seed: int = 0,
    sources: dict[str, str] | None = None,
) -> Any:
    """Profile the demo tasks (all four metrics, one pass, fp32 on the CPU) into a store.

    `sources` replaces the recorded corpus path of each task (e.g. with the final path of a
    file written to a temporary folder first).
    """

    store = profile(
        str(model),
        {t: str(p) for t, p in profile_files.items()},
        metrics=list(METRICS),
        device="cpu",
        dtype="fp32",
        batch_size=batch_size,
        seed=seed,
    )
    for t, src in (sources or {}).items():
        store.tasks[t].source = src
    return store


def run_demo(
    out: str | Path | None = None,
    *,
    quick: bool = False,
    overwrite: bool = False,
    model: str | Path | None = None,
    store: str | Path | None = None,
    options: DemoOptions | None = None,
    progress: Progress | None = None,
) -> DemoResult:
    """Run the demo pipeline (see the module doc) and return what it measured.

    `out`: output folder (default ``./premoe-demo``, or a fresh timestamped folder next to it
    when it exists; an explicit `out` that exists needs `overwrite`). `quick`: fewer samples
    and one keep count. `model`: another checkpoint with the demo tokenizer (tests); default
    the bundled model. `store`: reuse this pattern store (fingerprint checked) instead of
    profiling; default: profile into ``OUT/store``.
    """
    import torch

    opts = options or (DemoOptions.quick() if quick else DemoOptions())
    model_dir = _model_dir(model)
    final, note = choose_out(out, overwrite)
    inputs = [("model folder", model_dir), ("pattern store", store)]
    check_output_path(final, overwrite=overwrite, inputs=inputs)
    t_start = time.perf_counter()
    with torch_threads(opts.threads), no_load_bars():
        with atomic_output_dir(final, overwrite=overwrite) as tmp:
            result = _run(model_dir, tmp, final, note, opts, store, progress, torch.float32)
    result.seconds = time.perf_counter() - t_start
    result.timings["total"] = result.seconds
    # demo.json was written inside the folder before it moved; refresh the final timings

    atomic_write_text(final / "demo.json", json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _run(
    model_dir: Path,
    tmp: Path,
    final: Path,
    note: str,
    opts: DemoOptions,
    store_path: str | Path | None,
    progress: Progress | None,
    dtype: Any,
) -> DemoResult:

    timings: dict[str, float] = {}
    current: dict[str, Any] = {"name": None, "start": 0.0}

    def step(name: str | None, detail: str = "") -> None:
        """Close the running step's timing; start `name` (None: just close)."""
        now = time.perf_counter()
        if current["name"] is not None:
            timings[current["name"]] = now - current["start"]
        current.update(name=name, start=now)
        if name is not None and progress is not None:
            progress(DemoProgress(name, STEPS.index(name) + 1, len(STEPS), detail))

    src = resolve_model(model_dir)
    try:
        fingerprint = fingerprint_source(src)
        e, top_k = src.num_experts, src.top_k
    finally:
        src.close()
    keep = opts.headline(e, top_k)
    if not top_k <= keep <= e:
        raise UsageError(
            f"--keep {keep} must be between the {top_k} experts routed per token and the "
            f"model's {e}"
        )
    keeps = opts.sweep(e, top_k)
    names = demo_tasks.task_names()
    if opts.export_task not in names:
        raise UsageError(f"export task {opts.export_task!r} is not a demo task")
    if opts.equal_memory is not None:
        check_scheme(opts.equal_memory)

    # 1. the task suite
    step("suite", f"{len(names)} tasks")
    paths = demo_tasks.write_suite(tmp / "tasks", opts.n_profile, opts.n_eval, opts.seed)

    # 2. the pattern store
    step("profile", f"{len(names)} x {opts.n_profile} samples")
    store_info: dict[str, Any]
    if store_path is not None:
        st = PatternStore.load(store_path)
        st.check_model(fingerprint)
        missing = [t for t in names if t not in st.tasks]
        if missing:
            raise UsageError(f"store {store_path} lacks the demo task {missing[0]!r}")
        store_info = {"path": str(store_path), "reused": True}
    else:
        st = profile_demo_store(
            model_dir,
            {t: p["profile"] for t, p in paths.items()},
            batch_size=opts.batch_size,
            seed=opts.seed,
            sources={t: str(final / "tasks" / p["profile"].name) for t, p in paths.items()},
        )
        st.save(tmp / "store")
        st.path = final / "store"
        store_info = {"path": str(final / "store"), "reused": False}
    store_info.update(
        {
            "metrics": list(st.metrics),
            "key": dict(st.key),
            "samples": {t: st.tasks[t].samples for t in names},
            "tokens": {t: st.tasks[t].tokens for t in names},
        }
    )

    # 3. route a few held-out prompts
    step("route")
    net, tok = _load_full(model_dir, dtype)
    keyer = QueryKeyer.for_store(st, net, tok)
    examples = []
    for t in names:
        row = demo_tasks.generate(t, 1, opts.seed + 1, "eval")[0]
        r = route(st, keyer, row["prompt"])
        examples.append(
            {
                "prompt": row["prompt"],
                "task": t,
                "routed": r.task,
                "similarity": r.similarity,
                "runner_up": None
                if len(r.candidates) < 2
                else {"task": r.candidates[1].task, "similarity": r.candidates[1].similarity},
                "correct": r.task == t,
            }
        )
    del net, keyer

    # 4. export a pruned checkpoint for one task, read it back with plain transformers
    step("export", f"{opts.export_task}, {keep} of {e} experts")
    task = opts.export_task
    export_name = f"export-{task}-k{keep}"
    result = export_from_store(model_dir, st, [task], tmp / export_name, keep=keep)

    exported = pretrained_causal_lm(tmp / export_name, dtype=dtype).eval()
    eval_set = load_eval_set(task, paths[task]["eval"])
    exp_score = score(exported, tok, eval_set, batch_size=opts.batch_size)
    del exported
    export_info = {
        **result.summary(),
        "out": str(final / export_name),
        "task": task,
        "accuracy": exp_score.value,
        "n": exp_score.n,
        "loaded_with": "transformers.AutoModelForCausalLM.from_pretrained",
    }
    if opts.recalibrate_steps:
        export_info["recalibrated"] = _recalibrated_export(
            model_dir, st, task, keep, paths[task], tmp, final, export_name, opts, dtype, tok
        )

    # 5. evaluate
    step("evaluate", f"{len(METHODS)} methods x K in {keeps}")

    def eval_progress(p: Any) -> None:
        if progress is not None:
            progress(
                DemoProgress(
                    "evaluate",
                    STEPS.index("evaluate") + 1,
                    len(STEPS),
                    f"{p.done}/{p.total} answers, {p.stage}",
                )
            )

    report = evaluate(
        model_dir,
        st,
        names,
        keeps=keeps,
        methods=list(METHODS),
        eval_sets={t: paths[t]["eval"] for t in names},
        device="cpu",
        dtype=dtype,
        seed=opts.seed,
        batch_size=opts.batch_size,
        progress=eval_progress,
    )
    rep = report.to_json()

    # 6. at equal memory: the task's own pattern, experts kept quantized
    equal_memory: list[dict[str, Any]] = []
    if opts.equal_memory is not None:
        step("equal-memory", f"{EQUAL_MEMORY_METHOD} in {opts.equal_memory}")
        equal_memory = _equal_memory(model_dir, st, names, paths, report, keep, opts, dtype)

    # 7. plots
    step("plots")
    plots: dict[str, str] = {}
    try:
        check_matplotlib()
    except PlotUnavailableError as err:
        log.warning("no plots: %s", err)
    else:
        plots_dir = tmp / "plots"
        plot_eval(rep, plots_dir / "accuracy_vs_experts.png")
        pattern_plots = plot_patterns(st, plots_dir, keep=keep)
        plots["accuracy_vs_experts"] = str(final / "plots" / "accuracy_vs_experts.png")
        plots.update({name: str(final / "plots" / p.name) for name, p in pattern_plots.items()})
    step(None)

    # the summary
    summary = summarise(report, keep)
    routing = rep["routing"] or {}
    for row in summary:
        row["label"] = METHOD_LABELS.get(row["method"], row["method"])
    result_obj = DemoResult(
        out=final,
        out_note=note,
        model=str(model_dir),
        fingerprint=fingerprint,
        options={
            "n_profile": opts.n_profile,
            "n_eval": opts.n_eval,
            "keep": keep,
            "keeps": keeps,
            "export_task": opts.export_task,
            "seed": opts.seed,
            "threads": opts.threads,
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": opts.batch_size,
            "methods": list(METHODS),
            "equal_memory": opts.equal_memory,
        },
        tasks=names,
        num_experts=e,
        top_k=top_k,
        keep=keep,
        store=store_info,
        examples=examples,
        export=export_info,
        summary=summary,
        routing=routing,
        equal_memory=equal_memory,
        evaluation=rep,
        plots=plots,
        timings=timings,
        seconds=0.0,
    )

    atomic_write_text(tmp / "demo.json", json.dumps(result_obj.to_json(), indent=2) + "\n")
    return result_obj


def _recalibrated_export(
    model_dir: Path,
    store: Any,
    task: str,
    keep: int,
    files: dict[str, Path],
    tmp: Path,
    final: Path,
    export_name: str,
    opts: DemoOptions,
    dtype: Any,
    tok: Any,
) -> dict[str, Any]:
    """`premoe export --recalibrate` of the export task (recon selection, routers recalibrated
    on the task's profiling corpus), read back with plain from_pretrained and scored."""

    t0 = time.perf_counter()
    pattern = calibrate_pattern(
        model_dir,
        store,
        task,
        keep=keep,
        options=RecalibrateOptions(steps=opts.recalibrate_steps),
        corpus=files["profile"],
        device="cpu",
        dtype=dtype,
    )
    name = f"{export_name}-recalibrated"
    export_calibrated(model_dir, pattern, tmp / name)
    net = pretrained_causal_lm(tmp / name, dtype=dtype).eval()
    sc = score(net, tok, load_eval_set(task, files["eval"]), batch_size=opts.batch_size)
    assert pattern.routers is not None
    return {
        "out": str(final / name),
        "selection": pattern.selection.provenance["name"],
        "accuracy": sc.value,
        "n": sc.n,
        "kl_before": pattern.routers.info["kl_before"],
        "kl_after": pattern.routers.info["kl_after"],
        "steps": opts.recalibrate_steps,
        "seconds": time.perf_counter() - t0,
    }


def _group_size(model_dir: Path, scheme: str) -> int:
    """The largest int4 group size (fp8 block) of `GROUP_SIZES` that divides the experts."""
    src = resolve_model(model_dir)
    try:
        for g in GROUP_SIZES:
            try:
                q = ExpertQuantizer(check_scheme(scheme), block=(g, g), group_size=g)
                check_expert_quantization(src, q)
            except UsageError:
                continue
            return g
    finally:
        src.close()
    raise UsageError(f"no {scheme} group size of {GROUP_SIZES} divides the experts of {model_dir}")


def _equal_memory(
    model_dir: Path,
    store: Any,
    names: list[str],
    paths: dict[str, dict[str, Path]],
    report: Any,
    keep: int,
    opts: DemoOptions,
    dtype: Any,
) -> list[dict[str, Any]]:
    """The task's own pattern at `keep` in the checkpoint's dtype (from `report`), and at half
    and all of the experts with the experts resident in `opts.equal_memory`; by memory."""
    scheme = opts.equal_memory
    assert scheme is not None
    e, top_k = report.num_experts, report.top_k
    keeps = sorted({max(top_k, e // 2), e})
    group = _group_size(model_dir, scheme)
    quant = evaluate(
        model_dir,
        store,
        names,
        keeps=keeps,
        methods=[EQUAL_MEMORY_METHOD],
        eval_sets={t: paths[t]["eval"] for t in names},
        device="cpu",
        dtype=dtype,
        seed=opts.seed,
        batch_size=opts.batch_size,
        routing=False,
        quantize=scheme,
        block=group,
        group_size=group,
    )
    rows = [_summary_row(report, EQUAL_MEMORY_METHOD, keep, NONE)]
    rows += [_summary_row(quant, EQUAL_MEMORY_METHOD, k, scheme) for k in keeps]
    for r in rows:
        r["label"] = f"{r['keep']}/{e} {r['precision_label']}"
        r["group_size"] = None if r["precision"] == NONE else group  # int4 group, fp8 block
    return sorted(rows, key=lambda r: (r["expert_bytes"], r["keep"]))


def _summary_row(report: Any, method: str, keep: int, precision: str) -> dict[str, Any]:
    """Mean accuracy over tasks of one (method, K, precision), with its memory."""
    tasks = report.tasks
    full_mean = sum(report.full[t].value for t in tasks) / len(tasks)
    per = {t: report.row(t, method, keep, precision).score.value for t in tasks}
    mean = sum(per.values()) / len(per)
    row = report.row(tasks[0], method, keep, precision)
    return {
        "method": method,
        "keep": keep,
        "precision": precision,
        "precision_label": precision_label(precision, report.options.get("source_dtype")),
        "bytes": row.checkpoint_bytes,
        "expert_bytes": row.expert_bytes,
        "saved": 1.0 - row.checkpoint_bytes / report.full_checkpoint_bytes,
        "accuracy": mean,
        "retained": mean / full_mean if full_mean > 0 else None,
        "per_task": per,
        "worst_task": min(tasks, key=lambda t: per[t]),
    }


def summarise(report: Any, keep: int) -> list[dict[str, Any]]:
    """One row per method at `keep` (and the full model): memory, mean accuracy over tasks,
    accuracy retained (mean pruned / mean full), worst task."""
    tasks = report.tasks
    full_mean = sum(report.full[t].value for t in tasks) / len(tasks)
    full_bytes = report.full_checkpoint_bytes
    worst_full = min(tasks, key=lambda t: report.full[t].value)
    rows = [
        {
            "method": "full",
            "label": "full model",
            "keep": report.num_experts,
            "bytes": full_bytes,
            "saved": 0.0,
            "accuracy": full_mean,
            "retained": 1.0,
            "per_task": {t: report.full[t].value for t in tasks},
            "worst_task": worst_full,
        }
    ]
    for m in report.methods:
        row = _summary_row(report, m, keep, NONE)
        rows.append({k: v for k, v in row.items() if k not in _EQUAL_MEMORY_KEYS})
    return rows


_EQUAL_MEMORY_KEYS = ("precision", "precision_label", "expert_bytes")  # not in `summarise` rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary_table(result: DemoResult) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the one summary table the CLI prints."""
    pct, mib = _pct, _mib
    headers = [
        "method",
        "experts kept",
        "resident",
        "memory saved",
        "accuracy",
        "retained",
        "worst task",
    ]
    rows = []
    for r in result.summary:
        worst = r["worst_task"]
        rows.append(
            [
                r["label"],
                f"{r['keep']}/{result.num_experts}",
                mib(r["bytes"]),
                "-" if r["method"] == "full" else pct(r["saved"]),
                pct(r["accuracy"]),
                pct(r["retained"]),
                f"{worst} {pct(r['per_task'][worst])}",
            ]
        )
    routing = result.routing
    if routing:
        per = routing.get("per_task", {})
        worst = min(per, key=lambda t: per[t]["accuracy"]) if per else None
        rows.append(
            [
                f"TAER routing, held-out ({routing['n']} prompts)",
                "-",
                "-",
                "-",
                pct(routing["accuracy"]),
                "-",
                "-" if worst is None else f"{worst} {pct(per[worst]['accuracy'])}",
            ]
        )
    return headers, rows


def equal_memory_table(result: DemoResult) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the "at equal memory" table (empty rows when it was skipped)."""
    headers = ["experts kept", "expert memory", "resident", "accuracy", "retained", "worst task"]
    rows = [
        [
            r["label"],
            _mib(r["expert_bytes"]),
            _mib(r["bytes"]),
            _pct(r["accuracy"]),
            _pct(r["retained"]),
            f"{r['worst_task']} {_pct(r['per_task'][r['worst_task']])}",
        ]
        for r in result.equal_memory
    ]
    return headers, rows


def build_shipped_store(
    out: str | Path = SHIPPED_STORE,
    *,
    model: str | Path | None = None,
    options: DemoOptions | None = None,
    overwrite: bool = False,
) -> Any:
    """Profile the bundled model on the demo suite exactly as `run_demo` does, and save the
    store to `out` (the shipped ``patterns/demo``). Its task sources name the generator call,
    so the store is reproducible without the temporary corpus files."""
    import tempfile

    opts = options or DemoOptions()
    model_dir = _model_dir(model)
    with torch_threads(opts.threads), no_load_bars(), tempfile.TemporaryDirectory() as tmp:
        paths = demo_tasks.write_suite(Path(tmp), opts.n_profile, 1, opts.seed)
        store = profile_demo_store(
            model_dir,
            {t: p["profile"] for t, p in paths.items()},
            batch_size=opts.batch_size,
            seed=opts.seed,
            sources={
                t: f"premoe.demo.tasks.generate({t!r}, {opts.n_profile}, seed={opts.seed}, "
                "split='profile')"
                for t in paths
            },
        )
        store.save(out, overwrite=overwrite)
    return store


def shipped_store_matches(model: str | Path | None = None) -> bool:
    """Whether the shipped store exists and was made for the (bundled) model."""

    if not (SHIPPED_STORE / "store.json").is_file():
        return False
    try:
        st = PatternStore.load(SHIPPED_STORE)
        src = resolve_model(_model_dir(model))
        try:
            return same_model(st.model, fingerprint_source(src))
        finally:
            src.close()
    except PremoeError:
        return False


__all__ = [
    "DEFAULT_OUT",
    "METHODS",
    "SHIPPED_STORE",
    "STEPS",
    "DemoOptions",
    "DemoProgress",
    "DemoResult",
    "build_shipped_store",
    "choose_out",
    "equal_memory_table",
    "profile_demo_store",
    "run_demo",
    "shipped_store_matches",
    "summarise",
    "summary_table",
]


def main(argv: list[str] | None = None) -> None:
    """``python -m premoe.eval.demo --write-store patterns/demo``: rebuild the shipped store."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--write-store", type=Path, default=SHIPPED_STORE, help="store folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    args = p.parse_args(argv)
    store = build_shipped_store(args.write_store, overwrite=args.overwrite)
    log.info("wrote %s (%d tasks)", args.write_store, len(store.tasks))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("premoe").setLevel(logging.INFO)
    main()
