"""PNG plots: accuracy versus experts kept (an `EvalReport`), and a pattern store's patterns.

matplotlib is imported only inside these functions, and only its object-oriented API with the
Agg canvas is used (no pyplot, no global state, no display needed). Every file is written
atomically; an existing file is replaced only with ``overwrite=True``.

Shape legend: L MoE layers, E experts per layer, T tasks.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from premoe.errors import UsageError
from premoe.eval.runner import precision_label
from premoe.io.atomic import Inputs, atomic_write_bytes, check_output_file
from premoe.patterns.store import PatternStore
from premoe.policy import expert_order, normalize_rows

if TYPE_CHECKING:
    from premoe.eval.runner import EvalReport
    from premoe.patterns.store import PatternStore

log = logging.getLogger(__name__)

PATTERN_PLOTS: tuple[str, ...] = ("heatmaps", "overlap", "coverage")
_PRECISION_LINE = {"fp8": "--", "int4": ":"}  # line style per expert precision (dense: method's)
_STYLE = {
    "tcess": ("tab:blue", "o", "-"),
    "frequency": ("tab:cyan", "s", "-"),
    "paper-logits": ("tab:purple", "^", "-"),
    "reap": ("tab:green", "D", "-"),
    "routed": ("tab:olive", "P", "-"),
    "global": ("tab:orange", "v", "--"),
    "random": ("tab:red", "x", ":"),
}


class PlotUnavailableError(UsageError):
    """matplotlib is not installed."""


def check_matplotlib() -> None:
    """Raise `PlotUnavailableError` (one line) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError(
            "plots need matplotlib: pip install 'premoe[plot]' (or pip install matplotlib)"
        ) from None


def _figure(width: float, height: float) -> Any:
    check_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _check_free(path: Path, overwrite: bool, inputs: Inputs = ()) -> None:
    check_output_file(path, overwrite=overwrite, inputs=inputs)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    log.info("wrote %s", path)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


# ---- eval ----------------------------------------------------------------------------------------


def plot_eval(
    report: EvalReport | dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    extra: dict[str, dict[str, dict[int, float]]] | None = None,
) -> Path:
    """Accuracy (or perplexity) versus experts kept: one panel per task, one line per method,
    a horizontal line for the full model. `report`: an `EvalReport` or its `to_json()`.
    `extra`: more lines, ``{method: {task: {K: value}}}`` (e.g. routed evaluation). A report
    with several expert precisions (``evaluate(quantize=...)``) is plotted against the kept
    experts' memory instead, one line per method and precision (`plot_eval_memory`)."""
    data = report if isinstance(report, dict) else report.to_json()
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--plot {out}: the plot is a PNG; give a path ending in .png")
    _check_free(out, overwrite)
    if len(data.get("precisions") or ["none"]) > 1:
        return _write(out, _png(plot_eval_memory(data)))
    tasks: list[str] = list(data["tasks"])
    methods: list[str] = list(data["methods"])
    keeps: list[int] = list(data["keeps"])
    series: dict[str, dict[str, dict[int, float]]] = {m: {t: {} for t in tasks} for m in methods}
    for r in data["results"]:
        series[r["method"]][r["task"]][int(r["keep"])] = float(r["value"])
    for m, per_task in (extra or {}).items():
        series[m] = {t: dict(v) for t, v in per_task.items()}
    rows, cols = _grid(len(tasks))
    fig = _figure(4.2 * cols, 3.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    e = int(data["num_experts"])
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        full = data["full"][task]
        kind = full["kind"]
        for m, per_task in series.items():
            pts = sorted(per_task.get(task, {}).items())
            if not pts:
                continue
            color, marker, ls = _STYLE.get(m, ("tab:gray", ".", "-"))
            ys = [100 * v if kind == "accuracy" else v for _, v in pts]
            ax.plot([k for k, _ in pts], ys, ls, color=color, marker=marker, label=m)
        fv = 100 * full["value"] if kind == "accuracy" else full["value"]
        ax.axhline(fv, color="black", lw=1, ls="-.", label="full model")
        ax.set_xscale("log", base=2)
        ax.set_xticks(keeps)
        ax.set_xticklabels([str(k) for k in keeps])
        ax.set_xlabel(f"experts kept per layer (of {e})")
        _score_axis(ax, kind)
        ax.set_title(f"{task} ({full['n']} held-out samples)")
        ax.grid(alpha=0.3)
    _finish_eval_figure(fig, axes, data, len(tasks), rows, cols)
    return _write(out, _png(fig))


def _finish_eval_figure(
    fig: Any, axes: Any, data: dict[str, Any], n: int, rows: int, cols: int
) -> None:
    """Hide unused panels, one legend below, the title."""
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 7))
    family = (data.get("fingerprint") or {}).get("family", "")
    name = "/".join(Path(str(data["model"])).parts[-2:])
    fig.suptitle(f"Pruned vs full model: {family} {name}".rstrip())


