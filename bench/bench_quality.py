"""Pruning quality: accuracy / perplexity versus experts kept, per selection method, with and
without router recalibration, on the bundled demo model and on a real-text char-level MoE.

    python bench/bench_quality.py demo --out bench/results/quality_demo.json
    python bench/bench_quality.py realtext --out bench/results/quality_realtext.json
    python bench/bench_quality.py realtext-quant --out bench/results/quality_realtext_quant.json
    python bench/bench_quality.py demo --quantize none,int4 --group-size 32 --methods tcess \
        --recal-methods '' --keeps 16,32,64 --out bench/results/quality_demo_quant.json
    python bench/bench_quality.py cost --out bench/results/quality_cost.json   # recalibration cost
    python bench/bench_quality.py gpu --out bench/results/quality_gpu.json     # 15B-class, CUDA

``demo``: the shipped store (patterns/demo), each task's profiling corpus as the calibration
corpus, 100 held-out prompts per task, greedy exact match. ``realtext``: trains
examples/train_realtext.py into ``--model-dir`` if it is not there (about 10 minutes on 2 CPU
cores), profiles its five domains, and scores per-domain perplexity. Methods: tcess,
paper-logits, reap (store scores), recon (premoe.calibrate.select), each optionally ``+recal``
(routers recalibrated, premoe.calibrate.recalibrate). Tasks are evaluated one at a time and the
JSON is rewritten after each, so a long run leaves partial results. ``--plot`` writes the curve.

``--quantize none,fp8,int4`` (demo, realtext): every (method, K) is also scored with the kept
experts resident in fp8 (``--block``) or int4 (``--group-size``) (`evaluate(quantize=...)`), and
the output gains ``equal_memory``: per (method, K, precision) the mean retained score, the kept
experts' MiB and the resident MiB (checkpoint dtype), ordered by memory, printed as a table.
``realtext-quant`` is ``realtext`` with the TCESS pattern only, K in 4..32 and
``--quantize none,fp8,int4`` (blocks and groups of 48: the model's experts are 48x96 and 96x48),
no recalibration: accuracy at equal memory on real text.

``gpu``: layer-sequential recalibration cost on a 15B-class random Qwen3-MoE-shaped model built
directly on the GPU (`_common.build_on_device`): per MoE layer, the pruned block's router is fitted
to the full block's output on the pruned model's own hidden states
(`premoe.calibrate.layerwise.recalibrate_layerwise`); reports seconds per 1,000 calibration tokens
and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch

from premoe.eval.runner import precision_label

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS = ("add", "reverse", "sort", "count", "close")
DEFAULT_KEEPS = "8,16"
DEFAULT_GROUP = 128  # fp8 block and int4 group size, as premoe's defaults
REALTEXT_DOMAINS = ("python", "c", "man", "perl", "doc")


def _ratio(r: dict[str, Any]) -> float:
    """accuracy: pruned/full; perplexity: pruned/full ratio (1.0 = no loss)."""
    if r["kind"] == "accuracy":
        return r["value"] / r["full"] if r["full"] else float("nan")
    return r["value"] / r["full"]


def _series(r: dict[str, Any]) -> str:
    """A row's line: its method, with its expert precision when quantized ("tcess int4")."""
    p = r.get("precision", "none")
    return r["method"] if p == "none" else f"{r['method']} {p}"


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """method (precision) -> K -> mean retained over tasks (`_ratio`)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        acc.setdefault(_series(r), {}).setdefault(str(r["keep"]), []).append(_ratio(r))
    return {m: {k: sum(v) / len(v) for k, v in ks.items()} for m, ks in acc.items()}


def _equal_memory(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, K, precision): mean retained over tasks, kept experts' and resident bytes,
    ordered by expert memory."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["keep"], r.get("precision", "none")), []).append(r)
    out = [
        {
            "method": m,
            "keep": k,
            "precision": p,
            "retained": sum(_ratio(r) for r in rs) / len(rs),
            "expert_mib": rs[0]["expert_bytes"] / 2**20,
            "resident_mib": rs[0]["checkpoint_bytes"] / 2**20,
            "tasks": len(rs),
        }
        for (m, k, p), rs in groups.items()
    ]
    return sorted(out, key=lambda x: (x["expert_mib"], x["method"], x["keep"]))


def _best_at_budget(table: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Per dense row (its resident MiB as the budget): the best row of any precision that fits."""

    def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return (
            a["retained"] > b["retained"] if kind == "accuracy" else a["retained"] < b["retained"]
        )

    out = []
    for d in (x for x in table if x["precision"] == "none"):
        fits = [
            x
            for x in table
            if x["method"] == d["method"] and x["resident_mib"] <= d["resident_mib"]
        ]
        best = d
        for x in fits:
            if better(x, best):
                best = x
        out.append({"budget_mib": d["resident_mib"], "dense": d, "best": best})
    return out


