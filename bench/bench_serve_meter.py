"""Benchmark: the cost of metering the dropped mass per row in `premoe serve` (issue #18).

In process, no HTTP: the bundled demo model with the union of its shipped store's patterns
resident (`--keep` of 64 experts per pattern), a `ContinuousDecoder` with per-row router masks
(mixed mode), `--rows` rows round-robin over the 5 task patterns, each decoding `--tokens`
tokens (greedy, `ignore_eos`), `--reps` times. The meter (`SlotMiss` + `RowMeter`, what
`premoe serve` attaches by default; `--no-meter` leaves it out) is on for every other decode
step, so that steps with and without it see the same load on a shared machine; reported: the
median step time of each, its tokens/s (rows / step time) and their ratio (meter / no meter).

    python bench/bench_serve_meter.py --rows 1 16 --out bench/results/serve_meter_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common as bc
import torch

from premoe.demo.tasks import generate
from premoe.load import ResidentModel
from premoe.serve.continuous import ContinuousDecoder
from premoe.serve.decode import NullSink, SamplingParams
from premoe.serve.miss import RowMeter, SlotMiss
from premoe.serve.patterns import build_patterns
from premoe.serve.rowmask import RowRouting, union_keep
from premoe.source import load_tokenizer, resolve_model

TASKS = ("add", "reverse", "sort", "count", "close")


def step_times(
    model: Any, tok: Any, routing: RowRouting, meter: RowMeter, rows: int, tokens: int
) -> tuple[list[float], list[float]]:
    """Seconds of every decode step of `rows` rows, (with the meter, without): the meter is
    on for every other step, so that both see the same load on a shared machine."""
    dec = ContinuousDecoder(model, tok, slots=rows, max_len=64, routing=routing)
    miss = SlotMiss(meter, rows)
    dec.miss = miss
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for i in range(rows):
        task = TASKS[i % len(TASKS)]
        prompt = generate(task, 1, 100 + i, "eval")[0]["prompt"]
        dec.add(NullSink(), tok(prompt)["input_ids"], params, task)
    while any(s.prefilling for s in dec.active()):
        dec.step()
    on: list[float] = []
    off: list[float] = []
    k = 0
    while dec.active():
        dec.miss = miss if k % 2 == 0 else None
        t0 = time.perf_counter()
        dec.step()
        (on if k % 2 == 0 else off).append(time.perf_counter() - t0)
        k += 1
    return on, off


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = resolve_model(str(bc.ROOT / "premoe/demo/model"))
    tok = load_tokenizer(src.path)
    store = bc.ROOT / "patterns/demo"
    _, patterns, _ = build_patterns(store, src, keep=args.keep, budget=None, dtype=torch.float32)
    union = union_keep(patterns, src.num_experts)
    model = ResidentModel(src, union, device="cpu", dtype=torch.float32).model.eval()
    routing = RowRouting(model, src.arch, union, patterns)
    meter = RowMeter(model, src, patterns)
    meter.attach()
    results = []
    for rows in args.rows:
        on: list[float] = []
        off: list[float] = []
        step_times(model, tok, routing, meter, rows, 4)  # warm
        for _ in range(args.reps):
            a, b = step_times(model, tok, routing, meter, rows, args.tokens)
            on += a
            off += b
        t_on, t_off = statistics.median(on), statistics.median(off)
        res = {
            "rows": rows,
            "steps": len(on) + len(off),
            "meter_step_ms": t_on * 1e3,
            "no_meter_step_ms": t_off * 1e3,
            "meter_tokens_per_s": rows / t_on,
            "no_meter_tokens_per_s": rows / t_off,
            "ratio": t_off / t_on,
        }
        results.append(res)
        print(f"rows={rows}: ratio {res['ratio']:.3f}", file=sys.stderr)
    head = ["rows", "step ms, meter", "step ms, no meter", "tokens/s, meter", "tokens/s, no"]
    bc.print_table(
        [*head, "meter / no meter"],
        [
            [
                r["rows"],
                f"{r['meter_step_ms']:.2f}",
                f"{r['no_meter_step_ms']:.2f}",
                f"{r['meter_tokens_per_s']:.1f}",
                f"{r['no_meter_tokens_per_s']:.1f}",
                f"{r['ratio']:.3f}",
            ]
            for r in results
        ],
    )
    bc.write_json(args.out, {"runs": results, "args": vars(args)}, device="cpu")


if __name__ == "__main__":
    main()