def _score_axis(ax: Any, kind: str) -> None:
    if kind == "accuracy":
        ax.set_ylabel("exact-match accuracy (%)")
        ax.set_ylim(-3, 103)
    else:
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_yscale("log")


def plot_eval_memory(data: dict[str, Any]) -> Any:
    """The figure of a report with several precisions: score versus the kept experts' MiB, one
    panel per task, one line per method and precision (labels ``tcess int4``), points labelled
    with their keep count."""
    tasks: list[str] = list(data["tasks"])
    source_dtype = (data.get("options") or {}).get("source_dtype")
    series: dict[tuple[str, str], dict[str, list[tuple[float, float, int]]]] = {}
    for r in data["results"]:
        pts = series.setdefault((r["method"], r["precision"]), {}).setdefault(r["task"], [])
        pts.append((r["expert_bytes"] / 2**20, float(r["value"]), int(r["keep"])))
    rows, cols = _grid(len(tasks))
    fig = _figure(4.6 * cols, 3.4 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        full = data["full"][task]
        kind = full["kind"]
        scale = 100.0 if kind == "accuracy" else 1.0
        for (m, p), per_task in series.items():
            pts = sorted(per_task.get(task, []))
            if not pts:
                continue
            color, marker, ls = _STYLE.get(m, ("tab:gray", ".", "-"))
            label = f"{m} {precision_label(p, source_dtype)}"
            xs, ys = [x for x, _, _ in pts], [scale * y for _, y, _ in pts]
            ax.plot(xs, ys, _PRECISION_LINE.get(p, ls), color=color, marker=marker, label=label)
            for x, y, k in zip(xs, ys, [k for _, _, k in pts], strict=True):
                ax.annotate(str(k), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.axhline(scale * full["value"], color="black", lw=1, ls="-.", label="full model")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory of the kept experts (MiB; points: experts kept)")
        _score_axis(ax, kind)
        ax.set_title(f"{task} ({full['n']} held-out samples)")
        ax.grid(alpha=0.3)
    _finish_eval_figure(fig, axes, data, len(tasks), rows, cols)
    return fig


# ---- patterns ------------------------------------------------------------------------------------


def layer_shares(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores as shares of the layer's total (negatives shifted). [L, E]."""

    return normalize_rows(scores).float()


def jaccard_matrix(
    store: PatternStore, tasks: Sequence[str], metric: str, keep: int
) -> torch.Tensor:
    """Mean over layers of the Jaccard index of two tasks' top-`keep` sets. [T, T]."""

    tops = []
    for t in tasks:
        order = expert_order(store.scores(t, metric))[:, :keep]  # [L, K]
        tops.append([set(row.tolist()) for row in order])
    n = len(tasks)
    out = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            vals = [len(a & b) / len(a | b) for a, b in zip(tops[i], tops[j], strict=True)]
            out[i, j] = sum(vals) / len(vals)
    return out


def coverage_curve(scores: torch.Tensor) -> torch.Tensor:
    """Fraction of each layer's score held by its top K experts, for K = 1..E. [L, E]."""
    shares = layer_shares(scores)  # [L, E]
    return torch.sort(shares, dim=1, descending=True).values.cumsum(dim=1)  # [L, E]


def default_plot_keep(store: PatternStore) -> int:
    """A quarter of the experts, at least the routed count."""
    return max(int(store.top_k), int(store.num_experts) // 4)


def plot_patterns(
    store: str | Path | PatternStore,
    out: str | Path,
    *,
    metric: str | None = None,
    keep: int | None = None,
    tasks: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``heatmaps.png`` (per-task expert usage by layer), ``overlap.png`` (Jaccard of the
    tasks' kept sets at `keep`, mean over layers) and ``coverage.png`` (share of each layer's
    score kept versus K, per task) into folder `out`. Returns {plot name: path}."""

    st = store if isinstance(store, PatternStore) else PatternStore.load(store)
    inputs = [("pattern store", st.path)]
    names = list(tasks) if tasks is not None else st.task_names
    if not names:
        raise UsageError("the store has no task to plot")
    for t in names:
        st.scores(t, st.metrics[0])  # unknown task: StoreError
    m = metric or st.default_metric
    st.scores(names[0], m)  # unknown metric: StoreError
    e, n_layers = st.num_experts, len(st.moe_layers)
    k = default_plot_keep(st) if keep is None else int(keep)
    if not 1 <= k <= e:
        raise UsageError(f"--keep must be between 1 and the store's {e} experts, got {k}")
    out = Path(out)
    paths = {p: out / f"{p}.png" for p in PATTERN_PLOTS}
    for p in paths.values():
        _check_free(p, overwrite, inputs)
    pngs: dict[str, bytes] = {}
    model_name = st.model.get("family", "model")

    # heatmaps: one panel per task, layers x experts, share of the layer's score
    cols = 1 if e > 48 else min(len(names), 2 if e > 16 else 3)
    rows = math.ceil(len(names) / cols)
    panel_w = min(max(4.0, 0.15 * e), 12.0)
    fig = _figure(panel_w * cols + 1.2, (0.3 * n_layers + 1.2) * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for i, t in enumerate(names):
        ax = axes[i // cols][i % cols]
        shares = layer_shares(st.scores(t, m)).numpy()  # [L, E]
        image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(t)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels([str(x) for x in st.moe_layers])
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=f"share of the layer's {m}", shrink=0.8)
    fig.suptitle(f"Expert usage per task ({m}), {model_name}")
    pngs["heatmaps"] = _png(fig)

    # overlap: Jaccard of the top-k sets
    jac = jaccard_matrix(st, names, m, k).numpy()  # [T, T]
    size = 1.2 + 0.75 * len(names)
    fig = _figure(size + 1.2, size)
    ax = fig.subplots()
    image = ax.imshow(jac, vmin=0.0, vmax=1.0, cmap="magma")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{jac[i, j]:.2f}",
                ha="center",
                va="center",
                color="black" if jac[i, j] > 0.6 else "white",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, label="Jaccard (mean over layers)")
    ax.set_title(f"Overlap of kept experts at K={k} of {e} ({m})")
    pngs["overlap"] = _png(fig)

    # coverage: mean over layers of the top-K share, per task (min over layers dotted)
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    ks = list(range(1, e + 1))
    for t in [*names, "__pooled__"]:
        s = st.pooled_scores(m) if t == "__pooled__" else st.scores(t, m)
        cov = coverage_curve(s)  # [L, E]
        label = "all tasks pooled" if t == "__pooled__" else t
        style = {"color": "black", "ls": "--"} if t == "__pooled__" else {}
        line = ax.plot(ks, cov.mean(0).numpy(), label=label, **style)[0]
        ax.plot(ks, cov.min(0).values.numpy(), color=line.get_color(), ls=":", lw=0.8)
    ax.axvline(k, color="gray", lw=1)
    ax.axvline(st.top_k, color="gray", lw=1, ls=":")
    ax.set_xlabel(f"experts kept per layer (K), of {e}")
    ax.set_ylabel(f"share of the layer's {m} kept")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(1, e)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mean (dotted: worst layer)", title_fontsize=8)
    ax.set_title(f"Coverage vs K (grey: K={k}, dotted: top-{st.top_k})")
    pngs["coverage"] = _png(fig)
    return {name: _write(paths[name], data) for name, data in pngs.items()}


__all__ = [
    "PATTERN_PLOTS",
    "PlotUnavailableError",
    "check_matplotlib",
    "coverage_curve",
    "default_plot_keep",
    "jaccard_matrix",
    "layer_shares",
    "plot_eval",
    "plot_eval_memory",
    "plot_patterns",
]