def _label(x: dict[str, Any], dense: str) -> str:
    """ "24 int4" ("8 bf16" for the dense precision)."""
    return f"{x['keep']} {precision_label(x['precision'], dense)}"


def _print_equal_memory(table: list[dict[str, Any]], kind: str, dense: str) -> None:
    label = "accuracy retained" if kind == "accuracy" else "ppl / full"
    rows = [
        [
            f"{x['keep']}",
            precision_label(x["precision"], dense),
            x["method"],
            f"{x['expert_mib']:.2f}",
            f"{x['resident_mib']:.2f}",
            f"{x['retained']:.3f}",
        ]
        for x in table
    ]
    head = ["K", "precision", "method", "expert MiB", "resident MiB", label]
    _common.print_table(head, rows, title="at equal memory (by the kept experts' memory)")
    rows = [
        [
            f"{b['budget_mib']:.2f}",
            b["dense"]["method"],
            _label(b["dense"], dense),
            f"{b['dense']['retained']:.3f}",
            _label(b["best"], dense),
            f"{b['best']['retained']:.3f}",
        ]
        for b in _best_at_budget(table, kind)
    ]
    head = ["budget MiB", "method", "dense K", label, "best that fits", label]
    _common.print_table(head, rows, title="best (K, precision) within each dense row's memory")


def _print(summary: dict[str, dict[str, float]], kind: str) -> None:
    keeps = sorted({k for v in summary.values() for k in v}, key=int)
    head = ["method", *[f"K={k}" for k in keeps]]
    label = "mean accuracy retained" if kind == "accuracy" else "mean perplexity ratio"
    print(f"\n{label} (pruned vs full)")
    rows = [[m, *[f"{summary[m].get(k, float('nan')):.3f}" for k in keeps]] for m in summary]
    _common.print_table(head, rows)


def _run(
    model: Path,
    store: Path,
    tasks: list[str],
    args: argparse.Namespace,
    calibration: dict[str, Any],
    eval_sets: dict[str, Any],
) -> dict[str, Any]:
    from premoe.calibrate.recalibrate import RecalibrateOptions
    from premoe.eval import evaluate

    out: dict[str, Any] = {"rows": [], "seconds": {}}
    if args.out and Path(args.out).exists() and args.resume:
        out = json.loads(Path(args.out).read_text())
    done = {r["task"] for r in out["rows"]}
    opts = RecalibrateOptions(steps=args.steps, lr=args.lr, batch_size=args.recal_batch)
    for t in tasks:
        if t in done:
            continue
        t0 = time.perf_counter()
        report = evaluate(
            model,
            store,
            [t],
            keeps=args.keeps,
            methods=args.methods,
            eval_sets={t: eval_sets[t]},
            dtype="fp32",
            routing=False,
            threads=args.threads,
            recalibrate=bool(args.recal_methods),
            recalibrate_methods=args.recal_methods.split(",") if args.recal_methods else None,
            recalibrate_options=opts,
            calibration={t: calibration[t]},
            quantize=args.quantize,
            block=args.block,
            group_size=args.group_size,
        )
        data = report.to_json()
        out["rows"] += data["results"]
        out["source_dtype"] = data["options"]["source_dtype"]
        out["seconds"][t] = time.perf_counter() - t0
        out["summary"] = _summary(out["rows"])
        if args.quantize != "none":
            out["equal_memory"] = _equal_memory(out["rows"])
            out["best_at_budget"] = _best_at_budget(out["equal_memory"], data["results"][0]["kind"])
        out["options"] = {k: str(v) for k, v in vars(args).items()}
        _common.write_json(args.out, out)
        print(f"{t}: {out['seconds'][t]:.0f} s", flush=True)
    return out


