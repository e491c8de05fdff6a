"""Benchmark: the cost of metering the dropped mass per row in `premoe serve` (issue #18).

In process, no HTTP: the bundled demo model with the union of its shipped store's patterns
resident (`--keep` of 64 experts per pattern), a `ContinuousDecoder` with per-row router masks
(mixed mode), `--rows` rows round-robin over the 5 task patterns, each decoding `--tokens`
tokens (greedy, `ignore_eos`), `--reps` times. The meter (`SlotMiss` + `RowMeter`, what
`premoe serve` attaches by default; `--no-meter` leaves it out) is on for every other decode
step, so that steps with and without it see the same load on a shared machine; reported: the
median step time of each, its tokens/s (rows / step time) and their ratio (meter / no meter).

    python bench/bench_serve_meter.py --rows 1 16 --out bench/results/serve_meter_cpu.json

`--mass`: instead, what the meter reports over HTTP: the real `premoe serve` of the demo model
(`--keep`, mixed mode), `--prompts` held-out prompts of every task sent to every task's pattern
(named in the request), 8 greedy tokens each; the table is the mean `dropped_mass.mean` of the
responses (rows: the pattern, columns: the prompts' task).

    python bench/bench_serve_meter.py --mass --keep 32 --out bench/results/serve_mass_cpu.json
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


def mass_table(keep: int, prompts: int) -> dict[str, dict[str, float]]:
    import httpx

    port = bc.free_port()
    proc = bc.start_demo_server(port, ["--keep", str(keep), "--mixed", "on"])
    table: dict[str, dict[str, float]] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for pattern in TASKS:
                table[pattern] = {}
                for task in TASKS:
                    got = []
                    for row in generate(task, prompts, 11, "eval"):
                        body = {"prompt": row["prompt"], "max_tokens": 8, "temperature": 0}
                        body["premoe"] = {"task": pattern}
                        got.append(c.post("/v1/completions", json=body).json())
                    means = [r["premoe"]["dropped_mass"]["mean"] for r in got]
                    table[pattern][task] = sum(means) / len(means)
    finally:
        proc.terminate()
        proc.wait(30)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mass", action="store_true", help="dropped mass over HTTP (see above)")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.mass:
        table = mass_table(args.keep, args.prompts)
        bc.print_table(
            ["pattern \\ prompts", *TASKS],
            [[p, *(f"{table[p][t]:.3f}" for t in TASKS)] for p in TASKS],
        )
        bc.write_json(args.out, {"table": table, "args": vars(args)}, device="cpu")
        return
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
