"""Sequential (layer-by-layer) router recalibration on the bundled demo: accuracy of TCESS keep
sets without recalibration vs with `export --recalibrate --sequential`'s routers (issue #16,
item 1), per task and keep count, and the seconds it took.

    python bench/bench_layerwise.py --out bench/results/layerwise_demo.json

Each task's routers are fitted on its profiling corpus (`premoe.demo.tasks`, 256 rows, seed 0)
and scored on its 100 held-out rows (greedy exact match), as `premoe demo` scores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as bc
import torch

from premoe.calibrate.pipeline import calibrate_pattern
from premoe.calibrate.recalibrate import RecalibrateOptions
from premoe.calibrate.routers import apply_routers
from premoe.demo.tasks import write_suite
from premoe.eval.harness import load_eval_set, score
from premoe.load import load_pruned
from premoe.source import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("add", "reverse", "sort", "count", "close")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keeps", default="8,16")
    p.add_argument("--steps", type=int, default=RecalibrateOptions.steps)
    p.add_argument("--lr", type=float, default=RecalibrateOptions.lr)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    src = resolve_model(str(ROOT / "premoe/demo/model"))
    tok = load_tokenizer(src.path)
    keeps = [int(k) for k in args.keeps.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        suite = write_suite(Path(tmp), 256, 100, 0, list(TASKS))
        for task in TASKS:
            evalset = load_eval_set(task, suite[task]["eval"])
            corpus = suite[task]["profile"]
            for k in keeps:
                common: dict[str, Any] = {"keep": k, "select": "tcess", "corpus": corpus}
                plain = calibrate_pattern(src, ROOT / "patterns/demo", task,
                                          recalibrate_routers=False, **common)  # fmt: skip
                t0 = time.perf_counter()
                seq = calibrate_pattern(
                    src, ROOT / "patterns/demo", task, sequential=True,
                    options=RecalibrateOptions(steps=args.steps, lr=args.lr), **common,
                )  # fmt: skip
                secs = time.perf_counter() - t0
                net = load_pruned(src, plain.selection.keep, dtype=torch.float32).eval()
                before = score(net, tok, evalset).value
                assert seq.routers is not None
                apply_routers(net, src.arch, seq.routers)
                after = score(net, tok, evalset).value
                rows.append({"task": task, "keep": k, "tcess": before, "sequential_recal": after,
                             "seconds": secs})  # fmt: skip
                print(f"{task} K={k}: {before:.3f} -> {after:.3f} ({secs:.1f} s)", flush=True)
    table = []
    for k in keeps:
        sel = [r for r in rows if r["keep"] == k]
        mean = {m: sum(r[m] for r in sel) / len(sel) for m in ("tcess", "sequential_recal")}
        table.append([str(k), f"{mean['tcess']:.3f}", f"{mean['sequential_recal']:.3f}",
                      f"{sum(r['seconds'] for r in sel) / len(sel):.1f}"])  # fmt: skip
    bc.print_table(["K of 64", "tcess", "tcess + sequential recal", "s per task"], table)
    bc.write_json(args.out, {"rows": rows, "args": vars(args)}, device=torch.device("cpu"))
    src.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