def demo(args: argparse.Namespace) -> dict[str, Any]:
    from premoe.demo import MODEL_DIR
    from premoe.demo.tasks import generate
    from premoe.eval.harness import demo_eval_set
    from premoe.source import load_tokenizer

    tok = load_tokenizer(MODEL_DIR)
    tasks = args.tasks.split(",") if args.tasks else list(DEMO_TASKS)
    calibration = {
        t: [tok(r["text"])["input_ids"] for r in generate(t, 256, 0, "profile")] for t in tasks
    }
    sets = {t: demo_eval_set(t, args.n_eval, 0) for t in tasks}
    return _run(MODEL_DIR, ROOT / "patterns" / "demo", tasks, args, calibration, sets)


def realtext(args: argparse.Namespace) -> dict[str, Any]:
    from premoe.eval.harness import load_eval_set
    from premoe.profile import profile

    model = Path(args.model_dir)
    if not (model / "config.json").is_file():
        cmd = [sys.executable, str(ROOT / "examples" / "train_realtext.py"), "--out", str(model)]
        print("training:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    corpora = model / "corpora"
    tasks = args.tasks.split(",") if args.tasks else list(REALTEXT_DOMAINS)
    store = model.with_name(model.name + "-store")  # premoe refuses outputs inside the model
    if not (store / "store.json").is_file():
        profile(
            model,
            {d: corpora / f"{d}.profile.jsonl" for d in REALTEXT_DOMAINS},
            out=store,
            metrics=["tcess", "frequency", "paper-logits", "reap"],
            dtype="fp32",
            device="cpu",
            max_length=128,
            batch_size=32,
        )
    sets = {
        d: load_eval_set(d, str(corpora / f"{d}.eval.jsonl"), max_samples=args.n_eval)
        for d in tasks
    }
    calibration = {d: str(corpora / f"{d}.profile.jsonl") for d in tasks}
    return _run(model, store, tasks, args, calibration, sets)


def realtext_quant(args: argparse.Namespace) -> dict[str, Any]:
    """`realtext`, TCESS only, K x {none, fp8, int4}: perplexity at equal memory."""
    args.methods, args.recal_methods = "tcess", ""
    if args.keeps == DEFAULT_KEEPS:
        args.keeps = "4,8,12,16,24,32"
    if args.quantize == "none":
        args.quantize = "none,fp8,int4"
    if args.block == DEFAULT_GROUP and args.group_size == DEFAULT_GROUP:
        args.block = args.group_size = 48  # the model's experts: 48x96 and 96x48
    return realtext(args)


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per 1,000 calibration tokens of recalibration on the demo model (CPU)."""
    from premoe.calibrate import RecalibrateOptions, recalibrate
    from premoe.demo import MODEL_DIR
    from premoe.demo.tasks import generate
    from premoe.patterns.store import PatternStore
    from premoe.policy import select_experts
    from premoe.source import load_tokenizer, resolve_model

    torch.set_num_threads(args.threads or 1)
    src = resolve_model(MODEL_DIR)
    tok = load_tokenizer(MODEL_DIR)
    st = PatternStore.load(ROOT / "patterns" / "demo")
    corpus = [tok(r["text"])["input_ids"] for r in generate("add", 256, 0, "profile")]
    keep = select_experts(
        st.scores("add"), src.moe_layers, num_experts=src.num_experts, routed=src.top_k, keep=8
    ).keep
    r = recalibrate(
        src, keep, corpus, options=RecalibrateOptions(steps=args.steps, lr=args.lr), dtype="fp32"
    )
    info = r.info
    per_step_tokens = info["tokens"] / max(1, -(-info["samples"] // 64))
    out = {
        "tokens": info["tokens"],
        "steps": args.steps,
        "seconds": info["seconds"],
        "seconds_train": info["seconds_train"],
        "seconds_per_1000_calibration_tokens": info["seconds"] / (info["tokens"] / 1000),
        "seconds_per_1000_trained_tokens": info["seconds_train"]
        / (args.steps * per_step_tokens / 1000),
        "kl_before": info["kl_before"],
        "kl_after": info["kl_after"],
        "threads": args.threads or 1,
    }
    print(json.dumps(out, indent=2))
    _common.write_json(args.out, out)
    return out


def gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Layer-sequential recalibration of a 15B-class random model built on the GPU."""
    from premoe.calibrate.layerwise import LayerwiseOptions, recalibrate_layerwise
    from premoe.prune import KeepSets

    dev = torch.device(args.device)
    config = _common.qwen3_config(args)
    torch.manual_seed(0)
    model = _common.build_on_device(config, dev, torch.bfloat16)
    from premoe.arch.registry import arch_for_config

    arch = arch_for_config(config)
    layers = arch.moe_layer_ids(config)
    g = torch.Generator().manual_seed(0)
    keep = KeepSets.from_mapping(
        {
            layer: torch.randperm(config.num_experts, generator=g)[: args.keep].tolist()
            for layer in layers
        }
    )
    ids = torch.randint(0, config.vocab_size, (args.samples, args.seq), generator=g)
    mask = torch.ones_like(ids)
    _common.reset_peak(dev)
    _common.sync(dev)
    t0 = time.perf_counter()
    routers = recalibrate_layerwise(
        model,
        arch,
        keep,
        [(ids, mask)],
        options=LayerwiseOptions(steps=args.steps, lr=args.lr, chunk_tokens=args.chunk_tokens),
    )
    _common.sync(dev)
    secs = time.perf_counter() - t0
    tokens = args.samples * args.seq
    out = {
        "shape": {
            k: getattr(config, k)
            for k in ("num_hidden_layers", "hidden_size", "num_experts", "moe_intermediate_size")
        },
        "keep": args.keep,
        "tokens": tokens,
        "steps_per_layer": args.steps,
        "seconds": secs,
        "seconds_per_1000_calibration_tokens": secs / (tokens / 1000),
        "peak_device_bytes": _common.peak_bytes(dev),
        "relative_error": routers.info.get("layers"),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "relative_error"}, indent=2))
    _common.write_json(args.out, out, device=dev)
    return out


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Combine the JSON of several runs (e.g. one process per task) into one."""
    out: dict[str, Any] = {"rows": [], "seconds": {}, "merged_from": args.inputs}
    for path in args.inputs:
        part = json.loads(Path(path).read_text())
        out["rows"] += part["rows"]
        out["seconds"].update(part["seconds"])
        out.setdefault("options", part.get("options"))
    out["summary"] = _summary(out["rows"])
    if any(r.get("precision", "none") != "none" for r in out["rows"]):
        out["equal_memory"] = _equal_memory(out["rows"])
    _common.write_json(args.out, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["demo", "realtext", "realtext-quant", "cost", "gpu", "merge"])
    p.add_argument("--inputs", nargs="*", default=[], help="merge mode: JSON files to combine")
    p.add_argument("--out", default=None)
    p.add_argument("--keeps", default=DEFAULT_KEEPS)
    p.add_argument(
        "--quantize", default="none", help="expert precisions: none,fp8,int4 (comma-separated)"
    )
    p.add_argument("--block", type=int, default=DEFAULT_GROUP, help="fp8 block (rows, cols)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP, help="int4 group size")
    p.add_argument("--methods", default="tcess,paper-logits,reap,recon")
    p.add_argument(
        "--recal-methods",
        default="tcess,recon",
        help="methods also scored with recalibrated routers ('' for none)",
    )
    p.add_argument("--tasks", default=None)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--recal-batch", type=int, default=64, help="calibration samples per step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="skip tasks already in --out")
    p.add_argument("--model-dir", default="/tmp/premoe-realtext")
    p.add_argument("--plot", default=None, help="PNG of the summary curves")
    # gpu mode
    _common.add_model_args(p)
    p.add_argument("--keep", type=int, default=32)
    p.add_argument("--device", default="cuda", help="gpu mode: the device (cpu for a smoke run)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--chunk-tokens", type=int, default=2048)
    args = p.parse_args(argv)
    modes = {
        "demo": demo,
        "realtext": realtext,
        "realtext-quant": realtext_quant,
        "cost": cost,
        "gpu": gpu,
        "merge": merge,
    }
    out = modes[args.mode](args)
    if args.mode in ("demo", "realtext", "realtext-quant", "merge"):
        kind = out["rows"][0]["kind"] if out["rows"] else "accuracy"
        _print(out["summary"], kind)
        if out.get("equal_memory"):
            _print_equal_memory(out["equal_memory"], kind, out.get("source_dtype", "dense"))
        if args.plot:
            plot(out["summary"], kind, args.plot, Path(args.out or args.mode).stem)


def plot(summary: dict[str, dict[str, float]], kind: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, ks in summary.items():
        xs = sorted(ks, key=int)
        ax.plot(
            [int(k) for k in xs],
            [ks[k] for k in xs],
            marker="o",
            linestyle="--" if "+recal" not in m else "-",
            label=m,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts kept per MoE layer")
    ax.set_ylabel("mean accuracy retained" if kind == "accuracy" else "mean perplexity ratio")
    ax.set_title(f"pruning quality: {title}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
