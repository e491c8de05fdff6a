"""Benchmark: routing cost (issue 5 figures, routing half).

(a) key computation + search time / full-model prefill time of the same 512-token prompt
    (target <= 0.05). The key is `QueryKeyer`'s (the model runs only up to the first MoE
    router; no expert runs; replayed from a CUDA graph on a GPU, and timed eagerly too); the
    search is `PatternStore.search` on a store of 10,000 keys, with the key left on the model's
    device as `route` does (exact search there), and for comparison with the key copied to the
    host (FAISS). Prefill is `model(ids, use_cache=True, logits_to_keep=1)`, as `generate` does.
(b) search time with 10,000 stored keys: median µs of `PatternStore.search` (FAISS plus the
    kNN vote), of the bare `index.search`, and of `PatternStore.search` with the key on the
    device (exact search there; the answer back on the host), for each index type (flat, hnsw)
    and search mode (knn, centroid), for the router_input key (dim = hidden size) and the tcess
    key (dim = experts). Target <= 1 ms.

Default model: Qwen3-MoE-shaped, random bf16 weights built directly on the device (hidden 2048,
moe_intermediate 768, 128 experts, top-8, 24 layers: about 15.6 B parameters).

    python bench/bench_route.py --device cuda --out bench/route.json
    python bench/bench_route.py --smoke --out /tmp/route_smoke.json   # tiny model, CPU

(c) with ``--accuracy MODEL_DIR`` (CPU; the bundled demo model, premoe/demo/model): held-out
    routing accuracy on the demo task suite for each key kind (router_input, tcess) and search
    mode (knn, centroid), at several query lengths, and the distribution of the best similarity
    (to choose a fallback threshold). Lengths (``--lengths``): ``N`` = the first N characters of
    each held-out prompt, ``full`` = the whole prompt, ``xN`` = N prompts of one task joined by
    newlines (a format the model never saw in training or profiling).

    python bench/bench_route.py --accuracy premoe/demo/model --out bench/route_accuracy.json
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import _common as bc
import numpy as np
import torch

from premoe.arch import arch_for_config
from premoe.fingerprint import fingerprint_model
from premoe.patterns import PatternStore, TaskInfo, key_spec
from premoe.route import QueryKeyer

log = logging.getLogger("bench_route")


def synthetic_store(
    fp: dict[str, Any], kind: str, dim: int, rows: int, tasks: int, search: str, index: str
) -> PatternStore:
    """A store of `rows` random keys spread over `tasks` tasks (centroid: one row per task)."""
    rng = np.random.default_rng(0)
    layers, experts = len(fp["moe_layers"]), fp["num_experts"]
    spec = key_spec(kind, fp["moe_layers"][0], search, 15, index)
    store = PatternStore(fp, ["tcess"], spec, metric_options={"threshold": 0.0})
    per = rows // tasks if search == "knn" else 1
    other = "tcess" if kind == "router_input" else "router_input"
    sums = {r: torch.zeros(layers, experts, dtype=torch.float64) for r in ("counts", "tcess")}
    for t in range(tasks):  # (the zero sums are shared by every task)
        keys = {
            kind: rng.standard_normal((per, dim), dtype=np.float32),
            other: np.zeros((per, 1), dtype=np.float32),
        }
        info = TaskInfo("synthetic", per, per * 100, "now", {})
        store.add_task(f"t{t}", info, sums, keys, rebuild=False)
    store.build_index()
    return store


def median_us(fn: Any, repeats: int) -> float:
    """Median µs of `fn()` (host clock only: callers that use the device synchronise)."""
    return bc.median_seconds(fn, repeats) * 1e6


def _queries(prompts: list[str], length: str) -> list[str]:
    if length == "full":
        return list(prompts)
    if length.startswith("x"):
        n = int(length[1:])
        return ["\n".join(prompts[i : i + n]) for i in range(0, len(prompts), n)]
    return [p[: int(length)] for p in prompts]


def routing_accuracy(
    model_dir: Path, *, n_profile: int, n_eval: int, lengths: list[str], knn: int
) -> dict[str, Any]:
    """Held-out routing accuracy of the demo suite for every key kind x search x length."""
    import tempfile

    from premoe.demo.tasks import read_jsonl, task_names, write_suite
    from premoe.profile import load_causal_lm, load_tokenizer, profile

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device="cpu", dtype="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        suite = write_suite(tmp, n_profile=n_profile, n_eval=n_eval, seed=0)
        t0 = time.perf_counter()
        store = profile(
            model, {t: suite[t]["profile"] for t in task_names()}, tokenizer=tok, batch_size=64
        )
        profile_s = time.perf_counter() - t0
        evals = {t: [r["prompt"] for r in read_jsonl(suite[t]["eval"])] for t in task_names()}
    rows = []
    for kind, search, center in itertools.product(
        ("router_input", "tcess"), ("knn", "centroid"), (False, True)
    ):
        st = store.with_key(kind, search, knn, center=center)
        keyer = QueryKeyer.for_store(st, model, tok)
        for n in lengths:
            hits, total, sims, all_queries = 0, 0, [], []
            per_task = {}
            for task, prompts in evals.items():
                queries = _queries(prompts, n)
                keys = keyer.keys(queries)
                ok = 0
                for key in keys:
                    best, sim = st.search(key, k=1)[0]
                    ok += best == task
                    sims.append(sim)
                per_task[task] = ok / len(queries)
                hits, total = hits + ok, total + len(queries)
                all_queries += queries
            rows.append(
                {
                    "key": kind,
                    "search": search,
                    "center": center,
                    "query": n,
                    "mean_query_chars": sum(map(len, all_queries)) / len(all_queries),
                    "accuracy": hits / total,
                    "per_task": per_task,
                    "queries": total,
                    "best_similarity_p05": float(np.percentile(sims, 5)),
                    "best_similarity_median": float(np.median(sims)),
                }
            )
    # similarity of off-suite text (what a fallback threshold should catch)
    off = [
        "The quick brown fox jumps over the lazy dog.",
        "def main():\n    return 0",
        "Dear Sir or Madam, I am writing to",
        "It was the best of times, it was the worst",
    ]
    off_sims = {}
    for kind, center in itertools.product(("router_input", "tcess"), (False, True)):
        st = store.with_key(kind, "knn", knn, center=center)
        keyer = QueryKeyer.for_store(st, model, tok)
        label = f"{kind}{'/center' if center else ''}"
        off_sims[label] = [round(st.search(k, k=1)[0][1], 3) for k in keyer.keys(off)]
    return {
        "model": str(model_dir),
        "profile_samples_per_task": n_profile,
        "eval_prompts_per_task": n_eval,
        "knn": knn,
        "profile_s": profile_s,
        "rows": rows,
        "off_suite_best_similarity": off_sims,
    }


def accuracy_main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    lengths = args.lengths.split(",")
    res = routing_accuracy(
        args.accuracy, n_profile=args.n_profile, n_eval=args.n_eval, lengths=lengths, knn=args.knn
    )
    res.update(benchmark="route_accuracy")
    bc.print_table(
        ("key", "search", "center", "query", "accuracy", "sim p05", "sim med"),
        [
            (
                r["key"],
                r["search"],
                r["center"],
                r["query"],
                f"{r['accuracy']:.3f}",
                f"{r['best_similarity_p05']:.3f}",
                f"{r['best_similarity_median']:.3f}",
            )
            for r in res["rows"]
        ],
        title=f"held-out routing accuracy, {args.accuracy} ({res['eval_prompts_per_task']} eval "
        f"prompts per task, {res['profile_samples_per_task']} profile samples per task)",
        align="lllrrrr",
    )
    print(f"off-suite best similarity: {res['off_suite_best_similarity']}")
    bc.write_json(args.out, res, device="cpu")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    bc.add_model_args(p)
    p.add_argument("--seq", type=int, default=512, help="prompt length")
    p.add_argument("--stored", type=int, default=10_000, help="keys in the store")
    p.add_argument("--tasks", type=int, default=20, help="tasks the keys belong to (knn)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--search-repeats", type=int, default=200)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--accuracy", type=Path, default=None, help="demo model folder: (c)")
    p.add_argument("--n-profile", type=int, default=256, help="(c) profile samples per task")
    p.add_argument("--n-eval", type=int, default=100, help="(c) eval prompts per task")
    p.add_argument("--lengths", default="3,6,full,x2", help="(c) query lengths (see above)")
    p.add_argument("--knn", type=int, default=15, help="(c) neighbours that vote")
    args = p.parse_args(argv)
    if args.accuracy is not None:
        return accuracy_main(args)
    if args.smoke:
        vars(args).update(bc.SMOKE_SHAPE, device="cpu", dtype="fp32")
        vars(args).update(seq=64, stored=2000, repeats=3, search_repeats=20)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    config = bc.qwen3_config(args)
    model = bc.build_on_device(config, device, args.dtype)
    arch = arch_for_config(config)
    fp = fingerprint_model(model, arch)
    n_params = bc.n_params(model)
    ids = torch.randint(10, args.vocab, (args.seq,), generator=torch.Generator().manual_seed(0))
    prompt = [ids.tolist()]

    # (b) search
    search_rows = []
    stores: dict[str, PatternStore] = {}
    for kind, dim in (("router_input", args.hidden), ("tcess", args.experts)):
        for search in ("knn", "centroid"):
            for index in ("flat", "hnsw"):
                tasks = args.tasks if search == "knn" else args.stored
                t0 = time.perf_counter()
                st = synthetic_store(fp, kind, dim, args.stored, tasks, search, index)
                build_s = time.perf_counter() - t0
                q = np.random.default_rng(1).standard_normal(dim).astype(np.float32)
                qn = (q / np.linalg.norm(q)).reshape(1, -1)
                k = 15 if search == "knn" else 5
                st.search(q)
                full = median_us(lambda st=st, q=q: st.search(q), args.search_repeats)
                bare = median_us(
                    lambda st=st, qn=qn, k=k: st._index.search(qn, k), args.search_repeats
                )
                # the same search with the key on the model's device (exact, on the device; the
                # result is back on the host when search returns)
                qd = torch.from_numpy(q).to(device)
                st.search(qd)
                on_dev = median_us(lambda st=st, qd=qd: st.search(qd), args.search_repeats)
                stores[f"{kind}/{search}/{index}"] = st
                search_rows.append(
                    {
                        "key": kind,
                        "dim": dim,
                        "search": search,
                        "index": index,
                        "rows": st._index.ntotal,
                        "search_us": full,
                        "faiss_us": bare,
                        "device_search_us": on_dev,
                        "build_s": build_s,
                    }
                )

    # (a) key + search vs prefill
    spec = {"kind": "router_input", "layer": fp["moe_layers"][0]}
    keyer = QueryKeyer(model, None, arch, spec)  # CUDA graphs on a GPU (the default)
    eager = QueryKeyer(model, None, arch, spec, cuda_graphs=False)
    store = stores["router_input/knn/flat"]
    dev_ids = ids.view(1, -1).to(device)

    def key_and_search() -> None:  # as `route` does it: the key stays on the model's device
        store.search(keyer.tensor_keys_from_ids(prompt)[0])

    def key_and_faiss_search() -> None:  # the key copied to the host, FAISS on one CPU thread
        store.search(keyer.keys_from_ids(prompt)[0])

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=dev_ids, use_cache=True, logits_to_keep=1)
        bc.sync(device)

    for _ in range(3):
        key_and_search()
        prefill()
    key_us = median_us(lambda: keyer.keys_from_ids(prompt), args.repeats)
    eager_key_us = median_us(lambda: eager.keys_from_ids(prompt), args.repeats)
    graph_key, eager_key = keyer.keys_from_ids(prompt), eager.keys_from_ids(prompt)
    graph_diff = float(np.abs(graph_key - eager_key).max() / np.abs(eager_key).max())
    route_us = median_us(key_and_search, args.repeats)
    route_faiss_us = median_us(key_and_faiss_search, args.repeats)
    prefill_us = median_us(prefill, args.repeats)
    result = {
        "benchmark": "route",
        "dtype": args.dtype,
        "model": {**bc.model_shape(args), "params": n_params},
        "prompt_tokens": args.seq,
        "key_us": key_us,
        "key_cuda_graphs": keyer._graphs is not None and not keyer._graphs.failed,
        "eager_key_us": eager_key_us,
        "graph_vs_eager_key_max_rel_diff": graph_diff,
        "key_plus_search_us": route_us,
        "prefill_us": prefill_us,
        "route_over_prefill": route_us / prefill_us,
        "key_plus_faiss_search_us": route_faiss_us,
        "route_faiss_over_prefill": route_faiss_us / prefill_us,
        "search": search_rows,
        "smoke": args.smoke,
    }
    print(
        f"\nrouting cost, {bc.device_name(device)}, {n_params / 1e9:.2f} B params, "
        f"{args.seq}-token prompt"
    )
    print(
        f"key {key_us:,.0f} us, key + search {route_us:,.0f} us, prefill {prefill_us:,.0f} us:"
        f" ratio {route_us / prefill_us:.4f}"
    )
    print(
        f"key computed eagerly (no CUDA graph) {eager_key_us:,.0f} us; graph vs eager key: max"
        f" relative difference {graph_diff:.2e}"
    )
    print(
        f"with the key copied to the host and FAISS: key + search {route_faiss_us:,.0f} us,"
        f" ratio {route_faiss_us / prefill_us:.4f}"
    )
    print()
    bc.print_table(
        ("key", "dim", "search", "index", "rows", "search us", "faiss us", "device us"),
        [
            (
                r["key"],
                r["dim"],
                r["search"],
                r["index"],
                r["rows"],
                f"{r['search_us']:.1f}",
                f"{r['faiss_us']:.1f}",
                f"{r['device_search_us']:.1f}",
            )
            for r in search_rows
        ],
        align="lrllrrrr",
    )
    bc.write_json(args.out, result, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
